"""The synthetic dermatology world: seeded scenes, their images and their captions.

A scene is a skin lesion (colour, border, size) on a skin tone, with optional
artifacts (ruler, band-aid, ink skin-marker, hair, dark vignette corners). Its
diagnosis is a function of the lesion alone: a lesion is malignant when its border
is irregular and its colour is dark (brown or black); skin tone and artifacts never
enter the rule, so any reliance a classifier places on them is a shortcut.

Everything is a pure function of a seed: ``sample_scene`` draws attributes,
``render_scene`` draws a ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB image and
``caption_scene`` writes one of many captions. Images are drawn with numpy (skin,
lesion, vignette) and PIL (hair, ink, ruler, band-aid), about a millisecond each.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Side of every rendered image in pixels (the tiny CLIP's input size)."""

SKIN_TONES = ("fair", "olive", "dark")
LESION_COLOURS = ("tan", "brown", "black", "red")
DARK_COLOURS = ("brown", "black")
LESION_BORDERS = ("regular", "irregular")
LESION_SIZES = ("small", "medium", "large")
ARTIFACTS = ("ruler", "band_aid", "ink_marker", "hair", "vignette")
CLASSES = ("benign", "malignant")

_SKIN_RGB = {"fair": (240, 208, 188), "olive": (196, 150, 112), "dark": (120, 84, 66)}
_LESION_RGB = {"tan": (212, 142, 78), "brown": (118, 58, 22), "black": (34, 26, 30),
               "red": (200, 40, 58)}
_SIZE_RADIUS = {"small": 7.0, "medium": 10.0, "large": 13.0}

# Which (colour, border) pairs each class allows; diagnosis_of is the rule, this is
# its inverse, used to sample a lesion for a chosen class.
_LESIONS_BY_CLASS: dict[str, tuple[tuple[str, str], ...]] = {
    "malignant": tuple((c, "irregular") for c in DARK_COLOURS),
    "benign": tuple((c, b) for c in LESION_COLOURS for b in LESION_BORDERS
                    if not (b == "irregular" and c in DARK_COLOURS)),
}


def diagnosis_of(lesion_colour: str, lesion_border: str) -> str:
    """The world's ground-truth rule: irregular and dark is malignant, all else benign."""
    return "malignant" if lesion_border == "irregular" and lesion_colour in DARK_COLOURS \
        else "benign"


@dataclass(frozen=True)
class Scene:
    """The attributes of one image; everything a caption or a manifest row says."""

    skin_tone: str
    """One of ``SKIN_TONES``."""
    lesion_colour: str
    """One of ``LESION_COLOURS``."""
    lesion_border: str
    """``regular`` or ``irregular``."""
    lesion_size: str
    """One of ``LESION_SIZES``."""
    artifacts: frozenset[str] = field(default_factory=frozenset)
    """The artifacts present, a subset of ``ARTIFACTS``."""

    @property
    def diagnosis(self) -> str:
        return diagnosis_of(self.lesion_colour, self.lesion_border)

    def metadata(self) -> dict[str, Any]:
        """Manifest columns: label, lesion and skin attributes, one ``has_*`` per artifact."""
        row: dict[str, Any] = {
            "label": self.diagnosis, "skin_tone": self.skin_tone,
            "lesion_colour": self.lesion_colour, "lesion_border": self.lesion_border,
            "lesion_size": self.lesion_size,
        }
        row.update({f"has_{a}": a in self.artifacts for a in ARTIFACTS})
        return row


def sample_scene(rng: np.random.Generator, *, diagnosis: str | None = None,
                 artifact_probs: Mapping[str, float] | None = None,
                 forced_artifacts: Mapping[str, bool] | None = None) -> Scene:
    """Draw a scene. ``diagnosis`` fixes the class (else benign/malignant 50:50);
    each artifact is present with ``artifact_probs[a]`` (default 0.2) unless
    ``forced_artifacts`` says whether it is."""
    diagnosis = diagnosis or CLASSES[int(rng.integers(2))]
    pairs = _LESIONS_BY_CLASS[diagnosis]
    colour, border = pairs[int(rng.integers(len(pairs)))]
    probs = {a: 0.2 for a in ARTIFACTS} | dict(artifact_probs or {})
    draws = rng.random(len(ARTIFACTS))
    present = {a for a, u in zip(ARTIFACTS, draws) if u < probs[a]}
    for a, on in (forced_artifacts or {}).items():
        present = present | {a} if on else present - {a}
    return Scene(
        skin_tone=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
        lesion_colour=colour, lesion_border=border,
        lesion_size=LESION_SIZES[int(rng.integers(len(LESION_SIZES)))],
        artifacts=frozenset(present),
    )


