"""Heatmaps as pictures: the model's view of an image, the map over it, and the map alone.

The model sees a resized and cropped copy of each image; a patch-resolution map is
laid over exactly that view (``model_view``), never over the original frame, so a
patch on the map is the patch the model read. ``view_mask`` applies the same
geometry to a pixel mask (the synthetic worlds' artifact masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered dark -> bright ramp (anchor points of matplotlib's "inferno").
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                     (245, 125, 21), (250, 193, 39), (252, 255, 164)], np.float32)
_PEAK_RGB = (0, 230, 255)


def _transforms(preprocess: Any) -> list[Callable[[Any], Any]]:
    return list(getattr(preprocess, "transforms", [preprocess]))


def model_view(preprocess: Callable[[Any], torch.Tensor], image: Image.Image
               ) -> tuple[torch.Tensor, Image.Image]:
    """The model's input tensor [3, S, S] and the RGB picture it shows (un-normalised)."""
    tensor = preprocess(image)
    mean = std = None
    t: Any
    for t in _transforms(preprocess):
        if type(t).__name__ == "Normalize":
            mean, std = t.mean, t.std
    x = tensor.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.as_tensor(std).reshape(-1, 1, 1) + torch.as_tensor(mean).reshape(-1, 1, 1)
    else:  # an unknown normalisation: stretch to the visible range
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    pixels = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return tensor, Image.fromarray(pixels[..., :3] if pixels.shape[2] >= 3
                                   else np.repeat(pixels, 3, axis=2))


def view_mask(preprocess: Callable[[Any], torch.Tensor], mask: np.ndarray) -> np.ndarray:
    """A bool mask of the original image [H, W] in the model's view [S, S]: the
    preprocessing's steps up to the conversion to a tensor (resize, crop), thresholded at
    half."""
    img: Any = Image.fromarray(mask.astype(np.uint8) * 255)
    for t in _transforms(preprocess):
        out = t(img)
        if not isinstance(out, Image.Image):  # the conversion to a tensor: geometry is done
            break
        img = out
    arr = np.asarray(img)
    return (arr[..., 0] if arr.ndim == 3 else arr) >= 128


def _positive_unit(heat: np.ndarray) -> np.ndarray:
    pos = np.clip(heat, 0, None)
    top = float(pos.max()) if pos.size else 0.0
    return pos / top if top > 0 else np.zeros_like(pos)


def _inferno(unit: np.ndarray) -> np.ndarray:
    pos = np.clip(unit, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (pos - lo)[..., None]
    return _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac


def _diverging(heat: np.ndarray) -> np.ndarray:
    """Blue (negative) - white (0) - red (positive), scaled by the largest magnitude."""
    top = float(np.abs(heat).max()) if heat.size else 0.0
    unit = heat / top if top > 0 else np.zeros_like(heat)
    white, red, blue = np.array([255, 255, 255.]), np.array([190, 20, 30.]), np.array([30, 70, 190.])
    pos, neg = np.clip(unit, 0, 1)[..., None], np.clip(-unit, 0, 1)[..., None]
    return white * (1 - pos - neg) + red * pos + blue * neg


def _resize_view(view: Image.Image, px: int) -> Image.Image:
    # Upscale small inputs with nearest (a ruler's ticks stay crisp); downscale smoothly.
    method = Image.Resampling.NEAREST if px >= view.width else Image.Resampling.LANCZOS
    return view.convert("RGB").resize((px, px), method)


def _outline_peak(img: Image.Image, peak: Sequence[int] | None, grid: Sequence[int]) -> None:
    if peak is None:
        return
    rows, cols = grid
    h, w = img.height / rows, img.width / cols
    r, c = int(peak[0]), int(peak[1])
    ImageDraw.Draw(img).rectangle([round(c * w), round(r * h), round((c + 1) * w) - 1,
                                   round((r + 1) * h) - 1], outline=_PEAK_RGB,
                                  width=max(1, img.width // 80))


def render_overlay(view: Image.Image, heat: np.ndarray, px: int,
                   peak: Sequence[int] | None = None) -> Image.Image:
    """The view at ``px`` x ``px`` under the map's positive part: bright where the map is
    strongest, dimmed where it is zero (the image still shows through everywhere); the
    peak patch outlined."""
    base = np.asarray(_resize_view(view, px), np.float32)
    unit = _positive_unit(np.asarray(heat, np.float32))
    smooth = np.asarray(Image.fromarray(unit.astype(np.float32), mode="F")
                        .resize((px, px), Image.Resampling.BILINEAR), np.float32).clip(0, 1)
    alpha = (0.3 + 0.45 * smooth)[..., None]
    out = Image.fromarray((base * (1 - alpha) + _inferno(smooth) * alpha).round()
                          .clip(0, 255).astype(np.uint8))
    _outline_peak(out, peak, np.shape(heat))
    return out


def render_map(heat: np.ndarray, px: int, peak: Sequence[int] | None = None) -> Image.Image:
    """The map alone at patch resolution: red where it adds to the activation, blue
    where it takes away, white at zero; the peak patch outlined."""
    colours = _diverging(np.asarray(heat, np.float32)).round().clip(0, 255).astype(np.uint8)
    out = Image.fromarray(colours).resize((px, px), Image.Resampling.NEAREST)
    _outline_peak(out, peak, np.shape(heat))
    return out


def render_panel(view: Image.Image, maps: Sequence[tuple[str, np.ndarray, Sequence[int]]],
                 px: int, title: str) -> Image.Image:
    """One row: the view, then one overlay per (caption, map, peak), captions below."""
    font = ImageFont.load_default()
    line = 14
    tiles = [("input", _resize_view(view, px))]
    tiles += [(caption, render_overlay(view, heat, px, peak)) for caption, heat, peak in maps]
    pad = 6
    width = pad + len(tiles) * (px + pad)
    height = line + pad + px + pad + 2 * line
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.text((pad, 2), title, fill=(20, 20, 20), font=font)
    for i, (caption, tile) in enumerate(tiles):
        x = pad + i * (px + pad)
        panel.paste(tile, (x, line + pad))
        for k, part in enumerate(caption.split("\n")[:2]):
            draw.text((x, line + pad + px + 3 + k * line), part, fill=(20, 20, 20), font=font)
    return panel
