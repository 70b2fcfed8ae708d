"""A finding's evidence from sparse codes: where its component fires, and how well its
activation predicts each metadata column (ROC AUC), without a dense column per instance.

A component fires on a small part of the data (k of n_latents components per
instance), so the instances where it is non-zero describe its activation completely:
every other instance scores 0. ``firing_rows`` collects them for a few components in
one pass over the codes; ``sparse_roc_auc`` computes the exact ROC AUC (ties counted
half, as ``sklearn.metrics.roc_auc_score`` does) from them and the column's counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

_ROWS_BUDGET = 1 << 23
"""Firing entries collected per pass over the codes (64 MB of positions and values)."""


@dataclass(frozen=True)
class Firing:
    """Where one component is non-zero: row positions (ascending) and activations."""

    positions: np.ndarray
    """int64 [f]."""
    values: np.ndarray
    """float32 [f], all > 0 (or != 0 for SAEs without ReLU)."""


def firing_rows(chunks_fn, components: Sequence[int], counts: torch.Tensor | None = None
                ) -> Iterable[dict[int, Firing]]:
    """Yield {component: Firing} for ``components``, as few at a time as keep the entries
    collected under a budget (``counts`` [n_latents]: firings per component, from the
    first pass), each group from one pass over ``chunks_fn()`` (an iterator of
    (first row, indices [c, k], values [c, k]))."""
    components = [int(j) for j in dict.fromkeys(components)]
    groups: list[list[int]] = [[]]
    used = 0
    for j in components:
        need = int(counts[j]) if counts is not None else _ROWS_BUDGET // 8
        if groups[-1] and used + need > _ROWS_BUDGET:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += need
    for group in groups:
        if not group:
            continue
        wanted = torch.tensor(group, dtype=torch.long)
        parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {j: [] for j in group}
        for start, idx, val in chunks_fn():
            hit = torch.isin(idx, wanted) & (val != 0)
            if not bool(hit.any()):
                continue
            rows, slots = hit.nonzero(as_tuple=True)
            comps = idx[rows, slots]
            vals = val[rows, slots]
            for j in torch.unique(comps).tolist():
                mine = comps == j
                parts[j].append(((rows[mine] + start).numpy(), vals[mine].numpy()))
        yield {j: Firing(np.concatenate([p for p, _ in parts[j]]) if parts[j] else np.zeros(0, np.int64),
                         np.concatenate([v for _, v in parts[j]]) if parts[j] else np.zeros(0, np.float32))
               for j in group}


@dataclass(frozen=True)
class BinaryColumn:
    """A metadata column with two values: which instances are positive, which known."""

    name: str
    positive: np.ndarray
    """bool [n]."""
    known: np.ndarray
    """bool [n]."""
    n_pos: int
    n_neg: int


def binary_columns(metadata: pd.DataFrame) -> list[BinaryColumn]:
    """The column keys ``metadata_aucs`` scores (``clipaudit.columns.column_keys``: every
    binary column, and every value of a categorical one), as positive/known masks."""
    from clipaudit.columns import column_keys, key_presence

    out = []
    for key in column_keys(metadata):
        presence = key_presence(metadata, key)
        known = presence >= 0
        target = presence == 1
        n_pos = int(target.sum())
        out.append(BinaryColumn(key.key, target, known, n_pos, int(known.sum()) - n_pos))
    return out


def sparse_roc_auc(firing: Firing, column: BinaryColumn) -> float | None:
    """ROC AUC of the activation (``firing``, 0 elsewhere) against ``column``; None when
    the known instances hold one class only."""
    if column.n_pos == 0 or column.n_neg == 0:
        return None
    known = column.known[firing.positions]
    pos_mask = column.positive[firing.positions][known]
    values = firing.values[known].astype(np.float64)  # all non-zero
    fired_pos, fired_neg = values[pos_mask], np.sort(values[~pos_mask])
    silent_pos, silent_neg = column.n_pos - len(fired_pos), column.n_neg - len(fired_neg)
    # a firing positive x beats the firing negatives below it and, when x > 0, the silent
    # negatives (score 0); ties count half
    below = np.searchsorted(fired_neg, fired_pos, side="left") + silent_neg * (fired_pos > 0)
    ties = np.searchsorted(fired_neg, fired_pos, side="right") - np.searchsorted(
        fired_neg, fired_pos, side="left")
    u = float(below.sum() + 0.5 * ties.sum())
    # a silent positive (0) beats the negatives below zero and ties the silent ones
    u += silent_pos * (float(np.searchsorted(fired_neg, 0.0, side="left")) + 0.5 * silent_neg)
    return u / (column.n_pos * column.n_neg)


def sparse_metadata_aucs(firing: Firing, columns: Sequence[BinaryColumn]) -> dict[str, float]:
    """``findings.metadata_aucs`` from a component's firing rows."""
    out = {}
    for column in columns:
        auc = sparse_roc_auc(firing, column)
        if auc is not None:
            out[column.name] = auc
    return out
