"""Artifact masks of synthetic data sets: where each artifact sits in each image.

Stored as ``masks/<image file stem>.png`` beside ``images/``: a uint8 single-channel PNG
of the image's size in which bit ``i`` is set where artifact ``artifacts[i]`` is
visible (``ground_truth.json["masks"]["bits"]`` maps names to bits). A pixel belongs to
the artifact painted last over it, so the masks of objects never overlap: a band-aid
lying across a ruler takes those pixels out of the ruler's mask. Drawn objects (ruler,
band-aid, ink marker; boat, branch, frame, watermark) mask their own pixels, hair its
strands, the vignette every pixel it darkened, the birds world's water the ground it
covers. A filter covers nothing (the birds world's film grain): its mask is every pixel
it changed, and it overlaps the masks of the artifacts it lies over, whose pixels still
differ because of them. In every case an image rendered without one artifact differs
from the image with it only inside that artifact's mask. An artifact that is not in an
image has an empty mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipaudit.artifacts import read_json
from clipaudit.errors import InputError
from clipaudit.synthetic._layout import GROUND_TRUTH_NAME, MASKS_DNAME

MASK_DEFINITION = ("bit i set where artifact i is visible: the pixels it changed that no "
                   "artifact painted after it covers (objects: their pixels; hair: the strands; "
                   "vignette: the darkened corners; a filter such as film grain covers nothing "
                   "and overlaps the masks under it)")


def encode_masks(masks: Mapping[str, np.ndarray], artifacts: Sequence[str],
                 shape: tuple[int, int]) -> np.ndarray:
    """Bool masks per artifact -> one uint8 [H, W] array, bit i = ``artifacts[i]``."""
    if len(artifacts) > 8:
        raise ValueError(f"a uint8 mask holds 8 artifacts, this world has {len(artifacts)}")
    bits = np.zeros(shape, np.uint8)
    for i, name in enumerate(artifacts):
        if name in masks:
            bits |= masks[name].astype(np.uint8) << i
    return bits


def save_mask_png(fpath: Path, masks: Mapping[str, np.ndarray], artifacts: Sequence[str],
                  shape: tuple[int, int]) -> None:
    Image.fromarray(encode_masks(masks, artifacts, shape)).save(fpath, compress_level=1)


def mask_fpath(dataset_dpath: Path | str, image_path: Path | str) -> Path:
    """Where the mask of ``image_path`` (relative to the data set, or absolute) lives."""
    dpath = Path(dataset_dpath)
    image = Path(image_path)
    if image.is_absolute():
        try:
            image.resolve().relative_to(dpath.resolve())
        except ValueError:
            raise InputError(f"{image}: not an image of the data set {dpath}") from None
    return dpath / MASKS_DNAME / f"{image.stem}.png"


def load_artifact_masks(dataset_dpath: Path | str, image_path: Path | str) -> dict[str, np.ndarray]:
    """Every artifact's mask of one image: name -> bool [H, W] (empty where absent)."""
    bits_of = _mask_bits(Path(dataset_dpath))
    bits = _read_bits(mask_fpath(dataset_dpath, image_path))
    return {name: (bits >> bit) & 1 == 1 for name, bit in bits_of.items()}


def load_artifact_mask(dataset_dpath: Path | str, image_path: Path | str,
                       artifact: str) -> np.ndarray:
    """Where ``artifact`` is visible in ``image_path`` (as written in the data set's
    manifest, relative or absolute): a bool array [H, W], all False when the image has
    no such artifact. An ``InputError`` when the data set has no masks (written before
    clipaudit stored them), the artifact is unknown or the image has no mask."""
    dpath = Path(dataset_dpath)
    bits_of = _mask_bits(dpath)
    if artifact not in bits_of:
        raise InputError(f"{dpath}: unknown artifact {artifact!r}. "
                         f"Available: {', '.join(bits_of)}")
    return (_read_bits(mask_fpath(dpath, image_path)) >> bits_of[artifact]) & 1 == 1


def _mask_bits(dpath: Path) -> dict[str, int]:
    truth = read_json(dpath / GROUND_TRUTH_NAME, "synthetic-dataset")
    masks: Any = truth.get("masks")
    if not masks:
        raise InputError(f"{dpath}: this data set has no artifact masks (schema version "
                         f"{truth.get('schema_version')}, written before clipaudit stored "
                         "them); generate it again to get masks")
    return {str(k): int(v) for k, v in masks["bits"].items()}


def _read_bits(fpath: Path) -> np.ndarray:
    if not fpath.is_file():
        raise InputError(f"{fpath}: no mask for this image (is it an image of this data set?)")
    with Image.open(fpath) as im:
        if im.mode != "L":
            raise InputError(f"{fpath}: expected a single-channel 8-bit mask, found mode {im.mode}")
        return np.asarray(im)
