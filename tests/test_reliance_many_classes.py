"""Concept reliance at many classes: ``measure_reliance`` computes every class at once
(per-class counts over the other classes' images); it must give what the definition
gives class by class (the per-class loop it replaced, kept here as the reference)."""

import math

import numpy as np
import pytest
import torch

from clipaudit.findings.reliance import (
    LOWER_QUANTILE,
    Direction,
    _lost_replicates,
    head_scores,
    measure_reliance,
)


def _reference(direction, x, weight, bias, class_names, labels, presence, seed=0):
    """The definition, one class at a time: (reliance, low, flips, shift, separation
    ratio, own slices) per class."""
    scores = x @ weight.T + bias
    truth = torch.tensor([class_names.index(s) if s in class_names else -1 for s in labels])
    known = truth >= 0
    shift = weight @ direction.vector
    has = torch.from_numpy(presence == 1) if presence is not None else torch.zeros(len(x), dtype=torch.bool)
    clean = scores - has[:, None].float() * shift
    lost, weights = _lost_replicates(direction, weight, scores, truth, has, known, seed)
    n_classes = len(class_names)

    def margin(s, c):
        return s[:, c] - (s.sum(1) - s[:, c]) / (n_classes - 1)

    def accuracy(s, rows):
        return float((s[rows].argmax(1) == truth[rows]).float().mean()) if bool(rows.any()) else None

    out = []
    for c in range(n_classes):
        others = known & (truth != c)
        swapped = clean + others[:, None].float() * shift
        a0, a1 = accuracy(clean, others), accuracy(swapped, others)
        flips = float((swapped[others].argmax(1) == c).float().mean()
                      - (clean[others].argmax(1) == c).float().mean()) if bool(others.any()) else None
        shift_c = float(margin(shift[None], c)[0])
        mine = known & (truth == c)
        sep = float(margin(scores, c)[mine].mean() - margin(scores, c)[others].mean()) \
            if bool(mine.any()) and bool(others.any()) else None
        low = None
        if lost is not None and bool(others.any()):
            w = weights[:, others].float()
            low = float(torch.quantile((w * lost[:, others]).sum(1) / w.sum(1).clamp(min=1.0),
                                       LOWER_QUANTILE))
        slices = []
        if presence is not None:
            pred = scores.argmax(1)
            for value in (True, False):
                rows = (truth == c) & torch.from_numpy(presence == (1 if value else 0))
                slices.append((value, int(rows.sum()),
                               float((pred[rows] == c).float().mean()) if rows.any() else None))
        out.append((None if a0 is None or a1 is None else a0 - a1, low, flips, shift_c,
                    shift_c / sep if sep else None, slices))
    return out


@pytest.mark.parametrize("n_classes, with_presence, unknown", [(2, True, 0.0), (7, False, 0.2),
                                                               (40, True, 0.1)])
def test_every_class_at_once_equals_the_definition_class_by_class(n_classes, with_presence,
                                                                   unknown):
    g = torch.Generator().manual_seed(n_classes)
    rng = np.random.default_rng(n_classes)
    n, dim = 600, 12
    names = [f"class {c}" for c in range(n_classes)]
    # a class left without images (its own counts are zero) and labels of no class
    labels = [names[c] if c != n_classes - 1 or n_classes == 2 else "elsewhere"
              for c in rng.integers(0, n_classes, n)]
    labels = [None if u < unknown else s for s, u in zip(labels, rng.random(n))]
    weight = torch.randn(n_classes, dim, generator=g)
    x = torch.randn(n, dim, generator=g) + 0.5 * weight[rng.integers(0, n_classes, n)]
    bias = 0.1 * torch.randn(n_classes, generator=g)
    vector = 0.8 * torch.randn(dim, generator=g)
    direction = Direction(vector, vector + 0.2 * torch.randn(100, dim, generator=g), "measured", 50, 60)
    presence = rng.choice(np.array([1, 0, -1], dtype=np.int8), n, p=[0.3, 0.6, 0.1]) \
        if with_presence else None
    got = measure_reliance(direction, "tag", "column", x, weight, bias, names, labels, presence)
    want = _reference(direction, x, weight, bias, names, labels, presence)
    assert [r.class_name for r in got] == names
    for r, (reliance, low, flips, shift, ratio, slices) in zip(got, want):
        assert r.reliance == reliance and r.reliance_low == low and r.flip_rate == flips
        assert r.score_shift == shift and (r.separation_ratio is None) == (ratio is None)
        if ratio is not None:  # the separation, summed in float64 here, float32 there
            assert math.isclose(shift / r.separation_ratio, shift / ratio, abs_tol=1e-4)
        assert [(s.present, s.n, s.accuracy) for s in r.slices] == slices
        assert all(s.class_name == r.class_name for s in r.slices)
    assert any(r.reliance not in (None, 0.0) for r in got)  # the data exercise the counts


