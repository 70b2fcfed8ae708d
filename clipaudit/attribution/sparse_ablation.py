"""Ablation effects computed from the instances where a component fires.

Setting z_j = 0 (SAE error held fixed) changes h by -z_j * W_dec[:, j] / scale, which
is zero wherever component j is silent: there the scores do not change at all. So
``ablation.ablation_effect``'s numbers (class-score change over the class's instances,
accuracy before and after, flipped predictions, all per metadata slice) follow from the
firing instances alone plus counts over all instances that the audit's first pass
already has (predictions, labels). The model runs on the firing instances only, and
nothing dense over the data set is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from clipaudit.attribution.patching import as_readout
from clipaudit.extraction.hooks import Tower
from clipaudit.extraction.readout import PooledReadout
from clipaudit.findings.evidence import Firing
from clipaudit.heads import Head
from clipaudit.results import AblationEffect, SliceEffect
from clipaudit.sae.model import SAE, decoder_rows_for

MAX_SLICE_VALUES = 6
"""Metadata columns with more distinct values than this are not sliced."""


@dataclass(frozen=True)
class _Slice:
    column: str
    value: str
    mask: np.ndarray
    n: int
    known: int
    correct: int


@dataclass(frozen=True)
class AblationContext:
    """What every ablation of one head shares: each instance's clean prediction and label
    (as class indices of the head, -1 unknown) and the metadata slices."""

    pred: np.ndarray
    truth: np.ndarray
    correct: np.ndarray
    """bool [n]: the clean prediction is the (known) label."""
    slices: tuple[_Slice, ...]

    @staticmethod
    def build(pred: np.ndarray, truth: np.ndarray, metadata: pd.DataFrame | None) -> AblationContext:
        correct = (pred == truth) & (truth >= 0)
        known = truth >= 0
        slices = []
        for column in (metadata.columns if metadata is not None else []):
            values = metadata[column]  # type: ignore[index]
            if values.nunique(dropna=True) > MAX_SLICE_VALUES:
                continue
            for value in sorted(values.dropna().unique(), key=str):
                mask = (values == value).to_numpy(dtype=bool)
                slices.append(_Slice(str(column), str(value), mask, int(mask.sum()),
                                     int((known & mask).sum()), int((correct & mask).sum())))
        return AblationContext(pred, truth, correct, tuple(slices))

    def of_class(self, c: int) -> np.ndarray:
        """The instances the score change is averaged over: labelled c, or predicted c
        when nothing is labelled (as ``ablation.ablation_effect``)."""
        return self.truth == c if (self.truth >= 0).any() else self.pred == c


@dataclass(frozen=True)
class ComponentAblation:
    """One component removed on the rows where it fires, for one head: what every class's
    ablation effect is computed from (the model runs once per component, not per class)."""

    positions: np.ndarray
    delta: torch.Tensor
    """[f, C'] change of the class scores in ``classes`` (every class when None)."""
    flipped: np.ndarray
    """bool [f]: the predicted class changed."""
    correct_before: np.ndarray
    correct_after: np.ndarray
    classes: tuple[int, ...] | None = None
    """The head's class indices of ``delta``'s columns; None: all, in order."""

    def column(self, c: int) -> torch.Tensor:
        """[f]: the change of class ``c``'s score."""
        return self.delta[:, c if self.classes is None else self.classes.index(c)]

    @staticmethod
    def concat(parts: Sequence[ComponentAblation]) -> ComponentAblation:
        """The ablation over consecutive row chunks, as one."""
        return ComponentAblation(
            positions=np.concatenate([p.positions for p in parts]),
            delta=torch.cat([p.delta for p in parts]),
            flipped=np.concatenate([p.flipped for p in parts]),
            correct_before=np.concatenate([p.correct_before for p in parts]),
            correct_after=np.concatenate([p.correct_after for p in parts]),
            classes=parts[0].classes)


@torch.no_grad()
def ablate_component(ctx: AblationContext, head: Head, tower: Tower | PooledReadout, sae: SAE,
                     component: int, firing: Firing, acts_fd: torch.Tensor,
                     classes: Sequence[int] | None = None) -> ComponentAblation:
    """Scores before and after removing ``component`` from the rows where it fires
    (``firing``, activations ``acts_fd`` [f, d]); the score changes of ``classes`` only
    (None: every class; at 1,000 classes and rows where a component fires often, [f, C]
    is gigabytes), predictions over every class."""
    h = acts_fd.float()
    readout = as_readout(tower)
    mult, _ = decoder_rows_for(sae, h)  # 1 / scale, times each row's norm where the SAE has one
    atom = sae.W_dec.detach().float()[:, component]
    removed = torch.from_numpy(firing.values).float() * torch.as_tensor(mult, dtype=torch.float32)
    before = head.scores(readout(h))
    after = head.scores(readout(h - removed[:, None] * atom))
    pred_b, pred_a = before.argmax(1).numpy(), after.argmax(1).numpy()
    truth = ctx.truth[firing.positions]
    delta = after - before if classes is None else after[:, list(classes)] - before[:, list(classes)]
    return ComponentAblation(firing.positions, delta.double(), pred_b != pred_a,
                             (pred_b == truth) & (truth >= 0), (pred_a == truth) & (truth >= 0),
                             classes=None if classes is None else tuple(int(c) for c in classes))


def class_effect(ctx: AblationContext, ablation: ComponentAblation, component: int,
                 c: int, class_name: str) -> AblationEffect:
    """``ablation.ablation_effect`` for class ``c`` from a component's ablation."""
    pos = ablation.positions
    delta = ablation.column(c).numpy()
    of_class = ctx.of_class(c)
    n_class = int(of_class.sum())
    known = int((ctx.truth >= 0).sum())
    total_correct = int(ctx.correct.sum())

    def accuracy(correct: int, n_known: int) -> float | None:
        return correct / n_known if n_known else None

    slices = []
    for s in ctx.slices:
        inside = s.mask[pos]
        slices.append(SliceEffect(
            column=s.column, value=s.value, n=s.n,
            score_delta=float(delta[inside].sum() / s.n) if s.n else 0.0,
            accuracy_before=accuracy(s.correct, s.known),
            accuracy_after=accuracy(s.correct - int(ablation.correct_before[inside].sum())
                                    + int(ablation.correct_after[inside].sum()), s.known),
            flipped=int(ablation.flipped[inside].sum())))
    return AblationEffect(
        component=int(component), class_name=class_name,
        score_delta=float(delta[of_class[pos]].sum() / n_class) if n_class else 0.0,
        accuracy_before=accuracy(total_correct, known),
        accuracy_after=accuracy(total_correct - int(ablation.correct_before.sum())
                                + int(ablation.correct_after.sum()), known),
        flipped=int(ablation.flipped.sum()), slices=slices)


def ablation_effect_sparse(ctx: AblationContext, head: Head, tower: Tower | PooledReadout, sae: SAE,
                           component: int, class_name: str, firing: Firing,
                           acts_fd: torch.Tensor) -> AblationEffect:
    """``ablation.ablation_effect`` for ``component`` and ``class_name``, from the rows
    where the component fires (``firing``) and their activations ``acts_fd`` [f, d]."""
    ablation = ablate_component(ctx, head, tower, sae, component, firing, acts_fd)
    return class_effect(ctx, ablation, component, head.class_names.index(class_name), class_name)