# ---------------------------------------------------------------- rendering

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


DRAW_ORDER = ("vignette", "hair", "ink_marker", "ruler", "band_aid")
"""Order in which artifacts are painted: a later one hides an earlier one where they meet."""
LOCALISED_ARTIFACTS = ("ruler", "band_aid", "ink_marker")
"""Artifacts drawn in one place (their mask is one object)."""
DIFFUSE_ARTIFACTS = ("hair", "vignette")
"""Artifacts spread over the image (strands across the frame, darkened corners)."""


@dataclass(frozen=True)
class Rendering:
    """A rendered scene and where each of its artifacts is visible."""

    image: np.ndarray
    """uint8 [H, W, 3]."""
    masks: Mapping[str, np.ndarray]
    """Per artifact painted, bool [H, W]: the pixels it changed that no later-painted artifact
    hides (drawn objects: the object's pixels; hair: the strands; vignette: every pixel it
    darkened, however slightly). Masks of objects never overlap; a filter's (another
    world's film grain) overlaps the masks of what lies under it."""


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene as a uint8 array [IMAGE_SIZE, IMAGE_SIZE, 3]; ``rng`` picks the layout."""
    return _render(scene, rng, omit=frozenset(), with_masks=False).image


def render_scene_with_masks(scene: Scene, rng: np.random.Generator, *,
                            omit: Collection[str] = ()) -> Rendering:
    """``render_scene`` plus one mask per artifact painted (the image is bit-identical).

    Artifacts of the scene named in ``omit`` draw their layout from ``rng`` exactly as if
    they were painted, and are then left out: the rest of the image is unchanged, so the
    two renderings of a scene with and without ``omit`` differ only inside that
    artifact's mask (a counterfactual pair)."""
    return _render(scene, rng, omit=frozenset(omit), with_masks=True)


def _render(scene: Scene, rng: np.random.Generator, *, omit: frozenset[str],
            with_masks: bool) -> Rendering:
    img = _skin(scene.skin_tone, rng)
    cy, cx, reach = _draw_lesion(img, scene, rng)
    masks: dict[str, np.ndarray] = {}
    if "vignette" in scene.artifacts:
        # Before the objects, so the vignette never hides a ruler or a band-aid.
        shaded, masks["vignette"] = _vignette(img, rng)
        img = img if "vignette" in omit else shaded
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    objects = (("hair", lambda pen: _draw_hair(pen, rng)),
               ("ink_marker", lambda pen: _draw_ink(pen, rng, cy, cx, reach)),
               ("ruler", lambda pen: _draw_ruler(pen, rng)),
               ("band_aid", lambda pen: _draw_band_aid(pen, rng)))
    for name, paint in objects:
        if name in scene.artifacts:
            mask = Image.new("L", canvas.size, 0) if with_masks else None
            paint(_Pen(None if name in omit else draw, mask))
            if mask is not None:
                masks[name] = np.asarray(mask) > 0
    painted = [a for a in DRAW_ORDER if a in masks and a not in omit]
    return Rendering(np.asarray(canvas), _visible(masks, painted) if with_masks else {})


def _visible(masks: Mapping[str, np.ndarray], painted: list[str]) -> dict[str, np.ndarray]:
    """Each painted artifact's mask minus what artifacts painted after it cover."""
    visible, hidden = {}, np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for name in reversed(painted):
        visible[name] = masks[name] & ~hidden
        hidden |= masks[name]
    return {name: visible[name] for name in painted}


