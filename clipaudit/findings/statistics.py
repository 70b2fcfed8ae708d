"""How sure a finding is: a bootstrap interval for its share, and the share chance gives.

For a finding (component j, class c) the audit reports:

- ``share_ci`` and ``concept_share_ci``: percentile bootstrap intervals (default 95%) of
  the relevance share rho[j, c] and of the concept share, resampling the class's
  instances with replacement (``resamples`` times; the shares are ratios, so each
  resample recomputes the whole class's evidence, sum_j' |R_j'|, not only j's);
- ``chance_share``: the share the same components carry of class c's evidence over
  *random* sets of as many instances as the class has, drawn from the audited data
  (the permutation null: labels shuffled within the data), at its ``chance_quantile``
  (default the 95th percentile).

The gate judges the lower end of the interval (``Finding.gate_share``), and only a
finding whose lower end exceeds the chance level counts (``Finding.backed``): a class
with few instances has a wide interval and a wide null, so nothing fails it unless its
evidence really is unlike a random draw of the data. A component that carries a large
share of every set of images (a constant offset of the head, a feature present
everywhere) is not specific to the class and is not backed either.

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
    chance_quantile: float = 0.95
    """Quantile of the share over random sets of the class's size that a finding's lower
    bound must exceed to count (to be backed by the data)."""
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
    """``chance_quantile`` of the concept share over random sets of the class's size."""


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
    null = _resampled_shares(pool, torch.randint(len(pool), (config.resamples, m), generator=generator),
                             columns, n_latents)
    shrink = math.sqrt(m / n_class) if n_class > m else 1.0
    alpha = (1.0 - config.level) / 2
    out = []
    for (single, group), (share, concept_share) in zip(where, points):
        lo, hi = _interval(boot[:, single], share, shrink, alpha)
        clo, chi = _interval(boot[:, group], concept_share, shrink, alpha)
        chance = null[:, group]
        chance = chance.mean() + (chance - chance.mean()) * shrink
        out.append(ShareStatistics((lo, hi), (clo, chi),
                                   float(torch.quantile(chance.double(), config.chance_quantile))))
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
