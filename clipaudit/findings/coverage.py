"""SAE coverage: can the SAE see what the rules care about?

Findings can only name what the SAE isolates. For every metadata column key the rules
call an artifact or a protected attribute (or that marks a forbidden concept), this
module measures on a set of activations (the audit's reference set; ``train-sae`` calls
the same function on its training cache):

- **decodability**: ROC AUC of a cross-validated linear probe (shrinkage LDA, 3 folds)
  that predicts the key from the activations: whether the CLIP encodes it at all;
- **isolation**: ROC AUC of the best single SAE component's activation, and of the
  summed activations of the components that share one concept label (SAEs often split a
  concept over a few components, and findings count such a split whole).

A key that is decodable but not isolated is one the SAE is blind to: no finding can
name it, so the ``sae-coverage`` check fails the gate and says what to change.
"""

from __future__ import annotations

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
    """Coverage from ready sparse codes (``codes_indices``/``codes_values`` [n, k])."""
    if keys is None:
        keys = column_keys(metadata)
    if len(metadata) != len(acts_nd) or len(codes_indices) != len(acts_nd):
        raise ValueError(f"coverage needs one metadata row and one code row per activation "
                         f"(got {len(metadata)}, {len(codes_indices)} and {len(acts_nd)})")
    fired = codes_values > 0
    rows = torch.arange(len(codes_indices))[:, None].expand_as(codes_indices)[fired]
    comps, vals = codes_indices[fired], codes_values[fired].float()
    groups = _concept_groups(concepts, n_latents)
    out = []
    for key in keys:
        presence = key_presence(metadata, key)
        known = presence >= 0
        y = presence[known] == 1
        n_pos = int(y.sum())
        n_neg = int((~y).sum())
        if n_pos < MIN_POSITIVES or n_neg < MIN_POSITIVES:
            out.append(ColumnCoverage(key.key, int(known.sum()), n_pos, "too-few"))
            continue
        keep = torch.from_numpy(known)
        row_map = torch.full((len(acts_nd),), -1, dtype=torch.long)
        row_map[keep] = torch.arange(int(keep.sum()))
        sel = row_map[rows] >= 0
        y_t = torch.from_numpy(y)
        auc_j = sparse_aucs(row_map[rows][sel], comps[sel], vals[sel], y_t, n_latents)
        best = int(auc_j.argmax())
        coverage = ColumnCoverage(
            column=key.key, n=int(known.sum()), n_positive=n_pos, status="measured",
            decodable_auc=_decodable_auc(acts_nd[keep].float().numpy(), y, max_rows, seed),
            best_component=best, best_component_auc=float(auc_j[best]))
        if groups is not None:
            names, group_of = groups
            group_rows = group_of[comps[sel]]
            ok = group_rows >= 0
            auc_g = sparse_aucs(row_map[rows][sel][ok], group_rows[ok], vals[sel][ok], y_t,
                                len(names), sum_duplicates=True)
            g = int(auc_g.argmax())
            members = torch.nonzero(group_of == g).flatten().tolist()
            coverage = _with_group(coverage, names[g], float(auc_g[g]), members)
        out.append(coverage)
    return out


def _with_group(coverage: ColumnCoverage, name: str, auc: float, members: list[int]) -> ColumnCoverage:
    import dataclasses

    return dataclasses.replace(coverage, best_concept=name, best_concept_auc=auc,
                               best_concept_components=members)


def _concept_groups(concepts: Sequence[str] | None, n_latents: int) -> tuple[list[str], Tensor] | None:
    if concepts is None:
        return None
    names = sorted({c for c in concepts if c})
    index = {name: i for i, name in enumerate(names)}
    group_of = torch.tensor([index.get(c, -1) if c else -1 for c in concepts][:n_latents],
                            dtype=torch.long)
    return (names, group_of) if names else None


def sparse_aucs(rows: Tensor, cols: Tensor, values: Tensor, y: Tensor, n_cols: int, *,
                sum_duplicates: bool = False) -> Tensor:
    """ROC AUC of every column of a sparse non-negative matrix (entries ``rows``,
    ``cols``, ``values``; every other entry 0) against the labels ``y`` bool [n].

    Mann-Whitney on ranks: the zeros of a column tie at their mean rank, its non-zero
    entries rank above them in order (ties among non-zero values broken by order,
    which moves an AUC by at most the share of tied pairs). A column that is never
    non-zero gets 0.5."""
    n = len(y)
    n_pos = int(y.sum())
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full((n_cols,), float("nan"))
    if sum_duplicates and len(rows):
        flat = rows * n_cols + cols
        uniq, inverse = torch.unique(flat, return_inverse=True)
        values = torch.zeros(len(uniq)).index_add_(0, inverse, values.float())
        rows, cols = uniq // n_cols, uniq % n_cols
    order = torch.sort(values.float(), stable=True).indices
    order = order[torch.sort(cols[order], stable=True).indices]
    cols_s, rows_s = cols[order], rows[order]
    rank = torch.arange(len(cols_s)) - torch.searchsorted(cols_s, cols_s) + 1  # 1-based in column
    nnz = torch.bincount(cols_s, minlength=n_cols).double()
    zeros = n - nnz
    pos = y[rows_s].double()
    pos_nz = torch.zeros(n_cols, dtype=torch.float64).index_add_(0, cols_s, pos)
    rank_pos_nz = torch.zeros(n_cols, dtype=torch.float64).index_add_(
        0, cols_s, pos * (zeros[cols_s] + rank.double()))
    rank_sum = (n_pos - pos_nz) * (zeros + 1) / 2 + rank_pos_nz
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return auc.float()


def _decodable_auc(x: np.ndarray, y: np.ndarray, max_rows: int, seed: int) -> float | None:
    """Cross-validated ROC AUC of a linear probe (shrinkage LDA) from ``x`` to ``y``."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if len(y) > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(y), max_rows, replace=False))
        x, y = x[pick], y[pick]
    if min(int(y.sum()), int((~y).sum())) < FOLDS:
        return None
    probe = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_predict(probe, x, y, cv=folds, method="decision_function")
    return float(roc_auc_score(y, scores))


def coverage_status(coverage: ColumnCoverage, decodable_min: float, isolated_min: float) -> str:
    """``isolated``, ``blind`` (decodable, not isolated), ``not-decodable`` or ``too-few``."""
    if coverage.status != "measured" or coverage.decodable_auc is None:
        return "too-few"
    isolated = coverage.isolated_auc
    if isolated is not None and isolated >= isolated_min:
        return "isolated"
    return "blind" if coverage.decodable_auc >= decodable_min else "not-decodable"
