"""The synthetic birds world (Waterbirds-like): seeded scenes and their images with masks.

A scene is a bird of one of eight species (four landbirds, four waterbirds) under a time
of day, facing left or right, with optional artifacts: a water background (the land
background otherwise), a boat, a branch it perches on, film grain, a photo frame and a
watermark. Its label is the bird's kind, a function of the species alone; the background,
the time of day and the artifacts never enter it, so any reliance a classifier places on
them is a shortcut (the water background is the classic one of Waterbirds). The time of
day is the world's protected-like attribute.

Landbirds are small and upright (round body, short beak, short legs), waterbirds long
and low with a long neck, a long beak and long legs. Plumage colours overlap between the
kinds (brown and black birds exist in both), so colour alone cannot tell the kind.

Images are ``IMAGE_SIZE`` px square (72: another geometry than the dermatology world's
64), drawn with numpy (sky, ground, lighting, grain) and PIL (bird and objects).
Painting order: sky and ground (water or land), boat, bird, branch, time-of-day light,
grain, frame, watermark. Objects occlude what lies under them; film grain is a filter
that covers nothing: it changes (nearly) every pixel it is not hidden under the frame or
the watermark, so its mask overlaps the masks of the scene's other artifacts. Every
other pair of masks is disjoint.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from clipaudit.synthetic.world import Rendering

IMAGE_SIZE = 72
"""Side of every rendered image in pixels (the tiny birds CLIP's input size)."""

CLASSES = ("landbird", "waterbird")
SPECIES: dict[str, tuple[str, ...]] = {
    "landbird": ("sparrow", "crow", "canary", "cardinal"),
    "waterbird": ("gull", "heron", "cormorant", "duck"),
}
"""Species of each kind; the label is the kind of the species."""
ALL_SPECIES = tuple(s for kind in CLASSES for s in SPECIES[kind])
KIND_OF = {s: kind for kind in CLASSES for s in SPECIES[kind]}
PLUMAGE_OF = {"sparrow": "brown", "crow": "black", "canary": "yellow", "cardinal": "red",
              "gull": "white", "heron": "grey", "cormorant": "black", "duck": "brown"}
"""The main plumage colour of each species (brown and black occur in both kinds)."""
PLUMAGES = ("brown", "black", "yellow", "red", "white", "grey")
TIMES_OF_DAY = ("day", "dusk", "night")
FACINGS = ("left", "right")
ARTIFACTS = ("water", "boat", "branch", "grain", "frame", "watermark")
LOCALISED_ARTIFACTS = ("boat", "branch", "frame", "watermark")
"""Artifacts drawn in one place (their mask is one object or one ring)."""
DIFFUSE_ARTIFACTS = ("water", "grain")
"""Artifacts spread over the image (the whole ground; noise on every pixel)."""
FILTER_ARTIFACTS = ("grain",)
"""Artifacts that change pixels without covering them: their masks overlap others'."""
DRAW_ORDER = ("water", "boat", "branch", "grain", "frame", "watermark")
"""Order in which artifacts are painted (the bird comes between boat and branch)."""


def kind_of(species: str) -> str:
    """The world's ground-truth rule: the label is the species' kind."""
    return KIND_OF[species]


@dataclass(frozen=True)
class BirdScene:
    """The attributes of one image; everything a caption or a manifest row says."""

    species: str
    """One of ``ALL_SPECIES``."""
    time_of_day: str
    """One of ``TIMES_OF_DAY``."""
    facing: str
    """``left`` or ``right``."""
    artifacts: frozenset[str] = field(default_factory=frozenset)
    """The artifacts present, a subset of ``ARTIFACTS``."""

    @property
    def kind(self) -> str:
        return kind_of(self.species)

    @property
    def plumage(self) -> str:
        return PLUMAGE_OF[self.species]

    def metadata(self) -> dict[str, Any]:
        """Manifest columns: label, bird and light attributes, one ``has_*`` per artifact."""
        row: dict[str, Any] = {"label": self.kind, "species": self.species,
                               "plumage": self.plumage, "time_of_day": self.time_of_day,
                               "facing": self.facing}
        row.update({f"has_{a}": a in self.artifacts for a in ARTIFACTS})
        return row


def sample_scene(rng: np.random.Generator, *, label: str | None = None,
                 artifact_probs: Mapping[str, float] | None = None,
                 forced_artifacts: Mapping[str, bool] | None = None) -> BirdScene:
    """Draw a scene. ``label`` fixes the kind (else landbird/waterbird 50:50); each
    artifact is present with ``artifact_probs[a]`` (default 0.2) unless
    ``forced_artifacts`` says whether it is."""
    kind = label or CLASSES[int(rng.integers(2))]
    species = SPECIES[kind][int(rng.integers(len(SPECIES[kind])))]
    probs = {a: 0.2 for a in ARTIFACTS} | dict(artifact_probs or {})
    draws = rng.random(len(ARTIFACTS))
    present = {a for a, u in zip(ARTIFACTS, draws) if u < probs[a]}
    for a, on in (forced_artifacts or {}).items():
        present = present | {a} if on else present - {a}
    return BirdScene(species=species, time_of_day=TIMES_OF_DAY[int(rng.integers(3))],
                     facing=FACINGS[int(rng.integers(2))], artifacts=frozenset(present))


# ---------------------------------------------------------------- rendering

_H = _W = IMAGE_SIZE
_YY, _XX = np.mgrid[0:_H, 0:_W].astype(np.float32) + 0.5

_SKY = {"day": ((105, 160, 225), (190, 218, 242)), "dusk": ((85, 75, 140), (245, 155, 95)),
        "night": ((12, 18, 45), (45, 55, 100))}
"""Top and horizon colours of the sky."""
_LIGHT = {"day": (1.0, 1.0, 1.0), "dusk": (0.95, 0.75, 0.62), "night": (0.45, 0.5, 0.68)}
"""Per-channel factor the time of day applies to everything in the scene (not to the
frame and the watermark, which are added to the photo afterwards)."""
_LAND, _WATER = (95, 140, 62), (52, 102, 160)

# body, wing, head, beak colours of each species
_COLOURS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "sparrow": ((150, 110, 70), (100, 70, 45), (125, 100, 80), (60, 50, 40)),
    "crow": ((36, 36, 42), (24, 24, 30), (30, 30, 36), (18, 18, 18)),
    "canary": ((240, 210, 50), (175, 165, 60), (245, 222, 70), (230, 140, 40)),
    "cardinal": ((200, 30, 35), (150, 25, 30), (212, 40, 42), (240, 125, 40)),
    "gull": ((236, 236, 236), (160, 166, 178), (242, 242, 242), (235, 190, 40)),
    "heron": ((150, 156, 168), (108, 114, 130), (205, 205, 210), (222, 182, 60)),
    "cormorant": ((42, 42, 46), (30, 36, 36), (46, 46, 52), (172, 160, 120)),
    "duck": ((140, 100, 60), (98, 74, 50), (40, 112, 62), (232, 150, 40)),
}


