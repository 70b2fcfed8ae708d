"""Attributions as a record: per-instance, per-class attributions stored sparsely (the
active components only), built batch by batch and joined."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipaudit.heads import Head


@dataclass(frozen=True)
class Attributions:
    """Per-instance attributions for every class, stored sparsely (active components only).

    Row ``r`` of the sparse part is instance ``rows[r]`` (a position in ``ids``),
    component ``components[r]`` with activation ``activations[r]`` (summed over
    tokens for spatial hook points) and attributions ``values[r, c]``.
    """

    ids: torch.Tensor
    """[n] instance ids."""
    class_names: list[str]
    n_latents: int
    rows: torch.Tensor
    """[nnz] position of each entry's instance in ``ids``."""
    components: torch.Tensor
    """[nnz] SAE component index."""
    activations: torch.Tensor
    """[nnz] z[n, j]."""
    values: torch.Tensor
    """[nnz, C] A[n, j, c]."""
    error: torch.Tensor
    """[n, C] A_err: the evidence the SAE does not reconstruct."""
    bias: torch.Tensor
    """[n, C] A_bias: b_dec and downstream constant terms."""
    scores: torch.Tensor
    """[n, C] y_c, exact."""
    head_bias: torch.Tensor
    """[C] b_c."""

    @property
    def predictions(self) -> torch.Tensor:
        return self.scores.argmax(dim=1)

    def dense(self) -> torch.Tensor:
        """A as a dense [n, n_latents, C] tensor (small data only)."""
        out = torch.zeros(len(self.ids), self.n_latents, len(self.class_names))
        out.index_put_((self.rows, self.components), self.values, accumulate=True)
        return out

    def to_parquet(self, fpath: Path | str, provenance: dict[str, Any] | None = None) -> Path:
        """Long table: one row per (instance, active component, class)."""
        import pyarrow as pa

        from clipaudit.artifacts import write_parquet

        n_classes = len(self.class_names)
        nnz = len(self.rows)
        table = pa.table({
            "instance_id": np.repeat(self.ids[self.rows].numpy(), n_classes),
            "component": np.repeat(self.components.numpy().astype(np.int32), n_classes),
            "activation": np.repeat(self.activations.numpy(), n_classes),
            "class": pa.DictionaryArray.from_arrays(
                np.tile(np.arange(n_classes, dtype=np.int32), nnz), self.class_names),
            "attribution": self.values.reshape(-1).numpy(),
        })
        return write_parquet(fpath, "attributions", table,
                             meta={"class_names": self.class_names, "n_latents": self.n_latents},
                             provenance=provenance)

    def instance_table(self) -> Any:
        """pandas DataFrame: instance_id, class, score, error, bias, head_bias."""
        import pandas as pd

        n, c = self.scores.shape
        return pd.DataFrame({
            "instance_id": np.repeat(self.ids.numpy(), c),
            "class": np.tile(np.asarray(self.class_names, dtype=object), n),
            "score": self.scores.reshape(-1).numpy(),
            "error": self.error.reshape(-1).numpy(),
            "bias": self.bias.reshape(-1).numpy(),
        })


def sparse_part(ids, idx, z, values, error, bias, scores) -> dict[str, torch.Tensor]:
    b, k = idx.shape
    keep = (z != 0).reshape(-1)
    rows = torch.arange(b).repeat_interleave(k)[keep]
    return {"ids": ids.long(), "rows": rows, "components": idx.reshape(-1)[keep],
            "activations": z.reshape(-1)[keep], "values": values.reshape(b * k, -1)[keep],
            "error": error, "bias": bias, "scores": scores}


def assemble(parts: list[dict[str, torch.Tensor]], head: Head, n_latents: int,
              head_bias: torch.Tensor) -> Attributions:
    n_classes = len(head.class_names)
    if not parts:
        empty = torch.zeros(0, n_classes)
        return Attributions(torch.zeros(0, dtype=torch.long), list(head.class_names), n_latents,
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0), empty, empty, empty, empty, head_bias.detach().cpu())
    offsets = np.cumsum([0] + [len(p["ids"]) for p in parts[:-1]])
    cat = {key: torch.cat([p[key].detach().cpu() for p in parts]) for key in parts[0] if key != "rows"}
    rows = torch.cat([p["rows"] + int(off) for p, off in zip(parts, offsets)])
    return Attributions(cat["ids"], list(head.class_names), n_latents, rows, cat["components"],
                        cat["activations"].float(), cat["values"].float(), cat["error"].float(),
                        cat["bias"].float(), cat["scores"].float(), head_bias.detach().cpu().float())


def spatial_part(ids, idx, z, values, error, bias, scores, head, n_latents, head_bias) -> Attributions:
    """Sum token-level (instance, component) entries into one entry per instance and component."""
    b, t, k = idx.shape
    n_classes = values.shape[-1]
    flat = idx.reshape(b, t * k)
    key = torch.arange(b)[:, None] * n_latents + flat
    keep = (z.reshape(b, t * k) != 0).reshape(-1)
    uniq, inverse = torch.unique(key.reshape(-1)[keep], return_inverse=True)
    acts = torch.zeros(len(uniq)).index_add_(0, inverse, z.reshape(-1)[keep])
    vals = torch.zeros(len(uniq), n_classes).index_add_(
        0, inverse, values.detach().reshape(-1, n_classes)[keep])
    return Attributions(ids.long(), list(head.class_names), n_latents, uniq // n_latents,
                        uniq % n_latents, acts, vals, error.detach(), bias.detach(),
                        scores, head_bias.detach().cpu())


def concat_attributions(parts: Sequence[Attributions]) -> Attributions:
    """Join per-batch attributions (same head and SAE) into one."""
    first = parts[0]
    offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    return Attributions(
        torch.cat([p.ids for p in parts]), first.class_names, first.n_latents,
        torch.cat([p.rows + int(o) for p, o in zip(parts, offsets)]),
        torch.cat([p.components for p in parts]), torch.cat([p.activations for p in parts]),
        torch.cat([p.values for p in parts]), torch.cat([p.error for p in parts]),
        torch.cat([p.bias for p in parts]), torch.cat([p.scores for p in parts]), first.head_bias)
