"""Building a CLIP from an open_clip model config: the whole model or its image tower
alone, random or loaded weights, image preprocessing and the tokenizer (made on
demand). ``clipaudit.extraction.backbone`` decides what to build; this module builds it.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import torch_load_reason
from clipaudit.errors import InputError, ModelUnavailableError


class MissingExtraError(InputError):
    """An optional dependency a model needs is not installed."""


class ImageTowerOnly(torch.nn.Module):
    """A CLIP's image tower alone (``.visual``), with ``encode_image``."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.visual(images)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


_TIMM_KWARGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _timm_model_kwargs(kwargs: dict[str, Any] | None) -> Iterator[None]:
    """Pass ``vision_cfg.timm_model_kwargs`` (clipaudit's extension of open_clip's model
    config) to ``timm.create_model``: open_clip offers no way to size a timm tower, which
    tiny test towers and the coverage script need."""
    if not kwargs:
        yield
        return
    import timm

    with _TIMM_KWARGS_LOCK:
        original = timm.create_model
        timm.create_model = lambda name, **kw: original(name, **{**kw, **kwargs})
        try:
            yield
        finally:
            timm.create_model = original


def _require(module: str, extra: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise MissingExtraError(f"{what} needs the optional package {module}: "
                                f"pip install 'clipaudit[{extra}]'") from None


def build_image_tower(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """open_clip's image tower for a model config (timm towers with their kwargs)."""
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"])
    timm_kwargs = vision_cfg.pop("timm_model_kwargs", None)
    if vision_cfg.get("timm_model_name"):
        _require("timm", "timm", f"the image tower {vision_cfg['timm_model_name']}")
        vision_cfg["timm_model_pretrained"] = False
    with _timm_model_kwargs(timm_kwargs):
        return _build_vision_tower(int(model_cfg["embed_dim"]), vision_cfg,
                                   quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def build_model(model_cfg: dict[str, Any], *, text: bool, seed: int, random: bool) -> torch.nn.Module:
    """The whole CLIP (``text``) or its image tower alone, initialised from ``seed``."""
    torch.manual_seed(seed)
    try:
        if not text:
            return ImageTowerOnly(build_image_tower(model_cfg))
        model = _build_full(model_cfg)
        if random and "multimodal_cfg" in model_cfg:
            # CoCa builds its text tower first: rebuild the image tower from the seed, so
            # random weights are the same with and without the text tower
            torch.manual_seed(seed)
            model.visual = build_image_tower(model_cfg)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise InputError(f"cannot build a model from this config ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model


def _build_full(model_cfg: dict[str, Any]) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy({k: v for k, v in model_cfg.items() if k != "custom_text"})
    vision_cfg = cfg["vision_cfg"]
    timm_kwargs = vision_cfg.pop("timm_model_kwargs", None)
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False
    text_cfg = cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        _require("transformers", "hf", f"the text tower {text_cfg['hf_model_name']}")
        text_cfg["hf_model_pretrained"] = False
    cls: Any = CLIP
    if "multimodal_cfg" in cfg:
        from open_clip.coca_model import CoCa

        cls = CoCa
    elif model_cfg.get("custom_text") or "hf_model_name" in text_cfg:
        cls = CustomTextCLIP
    with _timm_model_kwargs(timm_kwargs):
        try:
            return cls(**cfg)
        except OSError as e:  # transformers looks the text config up on the hub
            raise ModelUnavailableError(f"the text tower's config is not available offline "
                                        f"({str(e).splitlines()[0][:200]})") from None


def load_weights(model: torch.nn.Module, fpath: Path, where: object, *, text: bool) -> None:
    """A CLIP checkpoint into ``model``: all of it, or the ``visual.`` weights alone."""
    import open_clip
    from open_clip.model import resize_pos_embed

    try:
        if text:
            open_clip.load_checkpoint(model, str(fpath), weights_only=True)
            return
        state = open_clip.factory.load_state_dict(str(fpath), weights_only=True)
        visual = {k: v for k, v in state.items() if k.startswith("visual.")}
        resize_pos_embed(visual, model)
        model.load_state_dict(visual, strict=True)
    except Exception as e:  # torch/safetensors raise many types for bad files
        raise InputError(f"{fpath}: cannot load these weights into the model of {where}: "
                         f"{torch_load_reason(e)}") from None


def preprocessing(model: Any, preprocess_cfg: dict[str, Any],
                  size: Any = None) -> tuple[Callable, dict[str, Any]]:
    """(image transform, the preprocessing recorded in provenance). ``size``: the model
    config's image size (config files, as earlier clipaudit versions recorded them);
    None: open_clip's defaults overlaid with ``preprocess_cfg`` at the tower's size."""
    import open_clip
    from open_clip.model import get_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    if size is not None:
        model.visual.preprocess_cfg = {"size": size, **preprocess_cfg}
        cfg = preprocess_cfg
        preprocess = open_clip.image_transform(
            size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))
    else:
        merged = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
        merged["size"] = model.visual.image_size
        model.visual.preprocess_cfg = merged
        preprocess = image_transform_v2(PreprocessCfg(**merged), is_train=False)
    recorded = dict(get_model_preprocess_cfg(model))
    return preprocess, {k: (list(v) if isinstance(v, tuple) else v) for k, v in recorded.items()}


def make_tokenizer(model_cfg: dict[str, Any], ident: str) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    text_cfg = model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)
    _require("transformers", "hf", f"the tokenizer of {ident} ({name})")
    try:
        return open_clip.HFTokenizer(name, context_length=context_length,
                                     tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    except OSError as e:
        raise ModelUnavailableError(f"the tokenizer {name} of {ident} is not available offline "
                                    f"({str(e).splitlines()[0][:200]})") from None


