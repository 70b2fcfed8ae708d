"""Reliance on annotated concepts, with the SAE out of the loop.

For a concept (a metadata column key such as ``has_ruler``, the SAE components
labelled with a forbidden concept, or a forbidden term read by the reference CLIP),
and one classifier head:

1. **Direction** (a concept activation vector) in the head's input space
   x = (e - offset) / scale (the head's ``LinearForm``, normalisation held fixed as
   everywhere in clipaudit): the difference between the mean x of reference instances
   with and without the concept, within each class, averaged over the classes in which
   both occur (weighted by the smaller count). Within-class differences keep a concept
   that co-occurs with a class from borrowing that class's direction; a concept that
   never occurs both with and without in one class is ``confounded`` and not measured.
2. **Effect** on each class c (exact for linear heads): adding the concept moves the
   class scores by W v. The reliance of class c on the concept is the accuracy the head
   loses on the other classes' images when the concept is put on them (against the same
   images without it: the concept is taken off those that carry it): the embedding-space
   twin of the causal test that the detection benchmark runs on re-rendered counterfactual
   images (``benchmarks/detection.py``). Reported beside it: the flip rate (share of those
   images the head would then call c), the shift of c's margin, that shift over the
   distance between the classes' mean margins, and the accuracy per slice (class x
   presence).

The unit is a fraction of images, the same on any CLIP, so one threshold
(``thresholds.reliance_min``) serves every model.

Why a mean shift in the head's input space and not in embedding space followed by the
head's own normalisation: artifacts replace image content as much as they add to it,
so an L2-normalised head sees their embeddings keep their norm; adding the mean
difference and renormalising shrinks every margin towards the bias and flips
near-boundary images that the real artifact leaves alone (measured on the dermatology
world: 12-19% false flips for hair, which the re-rendered images put at 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from clipaudit.heads.base import Head
from clipaudit.results import ConceptReliance, RelianceSource, SliceAccuracy

MIN_INSTANCES = 10
"""Fewest instances with, and without, the concept within a class to estimate a direction."""
BOOTSTRAP = 100
"""Bootstrap replicates (reference and audited instances resampled) behind the lower bound."""
LOWER_QUANTILE = 0.05
"""The gate judges the 5th percentile of the replicates: one-sided 95% confidence that the
reliance is at least that large. A small reliance that chance gives a probe trained on a few
hundred images (a protected attribute independent of the label) is not failed on noise."""
_CHUNK_FLOATS = 1 << 24


@dataclass(frozen=True)
class Presence:
    """Which instances of a set carry a concept: 1 yes, 0 no, -1 unknown (left out)."""

    concept: str
    source: RelianceSource
    values: np.ndarray
    """int8 [n]."""
    detail: str = ""


@dataclass(frozen=True)
class Direction:
    """A concept's mean shift in a head's input space, or why there is none."""

    vector: Tensor | None
    """float [D]; None when not measurable."""
    replicates: Tensor | None = None
    """float [B, D]: the direction on bootstrap resamples of the instances it came from."""
    status: str = "measured"
    """``measured``, ``confounded``, ``too-few``, ``absent`` (``ConceptReliance.status``)."""
    n_present: int = 0
    n_absent: int = 0
    note: str = ""


def head_inputs(head: Head, e_nD: Tensor, batch_size: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
    """(x [n, D], W [C, D], b [C]): the head's input space, where y = x W^T + b exactly."""
    parts, weight, bias = [], None, None
    for s in range(0, max(len(e_nD), 1), batch_size):
        e = e_nD[s:s + batch_size].float()
        form = head.linear_form(e)
        parts.append((e - form.offset) / form.scale[:, None])
        weight, bias = form.weight.detach().float(), form.bias.detach().float()
    if weight is None or bias is None:  # no instances: the form of one zero embedding
        form = head.linear_form(torch.zeros(1, e_nD.shape[1]))
        weight, bias = form.weight.detach().float(), form.bias.detach().float()
    return torch.cat(parts).detach() if parts else torch.zeros(0, e_nD.shape[1]), weight, bias


