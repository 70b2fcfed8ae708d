"""Causal checks at the default hook point: ablation (z_j = 0, SAE error held fixed)
and deletion curves (faithfulness of a component ranking).

Both run the exact model (true LayerNorm, exact head normalisation) from the
cached CLS activations: removing component j changes h by -z_j * W_dec[:, j] / scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from clipaudit.extraction.hooks import VisionTower
from clipaudit.heads import Head
from clipaudit.results import AblationEffect, FaithfulnessCurve, SliceEffect
from clipaudit.sae.model import SAE

FAITHFULNESS_METHODS: tuple[str, ...] = (
    "act_x_grad", "logit_lens", "act_x_logit_lens", "activation", "random",
)


def _atoms(sae: SAE) -> torch.Tensor:
    """Raw-space decoder directions [n_latents, d]."""
    return sae.W_dec.detach().float().T / float(sae.scale)


@torch.no_grad()
def ablated_scores(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: VisionTower,
                   components: Sequence[int], *, codes=None) -> torch.Tensor:
    """Class scores [n, C] with ``components`` set to zero (error held fixed).

    ``codes`` (sparse codes of ``acts_nd``, ``.indices``/``.values`` [n, k]) saves
    re-encoding when many ablations run on the same activations."""
    h = acts_nd.float()
    if len(components):
        codes = codes if codes is not None else sae.encode(h)
        z = torch.stack([(codes.values.float() * (codes.indices == j)).sum(1) for j in components], 1)
        h = h - z @ _atoms(sae)[list(components)]
    return head.scores(tower.readout_cls(h))


@dataclass(frozen=True)
class _Outcome:
    scores: torch.Tensor
    pred: torch.Tensor


def ablation_effect(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: VisionTower, component: int,
                    class_name: str, labels: Sequence[str | None], metadata: pd.DataFrame | None = None,
                    *, clean_scores: torch.Tensor | None = None, codes=None) -> AblationEffect:
    """Effect of removing one component on the class score, predictions and accuracy,
    overall and per metadata slice (each value of each low-cardinality column)."""
    c = head.class_names.index(class_name)
    if clean_scores is None:
        clean_scores = ablated_scores(acts_nd, sae, head, tower, [])
    before = _Outcome(clean_scores, clean_scores.argmax(1))
    after_scores = ablated_scores(acts_nd, sae, head, tower, [component], codes=codes)
    after = _Outcome(after_scores, after_scores.argmax(1))
    truth = _label_indices(labels, head.class_names)
    of_class = (truth == c) if (truth >= 0).any() else (before.pred == c)
    score_delta = float((after.scores[:, c] - before.scores[:, c])[of_class].mean()) if of_class.any() else 0.0
    slices = []
    if metadata is not None:
        for column in metadata.columns:
            values = metadata[column]
            if values.nunique(dropna=True) > 6:
                continue
            for value in sorted(values.dropna().unique(), key=str):
                mask = torch.tensor((values == value).to_numpy(dtype=bool))
                slices.append(_slice(column, value, mask, c, before, after, truth))
    return AblationEffect(
        component=int(component), class_name=class_name, score_delta=score_delta,
        accuracy_before=_accuracy(before.pred, truth, None), accuracy_after=_accuracy(after.pred, truth, None),
        flipped=int((before.pred != after.pred).sum()), slices=slices)


def _slice(column, value, mask, c, before, after, truth) -> SliceEffect:
    delta = float((after.scores[mask, c] - before.scores[mask, c]).mean()) if mask.any() else 0.0
    return SliceEffect(column=str(column), value=str(value), n=int(mask.sum()), score_delta=delta,
                       accuracy_before=_accuracy(before.pred, truth, mask),
                       accuracy_after=_accuracy(after.pred, truth, mask),
                       flipped=int((before.pred[mask] != after.pred[mask]).sum()))


def _label_indices(labels: Sequence[str | None], class_names: Sequence[str]) -> torch.Tensor:
    lookup = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([lookup.get(lab, -1) if lab is not None else -1 for lab in labels],
                        dtype=torch.long)


def _accuracy(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None) -> float | None:
    known = truth >= 0
    if mask is not None:
        known = known & mask
    if not known.any():
        return None
    return float((pred[known] == truth[known]).float().mean())


# ------------------------------------------------------------------ deletion curves


@torch.no_grad()
def deletion_curves(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: VisionTower,
                    target: torch.Tensor, *, steps: int = 16, seed: int = 0,
                    methods: Sequence[str] = FAITHFULNESS_METHODS) -> list[FaithfulnessCurve]:
    """Remove each instance's top components (by each ranking) one at a time and record
    the mean score of its ``target`` class; a faithful ranking makes the score fall fast.

    Rankings: act x grad (frozen-LayerNorm gradient), Logit Lens (decoder direction
    through ln_post and proj onto the class direction, instance-independent), act x
    Logit Lens, activation, random. ``auc`` is the mean of the curve normalised by
    the clean score's magnitude (lower = evidence removed faster).
    """
    from clipaudit.attribution.patching import attribute_cls

    h = acts_nd.float()
    n = len(h)
    codes = sae.encode(h)
    idx, z = codes.indices, codes.values.float()
    attr = attribute_cls(h, torch.arange(n), sae, head, tower)
    lens = _logit_lens(sae, head, tower)  # [n_latents, C]
    # act x grad for each instance's active components, in the order of ``idx``
    slot = (idx[attr.rows] == attr.components[:, None]).int().argmax(1)
    act_x_grad = torch.zeros(idx.shape)
    act_x_grad[attr.rows, slot] = attr.values[torch.arange(len(attr.rows)), target[attr.rows]]
    keys = {
        "act_x_grad": act_x_grad,
        "logit_lens": lens[idx, target[:, None]],
        "act_x_logit_lens": z * lens[idx, target[:, None]],
        "activation": z,
        "random": torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)),
    }
    atoms = _atoms(sae)
    clean = head.scores(tower.readout_cls(h))[torch.arange(n), target]
    norm = clean.abs().mean().clamp_min(1e-12)
    steps = min(steps, idx.shape[1])
    curves = []
    for method in methods:
        order = keys[method].argsort(dim=1, descending=True)
        hm, scores = h.clone(), [float(clean.mean())]
        for s in range(steps):
            pick = order[:, s]
            j, zj = idx[torch.arange(n), pick], z[torch.arange(n), pick]
            hm = hm - zj[:, None] * atoms[j]
            scores.append(float(head.scores(tower.readout_cls(hm))[torch.arange(n), target].mean()))
        curves.append(FaithfulnessCurve(method=method, steps=list(range(steps + 1)), scores=scores,
                                        auc=float(np.mean(scores) / float(norm))))
    return curves


def _logit_lens(sae: SAE, head: Head, tower: VisionTower) -> torch.Tensor:
    """[n_latents, C]: each decoder direction through ln_post (no centring shift: a
    direction, so beta drops out) and proj, dotted with the head's class directions."""
    ln = tower.visual.ln_post
    atoms = sae.W_dec.detach().float().T  # [m, d]
    centred = atoms - atoms.mean(-1, keepdim=True)
    g = ln.weight.detach().float() if ln.weight is not None else 1.0
    proj = tower.visual.proj
    dirs = (centred * g) @ (proj.detach().float() if proj is not None else torch.eye(atoms.shape[1]))
    probe_e = torch.zeros(1, dirs.shape[1])
    weight = head.linear_form(probe_e + 1.0).weight  # [C, D]; scale irrelevant for ranking
    return dirs @ weight.T