def render_scene(scene: BirdScene, rng: np.random.Generator) -> np.ndarray:
    """The scene as a uint8 array [IMAGE_SIZE, IMAGE_SIZE, 3]; ``rng`` picks the layout."""
    return render_scene_with_masks(scene, rng).image


def render_scene_with_masks(scene: BirdScene, rng: np.random.Generator, *,
                            omit: Collection[str] = ()) -> Rendering:
    """The image and one mask per artifact painted. Artifacts of the scene named in
    ``omit`` draw their layout from ``rng`` exactly as if they were painted and are then
    left out, so a scene rendered with and without ``omit`` differs only inside that
    artifact's mask (a counterfactual pair)."""
    omit = frozenset(omit)
    arts = scene.artifacts
    paint = {a: a in arts and a not in omit for a in ARTIFACTS}
    horizon = int(rng.integers(int(0.3 * _H), int(0.45 * _H)))
    img = _sky(scene.time_of_day, horizon, rng)
    ground = _YY >= horizon
    land = _land(rng)
    water = _water(rng) if "water" in arts else None
    img = np.where(ground[..., None], water if paint["water"] and water is not None else land, img)
    layers: list[tuple[str, np.ndarray]] = []  # what each painted thing covers, in order
    if "water" in arts:
        layers.append(("water", ground))
    bird = _bird_layout(scene, horizon, rng)
    if "boat" in arts:
        layers.append(("boat", _composite(img, _boat(rng, bird), paint["boat"])))
    layers.append(("bird", _composite(img, _bird(scene, bird, rng), True)))
    if "branch" in arts:
        layers.append(("branch", _composite(img, _branch(rng, bird), paint["branch"])))
    img *= np.array(_LIGHT[scene.time_of_day], np.float32)
    if "grain" in arts:
        noise = rng.normal(0, rng.uniform(12, 20), (_H, _W, 3)).astype(np.float32)
        if paint["grain"]:
            grained = img + noise
            layers.append(("grain", (_quantise(grained) != _quantise(img)).any(-1)))
            img = grained
    if "frame" in arts:
        layers.append(("frame", _composite(img, _frame(rng), paint["frame"])))
    if "watermark" in arts:
        layers.append(("watermark", _composite(img, _watermark(rng), paint["watermark"])))
    painted = [(name, m) for name, m in layers if name == "bird" or paint[name]]
    return Rendering(_quantise(img), _visible(painted))


