"""Reliance on annotated concepts, with the SAE out of the loop.

For a concept (a metadata column key such as ``has_ruler``, the SAE components
labelled with a forbidden concept, or a forbidden term read by the reference CLIP),
and one classifier head:

1. **Direction** (a concept activation vector) in the head's input space
   x = (e - offset) / scale (the head's ``LinearForm``, normalisation held fixed as
   everywhere in clipaudit): the difference between the mean x of reference instances
   with and without the concept, within each class, averaged over the classes in which
   both occur (weighted by the smaller count). Within-class differences keep a concept
   that co-occurs with a class from borrowing that class's direction. A concept with no
   such class is not measured: ``confounded`` when it is all or nothing within every
   class and fills at least one with ``MIN_INSTANCES`` images (the reference set cannot
   tell it from those classes), ``too-few`` when some class mixes it (17 with, 7 without)
   or it is spread thinly over small classes: more images per class would measure it.
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

import functools
import math
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


def _unmeasured(n_with: np.ndarray, n_without: np.ndarray, n_present: int,
                n_absent: int) -> Direction:
    """Why no class gives a cell: the concept is all or nothing within every class and
    fills at least one (``confounded``: the reference set cannot tell it from those
    classes; one stray image on a class's minority side is not a mixture), or it is mixed
    in some class, or spread too thinly, in classes too small to hold ``MIN_INSTANCES``
    of each (``too-few``: more reference images per class would measure it)."""
    most_with = int(n_with.max(initial=0))
    mixed = bool((np.minimum(n_with, n_without) >= 2).any())
    if most_with >= MIN_INSTANCES and not mixed:
        return Direction(None, status="confounded", n_present=n_present, n_absent=n_absent,
                         note="no class has both instances with and without the concept "
                         f"(>= {MIN_INSTANCES} each; the class with most of it has "
                         f"{most_with} with and {int(n_without[n_with.argmax()])} without): "
                         "its direction cannot be told from the classes'; describe on a "
                         "reference set where it occurs in every class")
    return Direction(None, status="too-few", n_present=n_present, n_absent=n_absent,
                     note=f"no class holds {MIN_INSTANCES} reference instances with the concept "
                     f"and {MIN_INSTANCES} without (at most {most_with} with it in one class, "
                     f"the largest class has {int((n_with + n_without).max(initial=0))}); "
                     "more reference images per class would measure it")


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
    n_with = n_without = np.zeros(0, dtype=np.int64)
    if labels is None or all(x is None for x in labels):
        cells.append((present, absent, 1.0))
        note = "the reference set has no labels: the direction is not class-conditional"
    else:
        names = sorted({x for x in labels if x is not None})
        code = {name: i for i, name in enumerate(names)}
        of_row = np.array([code[x] if x is not None else -1 for x in labels], dtype=np.int64)
        labelled = of_row >= 0
        n_with = np.bincount(of_row[present & labelled], minlength=len(names))
        n_without = np.bincount(of_row[absent & labelled], minlength=len(names))
        for i in np.flatnonzero(np.minimum(n_with, n_without) >= MIN_INSTANCES):  # names' order
            of_class = of_row == i
            cells.append((present & of_class, absent & of_class,
                          float(min(n_with[i], n_without[i]))))
    if not cells:
        return _unmeasured(n_with, n_without, n_present, n_absent)
    x = x_nD.float()
    weights = _poisson_weights(bootstrap, len(x), seed) if bootstrap else None
    total = sum(w for _, _, w in cells)
    # every cell's two means at once: row i (with or without the concept in cell k) enters
    # with the coefficient +-(w_k / total) / (the weight of its side of the cell), so the
    # direction and each replicate are one weighted sum of the rows (float64)
    group = np.full(len(x), -1, dtype=np.int64)
    coef = np.zeros(2 * len(cells))
    for k, (with_, without, w) in enumerate(cells):
        group[with_], group[without] = 2 * k, 2 * k + 1
        coef[2 * k], coef[2 * k + 1] = w / total, -w / total
    rows = torch.from_numpy(np.flatnonzero(group >= 0))
    g = torch.from_numpy(group)[rows]
    xs, signed = x[rows].double(), torch.from_numpy(coef)[g]
    sizes = torch.bincount(g, minlength=len(coef)).double()
    vector = ((signed / sizes[g]) @ xs).float()
    replicates = None
    if weights is not None:
        w_rows = weights[:, rows].double()  # [B, r]
        side = torch.zeros(len(w_rows), len(coef), dtype=torch.float64).index_add_(1, g, w_rows)
        replicates = ((w_rows * signed / side[:, g].clamp(min=1.0)) @ xs).float()
    return Direction(vector, replicates, "measured", n_present, n_absent, note)


@dataclass(frozen=True)
class HeadScores:
    """What every concept's reliance reads and no concept changes: the head's scores on
    the audited instances, their classes and the classes' margin separation. Computed
    once per head (``head_scores``), not once per concept."""

    scores: Tensor  # [n, C]
    truth: Tensor  # [n]: class position, -1 for no known class
    known: Tensor  # [n] bool
    t: Tensor  # [n_known]: truth of the known instances
    own: Tensor  # [C]: instances of each class
    n_others: Tensor  # [C]: instances of the other classes
    separation: Tensor  # [C] float64: own mean margin minus the others' mean margin
    note: str = ""


def head_scores(x_nD: Tensor, weight_CD: Tensor, bias_C: Tensor, class_names: Sequence[str],
                labels: Sequence[str | None]) -> HeadScores:
    """The concept-independent part of ``measure_reliance`` (see there)."""
    n_classes = len(class_names)
    scores = x_nD @ weight_CD.T + bias_C
    position: dict[str | None, int] = {}
    for c, name in enumerate(class_names):
        position.setdefault(name, c)
    truth = torch.tensor([position.get(x, -1) for x in labels], dtype=torch.long)
    note = ""
    if not bool((truth >= 0).any()):
        truth = scores.argmax(dim=1)
        note = "no labels match the head's classes: its predictions stand in"
    known = truth >= 0
    t = truth[known]
    own = torch.bincount(t, minlength=n_classes)
    n_others = len(t) - own
    margins = _margins(scores[known])  # [n_known, C]
    column_sums = margins.sum(0, dtype=torch.float64)
    own_sums = torch.zeros(n_classes, dtype=torch.float64).index_add_(
        0, t, margins.gather(1, t[:, None])[:, 0].double())
    separation = own_sums / own.clamp(min=1) - (column_sums - own_sums) / n_others.clamp(min=1)
    return HeadScores(scores, truth, known, t, own, n_others, separation, note)


def measure_reliance(direction: Direction, concept: str, source: RelianceSource,
                     x_nD: Tensor, weight_CD: Tensor, bias_C: Tensor, class_names: Sequence[str],
                     labels: Sequence[str | None], presence: np.ndarray | None = None,
                     detail: str = "", seed: int = 0,
                     base: HeadScores | None = None) -> list[ConceptReliance]:
    """Per class of the head, its reliance on the concept over the audited instances
    (``x_nD`` from ``head_inputs``; ``labels`` the audited labels, predictions standing in
    where none match the head's classes; ``presence`` the audited instances' observed
    presence, or None when unknown), with the lower bound of its bootstrap replicates
    (the direction's replicates, each on a Poisson-weighted resample of the audited
    instances). Each class's record carries its own slices (class x presence).

    Every per-class figure is a count or sum over "the other classes' images", i.e. over
    the instances of a known class minus the class's own; they are all computed at once
    from per-instance outcomes (which do not depend on the class asked about) and per-class
    sums (``bincount``), so the cost is O(n x C), not O(n x C^2). ``base``: the head's
    ``head_scores`` on these instances, when the caller measures several concepts."""
    if direction.vector is None:
        return [ConceptReliance(concept, source, name, direction.status,  # type: ignore[arg-type]
                                n_present=direction.n_present, n_absent=direction.n_absent,
                                detail=_join(detail, direction.note))
                for name in class_names]
    n_classes = len(class_names)
    base = base or head_scores(x_nD, weight_CD, bias_C, class_names, labels)
    scores, truth, known, t, own, n_others = (base.scores, base.truth, base.known, base.t,
                                              base.own, base.n_others)
    note = _join(direction.note, base.note)
    shift = weight_CD @ direction.vector  # [C]: score change when the concept is added
    has = torch.zeros(len(x_nD), dtype=torch.bool) if presence is None \
        else torch.from_numpy(presence == 1)
    lost_Bn, weights_Bn = _lost_replicates(direction, weight_CD, scores, truth, has, known, seed)

    # per-instance outcomes over the instances of a known class, then per-class counts:
    # "the other classes' images" of class c are all of them minus c's own
    def others_count(hit: Tensor) -> Tensor:
        """Per class, how many of the other classes' images ``hit`` (bool [n_known])."""
        return int(hit.sum()) - torch.bincount(t[hit], minlength=n_classes)

    clean = scores[known]
    if bool(has.any()):  # the concept taken off the instances that carry it
        clean[has[known]] -= shift  # (scores[known] is a copy)
    pred_clean, pred_swapped = clean.argmax(1), (clean + shift).argmax(1)
    acc_clean = _ratio(others_count(pred_clean == t), n_others)
    acc_swapped = _ratio(others_count(pred_swapped == t), n_others)
    # images of another class called c: every image called c minus c's own images called c
    called_swapped = _ratio(torch.bincount(pred_swapped, minlength=n_classes)
                            - torch.bincount(t[pred_swapped == t], minlength=n_classes), n_others)
    called_clean = _ratio(torch.bincount(pred_clean, minlength=n_classes)
                          - torch.bincount(t[pred_clean == t], minlength=n_classes), n_others)
    flips = called_swapped - called_clean
    margin_shift = _margins(shift[None])[0]
    separation = base.separation
    low = _lower_bounds(lost_Bn, weights_Bn, known, t, n_classes)
    slices = _slices(scores, truth, presence, class_names) if presence is not None else None
    out = []
    for c, name in enumerate(class_names):
        measurable = bool(n_others[c] > 0)
        sep = float(separation[c]) if measurable and bool(own[c] > 0) else None
        reliance = float(acc_clean[c]) - float(acc_swapped[c]) if measurable else None
        out.append(ConceptReliance(
            concept=concept, source=source, class_name=name, status="measured",
            reliance=reliance,
            reliance_low=float(low[c]) if low is not None and measurable else None,
            flip_rate=float(flips[c]) if measurable else None,
            score_shift=float(margin_shift[c]),
            separation_ratio=float(margin_shift[c]) / sep if sep else None,
            n_present=direction.n_present, n_absent=direction.n_absent, detail=_join(detail, note),
            slices=slices[2 * c:2 * c + 2] if slices is not None else []))
    return out


def _ratio(count: Tensor, total: Tensor) -> Tensor:
    """float32 count / total (what a float mean of booleans gives; 0 where total is 0)."""
    return count.float() / total.clamp(min=1).float()


def _lower_bounds(lost_Bn: Tensor | None, weights_Bn: Tensor, known: Tensor, t: Tensor,
                  n_classes: int) -> Tensor | None:
    """Per class, the ``LOWER_QUANTILE`` of its replicates: the weighted mean of ``lost``
    over the other classes' images (integer sums: exact)."""
    if lost_Bn is None:
        return None
    w = weights_Bn[:, known].long()
    wl = w * lost_Bn[:, known].long()
    own_w = torch.zeros(len(w), n_classes, dtype=torch.long).index_add_(1, t, w)
    own_wl = torch.zeros(len(w), n_classes, dtype=torch.long).index_add_(1, t, wl)
    values = ((wl.sum(1, keepdim=True) - own_wl).float()
              / (w.sum(1, keepdim=True) - own_w).float().clamp(min=1.0))
    return torch.quantile(values, LOWER_QUANTILE, dim=0)


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
    weights = _poisson_weights(len(shifts), n, seed).to(torch.uint8)
    lost = torch.zeros(len(shifts), n, dtype=torch.int8)  # compact: B x n can be large
    rows = torch.nonzero(known).flatten()
    # without the concept an image's clean scores are its scores, the same in every
    # replicate: only whether the shifted scores keep its class depends on the replicate
    plain, tagged = rows[~has[rows]], rows[has[rows]]
    if len(plain):
        y, t = scores[plain], truth[plain]
        lost[:, plain] = ((y.argmax(1) == t).to(torch.int8)[None]
                          - _argmax_is(y, t, shifts).to(torch.int8))
    if len(tagged):  # the concept taken off (clean), then put back (swapped)
        y, t = scores[tagged], truth[tagged]
        lost[:, tagged] = (_argmax_is(y, t, shifts, tagged=True, back=False).to(torch.int8)
                           - _argmax_is(y, t, shifts, tagged=True, back=True).to(torch.int8))
    return lost, weights


def _argmax_is(y_nC: Tensor, t_n: Tensor, shifts_BC: Tensor, *, tagged: bool = False,
               back: bool = True) -> Tensor:
    """bool [B, n]: whether row n's scores in replicate b pick class t_n, exactly as the
    float32 arithmetic of the full [B, n, C] computation does, without forming it where
    bounds decide. The scores are y + s (``tagged`` False), y - s (``tagged``, not
    ``back``) or (y - s) + s (``tagged`` and ``back``). With Y2 the best other score of
    row n and c2 its class: t's value above the same expression of Y2 and the shift's
    extreme values makes t the unique maximum (rounding is monotone, so no other class's
    rounded value can exceed the rounded bound); t's value below c2's rules t out. Only
    the pairs in between are computed in full."""
    rows = torch.arange(len(y_nC))
    others = y_nC.clone()
    others[rows, t_n] = -math.inf
    second, runner = others.max(1) if y_nC.shape[1] > 1 else (
        torch.full((len(y_nC),), -math.inf), torch.zeros(len(y_nC), dtype=torch.long))

    def value(y: Tensor, s: Tensor) -> Tensor:
        if not tagged:
            return y + s
        return (y - s) + s if back else y - s

    s_max, s_min = shifts_BC.max(1).values[:, None], shifts_BC.min(1).values[:, None]
    if not tagged:
        upper = second[None] + s_max
    else:
        upper = second[None] - s_min
        upper = upper + s_max if back else upper
    mine = value(y_nC[rows, t_n][None], shifts_BC[:, t_n])  # [B, n]
    out = mine > upper
    undecided = ~out & ~(mine < value(y_nC[rows, runner][None], shifts_BC[:, runner]))
    b_idx, n_idx = torch.nonzero(undecided, as_tuple=True)
    step = max(1, _CHUNK_FLOATS // max(1, y_nC.shape[1]))
    for start in range(0, len(b_idx), step):
        b, i = b_idx[start:start + step], n_idx[start:start + step]
        out[b, i] = value(y_nC[i], shifts_BC[b]).argmax(1) == t_n[i]
    return out


@functools.lru_cache(maxsize=4)
def _poisson_weights(replicates: int, n: int, seed: int) -> Tensor:
    """[replicates, n] Poisson(1) resampling weights (read-only: shared by every concept
    an audit measures on the same instances, as drawing them again would give them)."""
    return torch.poisson(torch.ones(replicates, n), generator=torch.Generator().manual_seed(seed))


def _margins(scores: Tensor) -> Tensor:
    """[n, C]: each y_c minus the mean of the other classes' scores (y_c itself for a
    single class)."""
    n_classes = scores.shape[1]
    if n_classes == 1:
        return scores
    return scores - (scores.sum(1, keepdim=True) - scores) / (n_classes - 1)


def _slices(scores: Tensor, truth: Tensor, presence: np.ndarray,
            class_names: Sequence[str]) -> list[SliceAccuracy]:
    """Per class (in order), its accuracy on its images with and without the concept."""
    n_classes = len(class_names)
    correct = scores.argmax(1) == truth
    counts = {}
    for value in (True, False):
        rows = (truth >= 0) & torch.from_numpy(presence == (1 if value else 0))
        counts[value] = (torch.bincount(truth[rows], minlength=n_classes),
                         torch.bincount(truth[rows & correct], minlength=n_classes))
    out = []
    for c, name in enumerate(class_names):
        for value in (True, False):
            n, hits = counts[value]
            out.append(SliceAccuracy(name, value, int(n[c]),
                                     float(hits[c].float() / n[c].float()) if n[c] else None))
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