def concept_direction(x_nD: Tensor, presence: np.ndarray, labels: Sequence[str | None] | None,
                      *, bootstrap: int = BOOTSTRAP, seed: int = 0) -> Direction:
    """The concept's mean shift: within-class differences of mean x, averaged over the
    classes where at least ``MIN_INSTANCES`` carry it and as many do not (weighted by the
    smaller count). Without labels, the plain difference of means (noted). ``bootstrap``
    replicates (Poisson-weighted resamples) come with it."""
    present, absent = presence == 1, presence == 0
    n_present, n_absent = int(present.sum()), int(absent.sum())
    if n_present == 0 and n_absent == 0:
        return Direction(None, status="absent")
    if n_present < MIN_INSTANCES or n_absent < MIN_INSTANCES:
        return Direction(None, status="too-few", n_present=n_present, n_absent=n_absent,
                         note=f"{n_present} instance(s) with the concept and {n_absent} without "
                         f"(at least {MIN_INSTANCES} of each are needed)")
    note = ""
    cells: list[tuple[np.ndarray, np.ndarray, float]] = []
    if labels is None or all(x is None for x in labels):
        cells.append((present, absent, 1.0))
        note = "the reference set has no labels: the direction is not class-conditional"
    else:
        label_arr = np.array([x if x is not None else "\0none" for x in labels], dtype=object)
        for name in sorted(set(label_arr.tolist()) - {"\0none"}):
            with_, without = present & (label_arr == name), absent & (label_arr == name)
            n = min(int(with_.sum()), int(without.sum()))
            if n >= MIN_INSTANCES:
                cells.append((with_, without, float(n)))
    if not cells:
        return Direction(None, status="confounded", n_present=n_present, n_absent=n_absent,
                         note="no class has both instances with and without the concept "
                         f"(>= {MIN_INSTANCES} each): its direction cannot be told from the "
                         "classes'; describe on a reference set where it occurs in every class")
    x = x_nD.float()
    weights = torch.poisson(torch.ones(bootstrap, len(x)),
                            generator=torch.Generator().manual_seed(seed)) if bootstrap else None
    total = sum(w for _, _, w in cells)
    vector = torch.zeros(x.shape[1])
    replicates = torch.zeros(bootstrap, x.shape[1]) if weights is not None else None
    for with_, without, w in cells:
        m1, m0 = torch.from_numpy(with_), torch.from_numpy(without)
        vector += (w / total) * (x[m1].mean(0) - x[m0].mean(0))
        if weights is not None and replicates is not None:
            replicates += (w / total) * (_weighted_means(weights[:, m1], x[m1])
                                         - _weighted_means(weights[:, m0], x[m0]))
    return Direction(vector, replicates, "measured", n_present, n_absent, note)


def _weighted_means(weights_Bn: Tensor, x_nD: Tensor) -> Tensor:
    return (weights_Bn @ x_nD) / weights_Bn.sum(1, keepdim=True).clamp(min=1.0)


def measure_reliance(direction: Direction, concept: str, source: RelianceSource,
                     x_nD: Tensor, weight_CD: Tensor, bias_C: Tensor, class_names: Sequence[str],
                     labels: Sequence[str | None], presence: np.ndarray | None = None,
                     detail: str = "", seed: int = 0) -> list[ConceptReliance]:
    """Per class of the head, its reliance on the concept over the audited instances
    (``x_nD`` from ``head_inputs``; ``labels`` the audited labels, predictions standing in
    where none match the head's classes; ``presence`` the audited instances' observed
    presence, or None when unknown), with the lower bound of its bootstrap replicates
    (the direction's replicates, each on a Poisson-weighted resample of the audited
    instances)."""
    if direction.vector is None:
        return [ConceptReliance(concept, source, name, direction.status,  # type: ignore[arg-type]
                                n_present=direction.n_present, n_absent=direction.n_absent,
                                detail=_join(detail, direction.note))
                for name in class_names]
    scores = x_nD @ weight_CD.T + bias_C
    truth = torch.tensor([class_names.index(x) if x in class_names else -1 for x in labels],
                         dtype=torch.long)
    note = direction.note
    if not bool((truth >= 0).any()):
        truth = scores.argmax(dim=1)
        note = _join(note, "no labels match the head's classes: its predictions stand in")
    known = truth >= 0
    shift = weight_CD @ direction.vector  # [C]: score change when the concept is added
    has = torch.zeros(len(x_nD), dtype=torch.bool) if presence is None \
        else torch.from_numpy(presence == 1)
    clean = scores - has[:, None].float() * shift
    lost_Bn, weights_Bn = _lost_replicates(direction, weight_CD, scores, truth, has, known, seed)
    out = []
    for c, name in enumerate(class_names):
        others = known & (truth != c)
        swapped = clean + others[:, None].float() * shift
        acc_clean = _accuracy(clean, truth, others)
        acc_swapped = _accuracy(swapped, truth, others)
        flips = None
        if bool(others.any()):
            flips = float((swapped[others].argmax(1) == c).float().mean()
                          - (clean[others].argmax(1) == c).float().mean())
        margin_shift = float(_margin(shift[None], c)[0])
        margins = _margin(scores, c)
        mine, theirs = known & (truth == c), others
        separation = float(margins[mine].mean() - margins[theirs].mean()) \
            if bool(mine.any()) and bool(theirs.any()) else None
        low = None
        if lost_Bn is not None and bool(others.any()):
            w = weights_Bn[:, others].float()
            values = (w * lost_Bn[:, others]).sum(1) / w.sum(1).clamp(min=1.0)
            low = float(torch.quantile(values, LOWER_QUANTILE))
        out.append(ConceptReliance(
            concept=concept, source=source, class_name=name, status="measured",
            reliance=None if acc_clean is None or acc_swapped is None else acc_clean - acc_swapped,
            reliance_low=low,
            flip_rate=flips, score_shift=margin_shift,
            separation_ratio=margin_shift / separation if separation else None,
            n_present=direction.n_present, n_absent=direction.n_absent, detail=_join(detail, note),
            slices=_slices(scores, truth, presence, class_names) if presence is not None else []))
    return out