def _quantise(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _visible(painted: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each painted artifact's pixels minus what objects painted after it cover (a
    filter covers nothing)."""
    visible, hidden = {}, np.zeros((_H, _W), bool)
    for name, mask in reversed(painted):
        if name != "bird":
            visible[name] = mask & ~hidden
        if name not in FILTER_ARTIFACTS:
            hidden |= mask
    return {name: visible[name] for name, _ in painted if name != "bird"}


def _composite(img: np.ndarray, layer: Image.Image, paint: bool) -> np.ndarray:
    """Paint an RGBA layer's opaque pixels into ``img`` (in place, when ``paint``);
    return the mask of the pixels it covers."""
    rgba = np.asarray(layer)
    mask = rgba[..., 3] > 0
    if paint:
        img[mask] = rgba[..., :3][mask]
    return mask


def _layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("RGBA", (_W, _H), (0, 0, 0, 0))
    return layer, ImageDraw.Draw(layer)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, sd: float = 8.0
            ) -> tuple[int, int, int, int]:
    r, g, b = np.clip(np.array(rgb) + rng.normal(0, sd, 3), 0, 255).astype(int)
    return int(r), int(g), int(b), 255


def _sky(time_of_day: str, horizon: int, rng: np.random.Generator) -> np.ndarray:
    top, low = (np.array(c, np.float32) + rng.normal(0, 6, 3).astype(np.float32)
                for c in _SKY[time_of_day])
    t = np.clip(_YY / max(horizon, 1), 0, 1)[..., None]
    return (1 - t) * top + t * low + rng.normal(0, 2, (_H, _W, 1)).astype(np.float32)


def _land(rng: np.random.Generator) -> np.ndarray:
    """Grass: green with darker patches and tufts."""
    base = np.array(_LAND, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    fy, fx = rng.uniform(0.15, 0.4, 2)
    py, px = rng.uniform(0, 2 * np.pi, 2)
    patches = 14 * np.sin(fy * _YY + py) * np.sin(fx * _XX + px)
    tufts = rng.normal(0, 9, (_H, _W)).astype(np.float32)
    return base * (1 + (patches + tufts)[..., None] / 160)


def _water(rng: np.random.Generator) -> np.ndarray:
    """Water: blue with light horizontal ripples."""
    base = np.array(_WATER, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
    fy, fx = rng.uniform(0.9, 1.4), rng.uniform(0.15, 0.35)
    py, px = rng.uniform(0, 2 * np.pi, 2)
    ripples = np.clip(np.sin(fy * _YY + 1.5 * np.sin(fx * _XX + px) + py), 0.6, 1) - 0.6
    noise = rng.normal(0, 3, (_H, _W, 1)).astype(np.float32)
    return base + (ripples * 110)[..., None] + noise


@dataclass(frozen=True)
class _BirdLayout:
    x: float
    """Horizontal centre of the body."""
    feet: float
    """Row of the feet."""
    scale: float
    sign: int
    """+1 facing right, -1 facing left."""
    width: float
    """Horizontal half-extent of the bird (for placing the boat and branch)."""


def _bird_layout(scene: BirdScene, horizon: int, rng: np.random.Generator) -> _BirdLayout:
    scale = float(rng.uniform(0.9, 1.12))
    feet = float(rng.uniform(max(horizon + 22, 0.72 * _H), 0.88 * _H))
    x = _W / 2 + float(rng.uniform(-7, 7))
    width = (19 if scene.kind == "waterbird" else 12) * scale
    return _BirdLayout(x, feet, scale, 1 if scene.facing == "right" else -1, width)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float,
             n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + c * a - s * b, cy + s * a + c * b) for a, b in zip(x, y)]


def _bird(scene: BirdScene, at: _BirdLayout, rng: np.random.Generator) -> Image.Image:
    """The bird on its own layer. Coordinates below are for a bird facing right, in units
    of ``at.scale``; ``X`` mirrors them for a bird facing left."""
    body_c, wing_c, head_c, beak_c = (_jitter(c, rng) for c in _COLOURS[scene.species])
    leg_c = _jitter((70, 60, 50) if scene.species in ("sparrow", "crow", "cardinal", "canary")
                    else (200, 150, 60), rng, 10)
    s, sign = at.scale, at.sign

    def X(dx: float) -> float:
        return at.x + sign * dx * s

    def Y(dy: float) -> float:
        return at.feet + dy * s

    layer, draw = _layer()
    tilt = float(rng.uniform(-0.12, 0.12))
    if scene.kind == "landbird":  # small, upright, round
        legs, body_y = 4.5, -4.5 - 5.5
        draw.line([(X(-1.5), Y(0)), (X(-1.5), Y(-legs - 1))], fill=leg_c, width=1)
        draw.line([(X(1.5), Y(0)), (X(1.5), Y(-legs - 1))], fill=leg_c, width=1)
        draw.polygon([(X(-4), Y(body_y + 1)), (X(-11), Y(body_y + 6)), (X(-10), Y(body_y + 8)),
                      (X(-3), Y(body_y + 4))], fill=wing_c)  # tail, pointing down and back
        draw.polygon(_ellipse(X(0), Y(body_y), 7 * s, 5.5 * s, sign * (-0.5 + tilt)), fill=body_c)
        draw.polygon(_ellipse(X(-1.5), Y(body_y + 0.5), 4.5 * s, 3 * s, sign * (-0.4 + tilt)),
                     fill=wing_c)
        hx, hy, hr = 5.0, body_y - 6.5, 4.0
        draw.ellipse([X(hx) - hr * s, Y(hy) - hr * s, X(hx) + hr * s, Y(hy) + hr * s], fill=head_c)
        draw.polygon([(X(hx + 3), Y(hy - 1.5)), (X(hx + 7.5), Y(hy + 0.3)), (X(hx + 3), Y(hy + 1.8))],
                     fill=beak_c)  # short and conical
    else:  # long and low, long neck, long beak, long legs
        legs, body_y = 11.0, -11.0 - 4.5
        for dx, knee in ((-2.5, -1.5), (2.5, 1.0)):
            draw.line([(X(dx + knee), Y(0)), (X(dx), Y(-legs / 2)), (X(dx), Y(-legs - 1))],
                      fill=leg_c, width=1)
        draw.polygon([(X(-9), Y(body_y - 1)), (X(-15), Y(body_y - 3)), (X(-14), Y(body_y + 1.5)),
                      (X(-8), Y(body_y + 2))], fill=wing_c)  # short tail
        draw.polygon(_ellipse(X(0), Y(body_y), 11 * s, 4.5 * s, sign * tilt), fill=body_c)
        draw.polygon(_ellipse(X(-2), Y(body_y - 0.5), 7 * s, 2.8 * s, sign * tilt), fill=wing_c)
        bend = float(rng.uniform(-2, 2))
        hx, hy, hr = 10.0 + bend / 2, body_y - 13.0, 3.0
        draw.line([(X(8), Y(body_y - 1)), (X(11 + bend), Y(body_y - 7)), (X(hx), Y(hy))],
                  fill=body_c, width=max(2, round(2.6 * s)))
        draw.ellipse([X(hx) - hr * s, Y(hy) - hr * s, X(hx) + hr * s, Y(hy) + hr * s], fill=head_c)
        draw.polygon([(X(hx + 2), Y(hy - 1)), (X(hx + 11), Y(hy + 1.2)), (X(hx + 2), Y(hy + 1))],
                     fill=beak_c)  # long and thin
    draw.point((X(hx + 1.2), Y(hy - 1)), fill=(10, 10, 10, 255))  # the eye
    return layer


def _boat(rng: np.random.Generator, bird: _BirdLayout) -> Image.Image:
    """A small sailing boat low in the picture, beside the bird."""
    width = float(rng.uniform(13, 18))
    left = rng.random() < 0.5
    x0 = float(rng.uniform(1, 5)) if left else _W - width - float(rng.uniform(1, 5))
    base = bird.feet - float(rng.uniform(5, 12))
    hull = _jitter([(150, 40, 35), (235, 235, 228), (90, 60, 40)][int(rng.integers(3))], rng, 6)
    sail = _jitter((245, 240, 225), rng, 5)
    layer, draw = _layer()
    draw.polygon([(x0, base - 4), (x0 + width, base - 4), (x0 + width - 3, base), (x0 + 3, base)],
                 fill=hull)
    mast = x0 + width * float(rng.uniform(0.4, 0.6))
    height = float(rng.uniform(11, 15))
    draw.line([(mast, base - 4), (mast, base - 4 - height)], fill=(60, 45, 35, 255), width=1)
    draw.polygon([(mast + 1, base - 6), (mast + 1, base - 4 - height),
                  (mast + 1 + width * 0.45, base - 6)], fill=sail)
    return layer


def _branch(rng: np.random.Generator, bird: _BirdLayout) -> Image.Image:
    """A branch under the bird's feet, from one edge of the picture to past the bird."""
    wood = _jitter((96, 66, 40), rng, 8)
    leaf = _jitter((60, 120, 45), rng, 10)
    from_left = rng.random() < 0.5
    reach = bird.width + float(rng.uniform(2, 8))
    x0, x1 = (0.0, bird.x + reach) if from_left else (float(_W), bird.x - reach)
    y0 = bird.feet + float(rng.uniform(0, 4))
    y1 = bird.feet + 1
    layer, draw = _layer()
    draw.line([(x0, y0), (x1, y1)], fill=wood, width=int(rng.integers(2, 4)))
    for t in rng.uniform(0.1, 0.9, 2):  # twigs with a leaf each
        px, py = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        tx, ty = px + float(rng.uniform(-5, 5)), py + float(rng.choice([-1, 1])) * float(rng.uniform(3, 6))
        draw.line([(px, py), (tx, ty)], fill=wood, width=1)
        draw.ellipse([tx - 2, ty - 1.5, tx + 2, ty + 1.5], fill=leaf)
    return layer


def _frame(rng: np.random.Generator) -> Image.Image:
    """A border round the photo."""
    width = int(rng.integers(2, 5))
    colour = _jitter([(246, 244, 236), (22, 22, 24), (128, 84, 46)][int(rng.integers(3))], rng, 4)
    layer, draw = _layer()
    draw.rectangle([0, 0, _W - 1, _H - 1], outline=colour, width=width)
    return layer


# A 3 x 5 pixel font for the watermark; "@" stands for the copyright sign.
_GLYPHS = {
    "@": ("###", "#..", "#..", "#..", "###"), "0": ("###", "#.#", "#.#", "#.#", "###"),
    "1": (".#.", "##.", ".#.", ".#.", "###"), "2": ("##.", "..#", ".#.", "#..", "###"),
    "9": ("###", "#.#", "###", "..#", "##."), "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"), "K": ("#.#", "##.", "#..", "##.", "#.#"),
    "M": ("#.#", "###", "###", "#.#", "#.#"), "O": ("###", "#.#", "#.#", "#.#", "###"),
    "P": ("##.", "#.#", "##.", "#..", "#.."), "T": ("###", ".#.", ".#.", ".#.", ".#."),
}
_MARKS = tuple(_GLYPHS)


def _watermark(rng: np.random.Generator) -> Image.Image:
    """A copyright sign and a few letters or digits, light with a dark shadow, in a corner."""
    text = "@" + "".join(_MARKS[int(i)] for i in rng.integers(1, len(_MARKS), int(rng.integers(3, 6))))
    width = 4 * len(text) - 1
    corner = int(rng.integers(4))
    x0 = int(rng.integers(5, 8)) if corner in (0, 2) else _W - width - int(rng.integers(6, 9))
    y0 = int(rng.integers(5, 8)) if corner in (0, 1) else _H - 5 - int(rng.integers(6, 9))
    ink = _jitter((250, 250, 250), rng, 3)
    layer, draw = _layer()
    for dx, dy, colour in ((1, 1, (25, 25, 25, 255)), (0, 0, ink)):  # shadow first
        for k, ch in enumerate(text):
            for row, bits in enumerate(_GLYPHS[ch]):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        draw.point((x0 + 4 * k + col + dx, y0 + row + dy), fill=colour)
    return layer
