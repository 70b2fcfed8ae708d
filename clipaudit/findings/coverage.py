"""SAE coverage: can the SAE see what the rules care about?

Findings can only name what the SAE isolates. For every metadata column key the rules
call an artifact or a protected attribute (or that marks a forbidden concept), this
module measures on a set of activations (the audit's reference set; ``train-sae`` calls
the same function on its training cache):

- **decodability**: ROC AUC of the out-of-fold predictions of a linear probe (ridge
  regression on standardised activations, 3-fold cross-validation) that predicts the key
  from the activations: whether the CLIP encodes it at all;
- **isolation**: ROC AUC of the best single SAE component's activation, and of the
  summed activations of the components that share one concept label (SAEs often split a
  concept over a few components, and findings count such a split whole).

A key that is decodable but not isolated is one the SAE is blind to: no finding can
name it, so the ``sae-coverage`` check fails the gate and says what to change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from clipaudit.columns import ColumnKey, column_keys, key_presence
from clipaudit.results import ColumnCoverage

log = logging.getLogger(__name__)

MIN_POSITIVES = 10
"""Fewest instances with (and without) the key to measure it."""
MAX_ROWS = 20_000
"""Rows the linear probe is cross-validated on (a seeded sample beyond that)."""
FOLDS = 3
RIDGE = 1e-2
"""Ridge penalty of the decoding probe, per training row, on standardised activations."""


def sae_coverage(acts_nd: Tensor, sae: Any, metadata: pd.DataFrame,
                 keys: Sequence[ColumnKey] | None = None, *, concepts: Sequence[str] | None = None,
                 batch_size: int = 4096, max_rows: int = MAX_ROWS, seed: int = 0) -> list[ColumnCoverage]:
    """Coverage of ``keys`` (default: every binary or categorical column's) by ``sae``
    (anything with ``encode`` -> ``.indices``/``.values`` and ``n_latents``) on the
    activations ``acts_nd`` [n, d], whose rows match ``metadata``'s. ``concepts`` (one
    label per component) adds the per-concept isolation."""
    indices, values = [], []
    with torch.no_grad():
        for s in range(0, len(acts_nd), batch_size):
            codes = sae.encode(acts_nd[s:s + batch_size].float())
            indices.append(codes.indices.cpu())
            values.append(codes.values.detach().float().cpu())
    k = getattr(sae, "k", 1)
    codes_i = torch.cat(indices) if indices else torch.zeros(0, k, dtype=torch.long)
    codes_v = torch.cat(values) if values else torch.zeros(0, k)
    return measure_coverage(acts_nd, codes_i, codes_v, int(sae.n_latents), metadata, keys,
                            concepts=concepts, max_rows=max_rows, seed=seed)


def measure_coverage(acts_nd: Tensor, codes_indices: Tensor, codes_values: Tensor, n_latents: int,
                     metadata: pd.DataFrame, keys: Sequence[ColumnKey] | None = None, *,
                     concepts: Sequence[str] | None = None, max_rows: int = MAX_ROWS,
                     seed: int = 0) -> list[ColumnCoverage]:
    """Coverage from ready sparse codes (``codes_indices``/``codes_values`` [n, k]).

    The sparse entries are sorted once for every key, and one cross-validated ridge fit
    decodes every key whose values are all known."""
    if keys is None:
        keys = column_keys(metadata)
    if len(metadata) != len(acts_nd) or len(codes_indices) != len(acts_nd):
        raise ValueError(f"coverage needs one metadata row and one code row per activation "
                         f"(got {len(metadata)}, {len(codes_indices)} and {len(acts_nd)})")
    n = len(acts_nd)
    fired = codes_values > 0
    rows = torch.arange(n)[:, None].expand_as(codes_indices)[fired]
    entries = (rows, codes_indices[fired], codes_values[fired].float())
    groups = _concept_groups(concepts, n_latents)
    presences = [key_presence(metadata, key) for key in keys]
    complete = [i for i, p in enumerate(presences) if (p >= 0).all() and _enough(p == 1)]
    columns = _SortedColumns(*entries, n, n_latents)
    grouped = _grouped(entries, groups, n)
    decodable = _decodable_aucs(acts_nd, [presences[i] == 1 for i in complete], max_rows, seed)
    out = []
    for i, (key, presence) in enumerate(zip(keys, presences)):
        known = presence >= 0
        y = presence[known] == 1
        if not _enough(y):
            out.append(ColumnCoverage(key.key, int(known.sum()), int(y.sum()), "too-few"))
            continue
        if i in complete:
            auc_j, auc_g, dec = columns.aucs(y), grouped.aucs(y) if grouped else None, \
                decodable[complete.index(i)]
        else:  # missing values: this key on its known rows only
            sub = _subset(entries, known)
            auc_j = _SortedColumns(*sub, int(known.sum()), n_latents).aucs(y)
            g = _grouped(sub, groups, int(known.sum()))
            auc_g = g.aucs(y) if g else None
            dec = _decodable_aucs(acts_nd[torch.from_numpy(known)], [y], max_rows, seed)[0]
        best = int(auc_j.argmax())
        coverage = ColumnCoverage(column=key.key, n=int(known.sum()), n_positive=int(y.sum()),
                                  status="measured", decodable_auc=dec, best_component=best,
                                  best_component_auc=float(auc_j[best]))
        if auc_g is not None and groups is not None:
            names, group_of = groups
            g_best = int(auc_g.argmax())
            coverage = dataclasses.replace(
                coverage, best_concept=names[g_best], best_concept_auc=float(auc_g[g_best]),
                best_concept_components=torch.nonzero(group_of == g_best).flatten().tolist())
        out.append(coverage)
    return out


def _enough(y: np.ndarray) -> bool:
    return int(y.sum()) >= MIN_POSITIVES and int((~y).sum()) >= MIN_POSITIVES


def _subset(entries: tuple[Tensor, Tensor, Tensor], known: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    rows, cols, values = entries
    row_map = torch.full((len(known),), -1, dtype=torch.long)
    keep = torch.from_numpy(known)
    row_map[keep] = torch.arange(int(keep.sum()))
    sel = row_map[rows] >= 0
    return row_map[rows][sel], cols[sel], values[sel]


def _grouped(entries: tuple[Tensor, Tensor, Tensor], groups: tuple[list[str], Tensor] | None,
             n: int) -> _SortedColumns | None:
    """The entries summed per concept label (one column per label)."""
    if groups is None:
        return None
    names, group_of = groups
    rows, cols, values = entries
    g = group_of[cols]
    ok = g >= 0
    return _SortedColumns(rows[ok], g[ok], values[ok], n, len(names), sum_duplicates=True)


def _concept_groups(concepts: Sequence[str] | None, n_latents: int) -> tuple[list[str], Tensor] | None:
    if concepts is None:
        return None
    names = sorted({c for c in concepts if c})
    index = {name: i for i, name in enumerate(names)}
    group_of = torch.tensor([index.get(c, -1) if c else -1 for c in concepts][:n_latents],
                            dtype=torch.long)
    return (names, group_of) if names else None


class _SortedColumns:
    """A sparse non-negative matrix [n, n_cols], its entries sorted once by (column, value),
    so the ROC AUC of every column against any labels costs two scatter-adds.

    Mann-Whitney on ranks: the zeros of a column tie at their mean rank, its non-zero
    entries rank above them in order (ties among non-zero values broken by order, which
    moves an AUC by at most the share of tied pairs). A column never non-zero gets 0.5."""

    def __init__(self, rows: Tensor, cols: Tensor, values: Tensor, n: int, n_cols: int, *,
                 sum_duplicates: bool = False):
        if sum_duplicates and len(rows):
            flat = rows * n_cols + cols
            uniq, inverse = torch.unique(flat, return_inverse=True)
            values = torch.zeros(len(uniq)).index_add_(0, inverse, values.float())
            rows, cols = uniq // n_cols, uniq % n_cols
        order = torch.sort(values.float(), stable=True).indices
        order = order[torch.sort(cols[order], stable=True).indices]
        self.cols, self.rows = cols[order], rows[order]
        rank = torch.arange(len(self.cols)) - torch.searchsorted(self.cols, self.cols) + 1
        nnz = torch.bincount(self.cols, minlength=n_cols).double()
        self.zeros = n - nnz
        self.entry_rank = self.zeros[self.cols] + rank.double()  # rank among all n rows
        self.n, self.n_cols = n, n_cols

    def aucs(self, y: np.ndarray | Tensor) -> Tensor:
        y_t = torch.as_tensor(y, dtype=torch.bool)
        n_pos = int(y_t.sum())
        n_neg = self.n - n_pos
        if n_pos == 0 or n_neg == 0:
            return torch.full((self.n_cols,), float("nan"))
        pos = y_t[self.rows].double()
        pos_nz = torch.zeros(self.n_cols, dtype=torch.float64).index_add_(0, self.cols, pos)
        rank_pos_nz = torch.zeros(self.n_cols, dtype=torch.float64).index_add_(
            0, self.cols, pos * self.entry_rank)
        rank_sum = (n_pos - pos_nz) * (self.zeros + 1) / 2 + rank_pos_nz
        return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def sparse_aucs(rows: Tensor, cols: Tensor, values: Tensor, y: Tensor, n_cols: int, *,
                sum_duplicates: bool = False) -> Tensor:
    """ROC AUC of every column of a sparse non-negative matrix (entries ``rows``,
    ``cols``, ``values``; every other entry 0) against the labels ``y`` bool [n]."""
    return _SortedColumns(rows, cols, values, len(y), n_cols,
                          sum_duplicates=sum_duplicates).aucs(y)


def _decodable_aucs(acts_nd: Tensor, targets: Sequence[np.ndarray], max_rows: int,
                    seed: int) -> list[float]:
    """Per target, the ROC AUC of a linear probe's out-of-fold predictions (ridge
    regression on standardised activations, ``FOLDS``-fold cross-validation; one solve per
    fold serves every target)."""
    if not targets:
        return []
    x = acts_nd.double()
    y = torch.from_numpy(np.stack(targets, axis=1)).double()  # [n, K]
    if len(x) > max_rows:
        pick = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(x), max_rows,
                                                                           replace=False)))
        x, y = x[pick], y[pick]
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-12)
    fold = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)) % FOLDS)
    predictions = torch.zeros_like(y)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for f in range(FOLDS):
        train, test = fold != f, fold == f
        x_tr, y_tr = x[train], y[train]
        mean_x, mean_y = x_tr.mean(0), y_tr.mean(0)
        xc = x_tr - mean_x
        ridge = RIDGE * len(x_tr)
        w = torch.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ (y_tr - mean_y))
        predictions[test] = (x[test] - mean_x) @ w + mean_y
    return [roc_auc(predictions[:, k], y[:, k] > 0.5) for k in range(y.shape[1])]


def roc_auc(scores: Tensor, y: Tensor) -> float:
    """ROC AUC of ``scores`` against the bool labels ``y`` (ties averaged, as
    ``sklearn.metrics.roc_auc_score``)."""
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty(len(scores), dtype=torch.float64)
    sorted_scores = scores[order]
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True,
                                                     return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def coverage_status(coverage: ColumnCoverage, decodable_min: float, isolated_min: float) -> str:
    """``isolated``, ``blind`` (decodable, not isolated), ``not-decodable`` or ``too-few``."""
    if coverage.status != "measured" or coverage.decodable_auc is None:
        return "too-few"
    isolated = coverage.isolated_auc
    if isolated is not None and isolated >= isolated_min:
        return "isolated"
    return "blind" if coverage.decodable_auc >= decodable_min else "not-decodable"