def _lost_reference(shifts, scores, truth, has, known):
    """Whether each image loses its class, replicate by replicate, in full."""
    lost = torch.zeros(len(shifts), len(scores), dtype=torch.int8)
    for b, shift in enumerate(shifts):
        clean = scores - has[:, None].float() * shift
        lost[b] = ((clean.argmax(1) == truth).to(torch.int8)
                   - ((clean + shift).argmax(1) == truth).to(torch.int8))
    lost[:, ~known] = 0
    return lost


@pytest.mark.parametrize("n_classes, ties", [(1, False), (3, True), (50, False), (50, True)])
def test_lost_replicates_decide_by_bounds_what_the_full_argmax_decides(n_classes, ties):
    """Bounds settle most (replicate, image) pairs without the [B, n, C] argmax; the result
    must be the full argmax's, ties (first index wins) included."""
    g = torch.Generator().manual_seed(n_classes + ties)
    n, dim = 400, 6
    x = torch.randn(n, dim, generator=g)
    weight = torch.randn(n_classes, dim, generator=g)
    if ties:  # integer scores and shifts: many exact ties between classes
        x, weight = x.round(), weight.round()
    replicates = torch.randn(30, dim, generator=g) * (1.0 if ties else 0.3)
    if ties:
        replicates = replicates.round()
    scores = x @ weight.T
    truth = torch.randint(-1, n_classes, (n,), generator=g)
    has = torch.rand(n, generator=g) < 0.3
    direction = Direction(replicates[0], replicates, "measured", 10, 10)
    lost, weights = _lost_replicates(direction, weight, scores, truth, has, truth >= 0, 0)
    want = _lost_reference(replicates @ weight.T, scores, truth, has, truth >= 0)
    assert torch.equal(lost, want)
    assert weights.shape == (30, n)
    if n_classes > 1:
        assert lost.abs().sum() > 0


def _direction_reference(x, presence, labels, bootstrap, seed=0):
    """The direction cell by cell: within-class differences of (Poisson-weighted) means."""
    present, absent = presence == 1, presence == 0
    names = sorted({s for s in labels if s is not None})
    arr = np.array([s if s is not None else "" for s in labels], dtype=object)
    cells = []
    for name in names:
        w1, w0 = present & (arr == name), absent & (arr == name)
        if min(w1.sum(), w0.sum()) >= 10:
            cells.append((torch.from_numpy(w1), torch.from_numpy(w0), float(min(w1.sum(), w0.sum()))))
    weights = torch.poisson(torch.ones(bootstrap, len(x)), generator=torch.Generator().manual_seed(seed))
    total = sum(w for *_, w in cells)
    vector, replicates = torch.zeros(x.shape[1]), torch.zeros(bootstrap, x.shape[1])

    def wmean(w, rows):
        return (w @ rows) / w.sum(1, keepdim=True).clamp(min=1.0)

    for m1, m0, w in cells:
        vector += (w / total) * (x[m1].mean(0) - x[m0].mean(0))
        replicates += (w / total) * (wmean(weights[:, m1], x[m1]) - wmean(weights[:, m0], x[m0]))
    return vector, replicates, len(cells)


def test_the_direction_of_many_cells_at_once_equals_the_cell_by_cell_means():
    from clipaudit.findings.reliance import concept_direction

    rng = np.random.default_rng(3)
    n, dim = 3000, 9
    labels = [None if u < 0.05 else f"class {c}" for c, u in zip(rng.integers(0, 60, n), rng.random(n))]
    presence = rng.choice(np.array([1, 0, -1], dtype=np.int8), n, p=[0.4, 0.55, 0.05])
    x = torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32))
    got = concept_direction(x, presence, labels, bootstrap=40)
    vector, replicates, n_cells = _direction_reference(x, presence, labels, 40)
    assert got.status == "measured" and 5 < n_cells < 60  # some classes make cells, some not
    torch.testing.assert_close(got.vector, vector, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.replicates, replicates, atol=1e-5, rtol=1e-4)


def test_one_head_scores_shared_by_several_concepts_gives_what_each_computed_alone():
    """``head_reliance`` computes the head's scores once and passes them to every concept;
    each concept's records must be those ``measure_reliance`` gives on its own (a concept
    that took itself off the shared scores in place would change the next ones)."""
    g = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    n, dim, n_classes = 500, 10, 6
    names = [f"class {c}" for c in range(n_classes)]
    labels = [names[c] for c in rng.integers(0, n_classes, n)]
    weight, bias = torch.randn(n_classes, dim, generator=g), torch.randn(n_classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    base = head_scores(x, weight, bias, names, labels)
    for k in range(3):
        vector = torch.randn(dim, generator=g)
        direction = Direction(vector, vector + 0.3 * torch.randn(50, dim, generator=g),
                              "measured", 40, 40)
        presence = (rng.random(n) < 0.3).astype(np.int8) if k != 1 else None
        alone = measure_reliance(direction, f"c{k}", "column", x, weight, bias, names, labels,
                                 presence)
        shared = measure_reliance(direction, f"c{k}", "column", x, weight, bias, names, labels,
                                  presence, base=base)
        assert shared == alone
        assert any(r.reliance for r in alone)
