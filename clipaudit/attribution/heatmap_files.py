"""The audit's heatmaps: one per finding component and top image, written to ``heatmaps/``.

The audit calls ``add_heatmaps`` once, with the components its findings name. The
model runs again on those components' top images only (a few per finding), at the
audit's hook point and with its SAE, and the folder gets, per (component, image):

- ``heatmaps/c<component>-i<instance>-overlay.png``: the model's view of the image
  with the map over it, the peak patch outlined;
- ``heatmaps/c<component>-i<instance>-map.png``: the map alone at patch resolution;

and ``heatmaps/heatmaps.safetensors`` (versioned, kind ``heatmaps``) with every map's
values (``load_heatmap_values``). A tower without patch tokens gets no maps; the
audit result says why, and the report repeats it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipaudit.artifacts import atomic_path, load_tensors, save_tensors
from clipaudit.attribution.heatmaps import (
    DEFAULT_METHOD,
    Heatmaps,
    NoSpatialTokensError,
    check_method,
    component_heatmaps,
    list_heatmap_methods,
)
from clipaudit.attribution.overlays import model_view, render_map, render_overlay
from clipaudit.extraction.hooks import HookPoint
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.results import ComponentHeatmap, ComponentInfo, HeatmapsInfo
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)

HEATMAPS_DNAME = "heatmaps"
HEATMAPS_FNAME = "heatmaps.safetensors"


@dataclass(frozen=True)
class HeatmapConfig:
    """Heatmaps of each finding's top images: where the component's activation comes from."""

    enabled: bool = True
    """Make heatmaps (the model runs again on each finding's few top images)."""
    method: str = DEFAULT_METHOD
    """relevance (complete gradient x input; the default), gradient, activation or occlusion."""
    image_px: int = 192
    """Side of the overlay and map PNGs, in pixels."""
    batch_size: int = 32
    """Images per forward and backward pass."""


def _key(component: int, instance: int) -> str:
    return f"c{component}-i{instance}"


def add_heatmaps(components: Sequence[ComponentInfo], index: Any, model: Any,
                 preprocess: Any, sae: SAE, hook: HookPoint | Mapping[str, Any],
                 out_dpath: Path | str, config: HeatmapConfig = HeatmapConfig(), *,
                 reporter: Reporter = NULL_REPORTER) -> tuple[list[ComponentInfo], HeatmapsInfo | None]:
    """``components`` with a heatmap per top image, and how they were made (None when
    heatmaps are turned off or there is no component to map).

    ``index``: the table of the images the top instances are ids of (columns ``id`` and
    ``path``). Images that cannot be read are skipped (logged), as for thumbnails.
    """
    components = list(components)
    if not config.enabled or not components:  # nothing asked for, or no finding to map
        return components, None
    check_method(config.method)
    if not isinstance(hook, HookPoint):
        hook = HookPoint.from_dict(hook)
    dpath = Path(out_dpath) / HEATMAPS_DNAME
    if dpath.is_dir():  # maps of an earlier audit in this folder would be stale
        shutil.rmtree(dpath)
    views = _read_views(sorted({i for c in components for i in c.top_instances}), index, preprocess)
    pairs = [(c.component, i) for c in components for i in c.top_instances if i in views]
    if not pairs:
        return components, HeatmapsInfo(method=None, note="no top image could be read")
    device = next(iter(getattr(model, "parameters", lambda: iter([torch.zeros(0)]))())).device
    images = torch.stack([views[i][0] for _, i in pairs]).to(device)
    with reporter.task("heatmaps", total=len(pairs)) as task:
        try:
            maps = component_heatmaps(images, [j for j, _ in pairs], sae, model, hook,
                                      method=config.method, batch_size=config.batch_size)
        except NoSpatialTokensError as e:
            log.warning("no heatmaps: %s", e)
            return components, HeatmapsInfo(method=None, note=str(e))
        task.advance(len(pairs))
    by_pair = _write_files(maps, pairs, views, dpath, config.image_px)
    save_tensors(dpath / HEATMAPS_FNAME, "heatmaps",
                 {_key(j, i): maps.maps[n] for n, (j, i) in enumerate(pairs)},
                 meta={"method": maps.method, "grid": list(maps.grid),
                       "patch_px": list(maps.patch_px)},
                 provenance={"hook": {"layer": hook.layer, "token": hook.token},
                             "sae_backbone": (getattr(sae, "meta", {}).get("backbone") or {}).get("id"),
                             "n_latents": int(sae.n_latents)})
    updated = [dataclasses.replace(c, heatmaps=[by_pair[(c.component, i)] for i in c.top_instances
                                                if (c.component, i) in by_pair])
               for c in components]
    note = (f"{maps.method}: {list_heatmap_methods()[maps.method]}; "
            f"{maps.grid[0]}x{maps.grid[1]} patches")
    return updated, HeatmapsInfo(method=maps.method, grid=list(maps.grid),
                                 file=f"{HEATMAPS_DNAME}/{HEATMAPS_FNAME}", note=note)


def _read_views(ids: Sequence[int], index: Any, preprocess: Any) -> dict[int, tuple[torch.Tensor, Any]]:
    from clipaudit.extraction.data import ImageDecodeError, decode_image

    path_of = dict(zip(index["id"].astype(int), index["path"].astype(str)))
    views = {}
    for iid in ids:
        if iid not in path_of:
            log.warning("heatmaps: instance %d is not in the index", iid)
            continue
        try:
            views[iid] = model_view(preprocess, decode_image(path_of[iid]))
        except ImageDecodeError as e:
            log.warning("heatmaps: skipping instance %d (%s)", iid, e)
    return views


def _write_files(maps: Heatmaps, pairs: Sequence[tuple[int, int]],
                 views: Mapping[int, tuple[torch.Tensor, Any]], dpath: Path,
                 px: int) -> dict[tuple[int, int], ComponentHeatmap]:
    dpath.mkdir(parents=True, exist_ok=True)
    peaks = maps.peaks().tolist()
    out = {}
    for n, (j, i) in enumerate(pairs):
        heat = maps.maps[n].numpy()
        name = _key(j, i)
        for suffix, image in (("overlay", render_overlay(views[i][1], heat, px, peaks[n])),
                              ("map", render_map(heat, px, peaks[n]))):
            with atomic_path(dpath / f"{name}-{suffix}.png") as tmp:
                image.save(tmp, format="PNG")
        out[(j, i)] = ComponentHeatmap(
            instance=i, overlay=f"{HEATMAPS_DNAME}/{name}-overlay.png",
            map=f"{HEATMAPS_DNAME}/{name}-map.png", peak=[int(p) for p in peaks[n]],
            activation=round(float(maps.activations[n]), 6))
    return out


def load_heatmap_values(audit_dpath: Path | str) -> dict[tuple[int, int], np.ndarray]:
    """Every map an audit wrote: (component, instance) -> [rows, cols] values."""
    fpath = Path(audit_dpath) / HEATMAPS_DNAME / HEATMAPS_FNAME
    tensors = load_tensors(fpath, "heatmaps").tensors
    out = {}
    for key, value in tensors.items():
        comp, inst = key.split("-")
        out[(int(comp[1:]), int(inst[1:]))] = value.numpy()
    return out