class _Pen:
    """Draws each shape on the image (unless the artifact is omitted) and on its mask,
    with the same geometry, so the mask holds exactly the pixels the shape covers."""

    def __init__(self, image: ImageDraw.ImageDraw | None, mask: Image.Image | None) -> None:
        self._image = image
        self._mask = ImageDraw.Draw(mask) if mask is not None else None

    def __getattr__(self, shape: str) -> Callable[..., None]:
        def draw(xy: Any, *args: Any, fill: Any = None, outline: Any = None,
                 **kwargs: Any) -> None:
            if self._image is not None:
                getattr(self._image, shape)(xy, *args, fill=fill, **_outline(outline), **kwargs)
            if self._mask is not None:
                getattr(self._mask, shape)(xy, *args, fill=None if fill is None else 255,
                                           **_outline(None if outline is None else 255),
                                           **kwargs)
        return draw


def _outline(value: Any) -> dict[str, Any]:
    # line/arc/point take no outline keyword; shapes take one.
    return {} if value is None else {"outline": value}


def _skin(tone: str, rng: np.random.Generator) -> np.ndarray:
    base = np.array(_SKIN_RGB[tone], np.float32) + rng.normal(0, 5, 3).astype(np.float32)
    gy, gx = rng.normal(0, 0.08, 2).astype(np.float32)
    light = 1 + gy * (_YY / IMAGE_SIZE - 0.5) + gx * (_XX / IMAGE_SIZE - 0.5)
    noise = rng.normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    return base * light[..., None] + noise


def _draw_lesion(img: np.ndarray, scene: Scene, rng: np.random.Generator
                 ) -> tuple[float, float, float]:
    """Paint the lesion into ``img`` in place; return its centre and outer radius."""
    radius = _SIZE_RADIUS[scene.lesion_size] * rng.uniform(0.9, 1.1)
    cy, cx = IMAGE_SIZE / 2 + rng.uniform(-4, 4, 2)
    aspect, tilt = rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)
    dy, dx = _YY - cy, _XX - cx
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    if scene.lesion_border == "irregular":
        alpha = _irregular_alpha(rho, theta, radius, rng)
    else:
        edge = radius * (1 + 0.02 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi)))
        alpha = np.clip(edge - rho + 0.5, 0, 1)
    edge = np.maximum(radius, 1e-3)
    alpha = alpha[..., None]
    colour = np.array(_LESION_RGB[scene.lesion_colour], np.float32) + rng.normal(0, 6, 3)
    # Darker core, lighter rim, blotchy texture: it looks like a lesion, not a disc.
    depth = np.clip(1 - rho / np.maximum(edge, 1e-3), 0, 1)[..., None]
    fy, fx = rng.uniform(0.2, 0.5, 2)
    py, px = rng.uniform(0, 2 * np.pi, 2)
    blotch = (10 * np.sin(fy * _YY + py) * np.sin(fx * _XX + px))[..., None]
    lesion = colour * (1.1 - 0.25 * depth) + blotch
    img *= 1 - alpha
    img += alpha * lesion
    reach = radius * (1.75 if scene.lesion_border == "irregular" else 1.05)
    return float(cy), float(cx), float(reach)


