"""How well a heatmap points at a known region (the synthetic worlds' artifact masks).

- ``pointing_hit``: the pointing game. The map's maximum patch counts as a hit when it
  lies in the mask at patch resolution (a patch is in the mask when any of its pixels
  is), dilated by ``tolerance`` patches; ties at the maximum are a hit only when every
  tied patch is (an all-zero map never scores).
- ``mass_inside``: the share of the map's positive mass inside the mask, each patch's
  mass spread evenly over its pixels (so a patch half covered counts half).
- ``mask_area``: the share of the view the mask covers, the mass a map spread evenly
  over the image would score (the chance level of ``mass_inside``).

Masks are bool arrays over the model's view [rows * patch_h, cols * patch_w]
(``clipaudit.attribution.overlays.view_mask`` maps an image's mask there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patch_coverage(mask: np.ndarray, grid: Sequence[int], patch_px: Sequence[int]) -> np.ndarray:
    """[rows, cols]: the share of each patch's pixels inside the mask."""
    rows, cols = int(grid[0]), int(grid[1])
    ph, pw = int(patch_px[0]), int(patch_px[1])
    if mask.shape != (rows * ph, cols * pw):
        raise ValueError(f"mask of shape {mask.shape} does not cover a {rows}x{cols} grid of "
                         f"{ph}x{pw} patches")
    return mask.reshape(rows, ph, cols, pw).mean(axis=(1, 3))


def _dilate(cells: np.ndarray, steps: int) -> np.ndarray:
    out = cells.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, 1:] |= out[:-1, :-1]
        grown[:-1, :-1] |= out[1:, 1:]
        grown[1:, :-1] |= out[:-1, 1:]
        grown[:-1, 1:] |= out[1:, :-1]
        out = grown
    return out


def pointing_hit(heat: np.ndarray, mask: np.ndarray, patch_px: Sequence[int],
                 tolerance: int = 1) -> bool:
    """Whether the map's maximum falls inside the mask dilated by ``tolerance`` patches."""
    heat = np.asarray(heat, np.float64)
    inside = _dilate(patch_coverage(mask, heat.shape, patch_px) > 0, tolerance)
    top = heat.max()
    if not np.isfinite(top) or not inside.any() or np.all(heat == 0):
        return False
    return bool(inside[heat == top].all())


def mass_inside(heat: np.ndarray, mask: np.ndarray, patch_px: Sequence[int]) -> float:
    """The share of the map's positive mass inside the mask (0 for a map with none)."""
    pos = np.clip(np.asarray(heat, np.float64), 0, None)
    total = pos.sum()
    if total <= 0:
        return 0.0
    return float((pos * patch_coverage(mask, pos.shape, patch_px)).sum() / total)


def mask_area(mask: np.ndarray) -> float:
    return float(np.asarray(mask, bool).mean())
