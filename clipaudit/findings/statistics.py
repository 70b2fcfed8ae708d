"""How sure a finding is: a bootstrap interval for its share, and a test against chance.

For a finding (component j, class c) the audit reports:

- ``share_ci`` and ``concept_share_ci``: percentile bootstrap intervals (default 95%) of
  the relevance share rho[j, c] and of the concept share, resampling the class's
  instances with replacement (``resamples`` times; the shares are ratios, so each
  resample recomputes the whole class's evidence, sum_j' |R_j'|, not only j's). The
  gate judges the lower end (``Finding.gate_share``).
- ``p_value``: how likely a random set of as many instances as the class has, drawn
  from the audited data (labels shuffled within the data), gives the finding's
  components at least the class's mean attribution. It is a Chernoff bound,
  exp(-n sup_l [l t - log E exp(l X)]) with X the components' attribution to the class
  over a random sample of the data: valid for any distribution of X (skewed ones
  included, such as a component that fires on few images), conservative, and small
  enough to survive a correction for thousands of findings when the evidence is real.
- ``backed``: the finding survives the Benjamini-Hochberg procedure over all of the
  audit's findings at false discovery rate ``fdr``. Only backed findings fail or warn:
  a class with few instances, or evidence no different from a random draw of the data
  (a component that carries a share of every set of images), fails nothing, however
  many classes the audit has.
- ``chance_share``: for the reader, the concept share the same components carry of the
  class's evidence over the data at large (a random sample of it): what a random set of
  instances gives on average.

Large classes are resampled m-out-of-n: draws of ``max_resample_size`` instances, the
spread scaled by sqrt(m / n) (the error of a mean shrinks as 1/sqrt(n)), from at most
``max_rows`` of the class's instances (a random subset). Memory and time per class are
then bounded whatever the class's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_BLOCK = 1 << 23
"""Entries gathered per resampling block ([resamples, m, k]): 32 MB of float32."""


@dataclass(frozen=True)
class StatisticsConfig:
    """Bootstrap intervals, the chance level, and the permutation control."""

    resamples: int = 500
    """Bootstrap resamples per class with findings (and random sets for the chance level)."""
    level: float = 0.95
    """Two-sided level of the bootstrap intervals; the gate judges their lower end."""
    fdr: float = 0.05
    """False discovery rate at which findings are backed by the data (Benjamini-Hochberg
    over the audit's findings); only backed findings fail or warn."""
    max_resample_size: int = 10_000
    """Larger classes are resampled m-out-of-n with this m (spread scaled by sqrt(m/n))."""
    max_rows: int = 50_000
    """Instances of one class (and of the random pool) read for resampling at most."""
    permutation: bool = True
    """Run the permutation control: the audit again with labels shuffled within the data,
    counting the findings and failing verdicts chance alone produces."""


@dataclass(frozen=True)
class ClassEvidence:
    """Instances as sparse attributions to one class: row n holds A[n, j, c] for its k
    active components (``values``) and which components they are (``components``)."""

    values: Tensor
    """float [n, k]."""
    components: Tensor
    """long [n, k]."""

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class ShareStatistics:
    share_ci: tuple[float, float]
    concept_share_ci: tuple[float, float]
    chance_share: float
    """The concept share over the data at large (the random pool)."""
    p_value: float
    """Chernoff bound on the chance of the class's mean attribution of the finding's
    components (its concept group) in a random set of the class's size."""


def share_statistics(own: ClassEvidence, n_class: int, pool: ClassEvidence,
                     targets: Sequence[tuple[int, Sequence[int]]], points: Sequence[tuple[float, float]],
                     n_latents: int, config: StatisticsConfig,
                     generator: torch.Generator) -> list[ShareStatistics]:
    """Intervals and chance levels for one class's findings.

    ``own``: the class's instances (all, or a random subset when the class has more than
    ``max_rows``), ``n_class`` how many it has; ``pool``: a random sample of the audited
    data, as attributions to this class; ``targets``: per finding, its component and the
    components of its concept group; ``points``: per finding, (share, concept share)
    on all of the class's instances, the centres of m-out-of-n intervals.
    """
    if not targets:
        return []
    columns, where = _columns(targets)
    m = min(n_class, config.max_resample_size)
    boot = _resampled_shares(own, torch.randint(len(own), (config.resamples, m), generator=generator),
                             columns, n_latents)
    population = torch.zeros(n_latents).index_add_(0, pool.components.reshape(-1),
                                                    pool.values.reshape(-1).float())
    population_total = float(population.abs().sum().clamp_min(1e-12))
    shrink = math.sqrt(m / n_class) if n_class > m else 1.0
    alpha = (1.0 - config.level) / 2
    out = []
    for (single, group), (share, concept_share) in zip(where, points):
        lo, hi = _interval(boot[:, single], share, shrink, alpha)
        clo, chi = _interval(boot[:, group], concept_share, shrink, alpha)
        members = columns[group]
        p = chernoff_p_value(_group_sums(pool, members), float(_group_sums(own, members).mean()), n_class)
        out.append(ShareStatistics((lo, hi), (clo, chi),
                                   float(population[members].sum()) / population_total, p))
    return out


def _group_sums(ev: ClassEvidence, members: Tensor) -> np.ndarray:
    """Per row, the attribution of the components ``members`` together."""
    return (ev.values * torch.isin(ev.components, members)).sum(1).double().numpy()


def chernoff_p_value(population: np.ndarray, t: float, n: int) -> float:
    """An upper bound on P(mean of n independent draws from ``population`` >= t):
    exp(-n I(t)), I(t) = sup_{l >= 0} [l t - log mean(exp(l x))] (Chernoff). 1 when t is
    not above the population's mean; 0 when no value of the population reaches t."""
    x = np.asarray(population, dtype=np.float64)
    if len(x) == 0 or n <= 0 or t <= x.mean():
        return 1.0
    top = x.max()
    if t > top:
        return 0.0
    if t == top:
        return float(np.mean(x == top)) ** n
    z = (x - t) / max(float(x.std()), 1e-300)  # the same supremum, on a scale where l ~ 1

    def tilted_mean(l: float) -> float:
        w = np.exp(l * (z - z.max()))
        return float((w * z).sum() / w.sum())

    lo, hi = 0.0, 1.0
    while tilted_mean(hi) < 0 and hi < 1e9:
        lo, hi = hi, hi * 2
    for _ in range(100):  # the tilted mean grows with l: bisect for zero
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilted_mean(mid) < 0 else (lo, mid)
    l = (lo + hi) / 2
    log_mgf = float(np.log(np.mean(np.exp(l * (z - z.max())))) + l * z.max())
    return float(np.exp(min(0.0, n * log_mgf)))


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Adjusted p-values (q-values) of the Benjamini-Hochberg procedure: reject where
    q <= the false discovery rate."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(m)
    out[order] = q
    return out


def _columns(targets: Sequence[tuple[int, Sequence[int]]]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """Unique component sets to resample, and per target the columns of (single, group)."""
    keys: dict[tuple[int, ...], int] = {}
    where = []
    for component, members in targets:
        pair = []
        for key in ((int(component),), tuple(sorted({int(component), *map(int, members)}))):
            pair.append(keys.setdefault(key, len(keys)))
        where.append((pair[0], pair[1]))
    return [torch.tensor(k, dtype=torch.long) for k in keys], where


def _interval(samples: Tensor, centre: float, shrink: float, alpha: float) -> tuple[float, float]:
    if shrink != 1.0:
        samples = centre + (samples - centre) * shrink
    q = torch.quantile(samples.double(), torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _resampled_shares(ev: ClassEvidence, draws: Tensor, columns: Sequence[Tensor],
                      n_latents: int) -> Tensor:
    """[resamples, len(columns)]: per resample (rows ``draws`` [B, m] of ``ev``), the share
    of the class's evidence each column's components carry together."""
    n_draws, m = draws.shape
    k = ev.values.shape[1]
    out = torch.empty(n_draws, len(columns))
    per = max(1, _BLOCK // max(1, m * k))
    for start in range(0, n_draws, per):
        d = draws[start:start + per]
        values = ev.values[d].reshape(len(d), -1).float()
        comps = ev.components[d].reshape(len(d), -1)
        total = torch.zeros(len(d), n_latents).scatter_add_(1, comps, values)
        denom = total.abs().sum(1).clamp_min(1e-12)
        for i, members in enumerate(columns):
            out[start:start + per, i] = total[:, members].sum(1) / denom
    return out


def candidate_statistics(candidates: Sequence[Any], class_names: Sequence[str],
                         class_sizes: Sequence[int], own: Callable[[int], ClassEvidence],
                         pool: Callable[[int], ClassEvidence], n_latents: int,
                         config: StatisticsConfig, seed: int) -> dict[tuple[str, int], ShareStatistics]:
    """``share_statistics`` for every candidate (``findings.Candidate``), class by class.

    ``own(c)``: class c's instances as attributions to c; ``pool(c)``: the random pool of
    the data as attributions to c; ``class_sizes[c]``: instances assigned to class c.
    Each class draws from its own generator (``seed``, class index), so a class's
    numbers do not depend on which other classes have findings."""
    by_class: dict[str, list[Any]] = {}
    for cand in candidates:
        by_class.setdefault(cand.class_name, []).append(cand)
    out: dict[tuple[str, int], ShareStatistics] = {}
    lookup = {name: i for i, name in enumerate(class_names)}
    for name, cands in by_class.items():
        c = lookup[name]
        members = _concept_members(cands)
        targets = [(cand.component, members[cand.concept] if cand.concept else [cand.component])
                   for cand in cands]
        points = [(float(cand.share), float(cand.concept_share)) for cand in cands]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + c)
        stats = share_statistics(own(c), int(class_sizes[c]), pool(c), targets, points, n_latents,
                                 config, generator)
        out.update({(name, cand.component): s for cand, s in zip(cands, stats)})
    return out


def _concept_members(cands: Sequence[Any]) -> dict[str, list[int]]:
    """Concept label -> the class's candidates with it (whose shares make the concept share)."""
    members: dict[str, list[int]] = {}
    for cand in cands:
        if cand.concept:
            members.setdefault(cand.concept, []).append(cand.component)
    return members
