"""The optional per-instance attribution table: partitioned, compact Parquet.

``attributions-<head>/part-NNNNN.parquet``, one part per cache shard, readable as one
table (``pandas.read_parquet(folder)``, ``pyarrow.dataset``). One row per instance,
kept class and active component:

    instance_id  int64
    class        dictionary<int32, string>   the head's class names
    component    int32
    activation   float16                     z[n, j]
    attribution  float16                     A[n, j, c]
    score        float16                     y_c of the instance (repeated on its rows)
    error        float16                     A_err[n, c]
    bias         float16                     A_bias[n, c]; with the head's bias b_c (in the
                                             header), sum(attribution) + error + bias + b_c = score
    is_label     bool                        c is the instance's label
    is_pred      bool                        c is its predicted class

Which classes are kept per instance (``AttributionTableConfig.classes``):
``label+pred`` its label and its predicted class (one class when they agree),
``top3`` those and its three highest-scoring classes, ``all`` every class (C rows per
active component: large). Values are float16 (3 significant digits; a value beyond
float16's range, 65504, is stored as inf and logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipaudit.attribution.stream import BatchAttribution

log = logging.getLogger(__name__)

ATTRIBUTION_CLASSES = ("label+pred", "top3", "all")


@dataclass(frozen=True)
class AttributionTableConfig:
    """The optional per-instance attribution table (the report never needs it)."""

    write: bool = False
    """Write attributions-<head>/ (Parquet parts): per instance, kept class and active
    component. Off by default: at a million instances it is gigabytes."""
    classes: str = "label+pred"
    """Classes kept per instance: label+pred, top3 (those and the 3 top-scoring) or all."""


def kept_classes(mode: str, scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """long [b, r]: the classes kept per instance (-1 pads rows with fewer)."""
    b, n_classes = scores.shape
    pred = scores.argmax(1)
    if mode == "all":
        return torch.arange(n_classes).expand(b, n_classes)
    parts = [truth[:, None], pred[:, None]]
    if mode == "top3":
        parts.append(scores.topk(min(3, n_classes), dim=1).indices)
    elif mode != "label+pred":
        raise ValueError(f"unknown attribution classes {mode!r}; use {', '.join(ATTRIBUTION_CLASSES)}")
    cand = torch.cat(parts, 1)
    # drop repeats (keep the first) and unknown labels
    dup = (cand[:, :, None] == cand[:, None, :]).tril(-1).any(2)
    cand = torch.where(dup | (cand < 0), torch.full_like(cand, -1), cand)
    return cand


class AttributionTableWriter:
    """Writes one head's table part by part (one part per ``flush``)."""

    def __init__(self, dpath: Path, class_names: list[str], mode: str,
                 provenance: dict[str, Any]) -> None:
        self.dpath, self.class_names, self.mode = Path(dpath), list(class_names), mode
        self.dpath.mkdir(parents=True, exist_ok=True)
        self.meta: dict[str, Any] = {"class_names": self.class_names, "classes_kept": mode}
        self.provenance = provenance
        self._pending: list[dict[str, np.ndarray]] = []
        self._part = 0
        self._overflow = 0

    def add(self, ids: torch.Tensor, batch: BatchAttribution, truth: torch.Tensor) -> None:
        """A batch: instance ids [b], its attributions and labels (class index, -1 unknown)."""
        self.meta["head_bias"] = [float(x) for x in batch.readout.head_bias]
        classes = kept_classes(self.mode, batch.scores, truth)  # [b, r]
        valid = classes >= 0
        safe = classes.clamp_min(0)
        comp = batch.components(safe)  # [b, k, r]
        err, bias = batch.error(safe), batch.bias(safe)
        score = batch.scores.gather(1, safe)
        fired = batch.values != 0  # [b, k]
        mask = fired[:, :, None] & valid[:, None, :]  # [b, k, r]
        b, k, r = comp.shape
        inst = torch.arange(b)[:, None, None].expand(b, k, r)[mask]
        cls = safe[:, None, :].expand(b, k, r)[mask]
        pred = batch.predictions
        self._pending.append({
            "instance_id": ids.long()[inst].numpy(),
            "class": cls.numpy().astype(np.int32),
            "component": batch.indices[:, :, None].expand(b, k, r)[mask].numpy().astype(np.int32),
            "activation": self._f16(batch.values[:, :, None].expand(b, k, r)[mask]),
            "attribution": self._f16(comp[mask]),
            "score": self._f16(score[:, None, :].expand(b, k, r)[mask]),
            "error": self._f16(err[:, None, :].expand(b, k, r)[mask]),
            "bias": self._f16(bias[:, None, :].expand(b, k, r)[mask]),
            "is_label": (cls == truth[inst]).numpy(),
            "is_pred": (cls == pred[inst]).numpy(),
        })

    def _f16(self, x: torch.Tensor) -> np.ndarray:
        out = x.float().numpy().astype(np.float16)
        self._overflow += int(np.isinf(out).sum() - np.isinf(x.numpy()).sum())
        return out

    def flush(self) -> Path | None:
        """Write what was added since the last flush as the next part."""
        import pyarrow as pa

        from clipaudit.artifacts import write_parquet

        if not self._pending:
            return None
        cols = {key: np.concatenate([p[key] for p in self._pending]) for key in self._pending[0]}
        self._pending = []
        arrays = {key: pa.array(v) for key, v in cols.items() if key != "class"}
        arrays["class"] = pa.DictionaryArray.from_arrays(pa.array(cols["class"]),
                                                          pa.array(self.class_names))
        order = ["instance_id", "class", "component", "activation", "attribution", "score",
                 "error", "bias", "is_label", "is_pred"]
        fpath = self.dpath / f"part-{self._part:05d}.parquet"
        write_parquet(fpath, "attributions", pa.table({k: arrays[k] for k in order}),
                      meta=self.meta, provenance=self.provenance)
        self._part += 1
        return fpath

    def close(self) -> Path:
        self.flush()
        if self._overflow:
            log.warning("%s: %d attribution values exceed float16's range and are stored as inf",
                        self.dpath, self._overflow)
        return self.dpath