def _lost_replicates(direction: Direction, weight_CD: Tensor, scores: Tensor, truth: Tensor,
                     has: Tensor, known: Tensor, seed: int) -> tuple[Tensor | None, Tensor]:
    """Per bootstrap replicate of the direction and audited instance: 1 where the instance
    is classified correctly without the concept and wrongly with it, -1 the other way
    round, 0 otherwise (``[B, n]``, 0 for instances without a known class), and the
    replicates' Poisson weights of the audited instances (``[B, n]``). Whether an image
    loses its class does not depend on which class relies on the concept, so this is
    computed once per concept; a class's replicate is the weighted mean over the other
    classes' images (its ``LOWER_QUANTILE`` is the lower bound)."""
    n = len(scores)
    if direction.replicates is None or not bool(known.any()):
        return None, torch.zeros(0, n, dtype=torch.uint8)
    shifts = direction.replicates @ weight_CD.T  # [B, C]
    weights = torch.poisson(torch.ones(len(shifts), n),
                            generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    lost = torch.zeros(len(shifts), n, dtype=torch.int8)  # compact: B x n can be large
    rows = torch.nonzero(known).flatten()
    y, t, h = scores[rows], truth[rows], has[rows]
    chunk = max(1, _CHUNK_FLOATS // max(1, y.numel()))
    for b in range(0, len(shifts), chunk):
        shift = shifts[b:b + chunk, None, :]  # [b, 1, C]
        clean = y[None] - h[None, :, None].float() * shift
        lost[b:b + chunk, rows] = ((clean.argmax(2) == t).to(torch.int8)
                                   - ((clean + shift).argmax(2) == t).to(torch.int8))
    return lost, weights


def _margin(scores: Tensor, c: int) -> Tensor:
    """y_c minus the mean of the other classes' scores (y_c itself for a single class)."""
    n_classes = scores.shape[1]
    if n_classes == 1:
        return scores[:, 0]
    return scores[:, c] - (scores.sum(1) - scores[:, c]) / (n_classes - 1)


def _accuracy(scores: Tensor, truth: Tensor, known: Tensor) -> float | None:
    if not bool(known.any()):
        return None
    return float((scores[known].argmax(1) == truth[known]).float().mean())


def _slices(scores: Tensor, truth: Tensor, presence: np.ndarray,
            class_names: Sequence[str]) -> list[SliceAccuracy]:
    pred = scores.argmax(1)
    out = []
    for c, name in enumerate(class_names):
        for value in (True, False):
            mask = (truth == c) & torch.from_numpy(presence == (1 if value else 0))
            n = int(mask.sum())
            acc = float((pred[mask] == c).float().mean()) if n else None
            out.append(SliceAccuracy(name, value, n, acc))
    return out


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------ presence


def otsu_threshold(values: Tensor) -> float:
    """The split of ``values`` that maximises the between-group variance (Otsu's method):
    where a bimodal score (present vs absent) divides."""
    x = torch.sort(values.double().flatten()).values
    n = len(x)
    if n < 2 or float(x[0]) == float(x[-1]):
        return float(x[0]) if n else 0.0
    below = torch.arange(1, n, dtype=torch.float64)  # sizes of the lower group
    sums = torch.cumsum(x, 0)[:-1]
    mean_lo = sums / below
    mean_hi = (x.sum() - sums) / (n - below)
    variance = below * (n - below) * (mean_hi - mean_lo) ** 2
    distinct = x[1:] > x[:-1]  # split only between different values
    variance[~distinct] = -1
    i = int(variance.argmax())
    return float(x[i])


def presence_from_activation(activation: Tensor, concept: str, detail: str,
                             threshold: float | None = None) -> tuple[Presence, float]:
    """Presence from SAE components: the instances whose summed activation of the
    components lies above the Otsu split of its non-zero values carry the concept, every
    other instance does not. The strongest few activations alone would not do: they share
    the context that makes the concept salient (a band-aid beside a pale lesion), and the
    direction would inherit it. Returns the presence and the threshold (to apply the same
    split to another set)."""
    fired = activation[activation > 0]
    if threshold is None:
        threshold = otsu_threshold(fired) if len(fired) else 0.0
    values = (activation > threshold).numpy().astype(np.int8)
    return Presence(concept, "components", values, detail), threshold


def presence_from_scores(scores: Tensor, concept: str, detail: str) -> Presence:
    """Text-defined presence: the reference images whose score for the concept lies above
    the Otsu split of the scores carry it, the others do not (NaN: unknown)."""
    values = np.full(len(scores), -1, dtype=np.int8)
    finite = torch.isfinite(scores)
    if int(finite.sum()) >= 2:
        s = scores[finite]
        rows = torch.nonzero(finite).flatten()
        above = s > otsu_threshold(s)
        values[rows[above].numpy()] = 1
        values[rows[~above].numpy()] = 0
    return Presence(concept, "text", values, detail)