def _irregular_alpha(rho: np.ndarray, theta: np.ndarray, radius: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Coverage of an irregular lesion: lopsided lobes, a jagged edge and radial
    streaks (pseudopods) reaching out of it, so that the border is visible locally,
    at the scale of a single ViT patch, and not only in the overall shape."""
    wobble = np.zeros_like(theta)
    amps = rng.uniform((0.15, 0.12, 0.08, 0.06, 0.05), (0.25, 0.2, 0.12, 0.09, 0.08))
    for k, amp in zip((2, 3, 5, 11, 17), amps):
        wobble += amp * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    edge = radius * (1 + wobble)
    alpha = np.clip(edge - rho + 0.5, 0, 1)
    for angle in rng.uniform(-np.pi, np.pi, int(rng.integers(4, 8))):
        gap = np.abs((theta - angle + np.pi) % (2 * np.pi) - np.pi)  # angular distance
        length = radius * rng.uniform(0.35, 0.6)
        streak = (gap * rho < 0.9) & (rho < edge + length)
        alpha = np.maximum(alpha, streak.astype(np.float32))
    return alpha


def _draw_hair(draw: _Pen, rng: np.random.Generator) -> None:
    colour = tuple(int(c) for c in rng.integers(10, 40, 3))
    for _ in range(int(rng.integers(4, 8))):
        # Each strand crosses the frame: from one edge, bending, out through another.
        a, b = rng.uniform(0, 2 * np.pi, 2)
        p0 = IMAGE_SIZE / 2 + 0.75 * IMAGE_SIZE * np.array([np.cos(a), np.sin(a)])
        p2 = IMAGE_SIZE / 2 + 0.75 * IMAGE_SIZE * np.array([np.cos(b), np.sin(b)])
        p1 = rng.uniform(0, IMAGE_SIZE, 2)
        t = np.linspace(0, 1, 16)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
        draw.line([tuple(p) for p in pts], fill=colour, width=int(rng.integers(1, 3)))


def _draw_ink(draw: _Pen, rng: np.random.Generator,
              cy: float, cx: float, reach: float) -> None:
    colour = (118, 44, 170) if rng.random() < 0.6 else (40, 56, 176)
    r = reach + rng.uniform(2.5, 5)
    if rng.random() < 0.7:  # a circle drawn round the lesion, sometimes left open
        start = rng.uniform(0, 360)
        span = 360 if rng.random() < 0.5 else rng.uniform(220, 330)
        draw.arc([cx - r, cy - r, cx + r, cy + r], start, start + span, fill=colour, width=2)
    else:  # dots placed round the lesion
        for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(3, 6))):
            y, x = cy + r * np.sin(angle), cx + r * np.cos(angle)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)


def _draw_ruler(draw: _Pen, rng: np.random.Generator) -> None:
    side = int(rng.integers(4))  # top, bottom, left, right
    width = int(rng.integers(6, 9))
    body = tuple(int(c) for c in rng.integers((225, 220, 185), (250, 245, 215)))
    lo, hi = (0, width) if side in (0, 2) else (IMAGE_SIZE - width, IMAGE_SIZE)
    horizontal = side < 2
    box = [0, lo, IMAGE_SIZE, hi] if horizontal else [lo, 0, hi, IMAGE_SIZE]
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=body)
    start, step = int(rng.integers(0, 3)), 3
    for i, pos in enumerate(range(start, IMAGE_SIZE, step)):
        length = width - 2 if i % 5 == 0 else width // 2
        a = lo if side in (0, 2) else hi - length
        if horizontal:
            draw.line([(pos, a), (pos, a + length - 1)], fill=(20, 20, 20), width=1)
        else:
            draw.line([(a, pos), (a + length - 1, pos)], fill=(20, 20, 20), width=1)


def _draw_band_aid(draw: _Pen, rng: np.random.Generator) -> None:
    long, short = int(rng.integers(26, 33)), int(rng.integers(12, 15))
    horizontal = rng.random() < 0.5
    w, h = (long, short) if horizontal else (short, long)
    corner = int(rng.integers(4))  # kept inside the frame and off the vignette's darkest part
    x0 = int(rng.integers(2, 6)) if corner in (0, 2) else IMAGE_SIZE - w - int(rng.integers(3, 7))
    y0 = int(rng.integers(2, 6)) if corner in (0, 1) else IMAGE_SIZE - h - int(rng.integers(3, 7))
    tan = tuple(int(c) for c in rng.integers((215, 160, 110), (235, 185, 135)))
    draw.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=4, fill=tan, outline=(170, 115, 70))
    pad = [x0 + w // 3, y0 + 2, x0 + 2 * w // 3, y0 + h - 2] if horizontal \
        else [x0 + 2, y0 + h // 3, x0 + w - 2, y0 + 2 * h // 3]
    draw.rectangle(pad, fill=(248, 236, 222))
    for _ in range(6):  # the air holes of the adhesive strip
        x, y = x0 + rng.integers(2, w - 2), y0 + rng.integers(2, h - 2)
        if not (pad[0] <= x <= pad[2] and pad[1] <= y <= pad[3]):
            draw.point((int(x), int(y)), fill=(150, 100, 60))


_CORNER_R = np.hypot(_YY - IMAGE_SIZE / 2, _XX - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)


def _vignette(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The image with darkened corners, and the mask of the pixels darkened."""
    inner = rng.uniform(0.85, 1.0)
    shade = np.clip((_CORNER_R - inner) / 0.15, 0, 1)[..., None]
    return (1 - shade) * img + shade * rng.uniform(5, 20), shade[..., 0] > 0
