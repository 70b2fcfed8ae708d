"""Causal checks from a pooled cache: ablation (z_j = 0, SAE error held fixed) and
deletion curves (faithfulness of a component ranking).

Both run the exact model (true norm, exact head normalisation) from the cached
pooled vectors: removing component j changes h by -z_j * W_dec[:, j] / scale, and
the rest of the tower (``PooledReadout``) maps h to the embedding. ``tower`` is the
tower or its pooled readout.
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
from clipaudit.heads import Head
from clipaudit.results import AblationEffect, FaithfulnessCurve, SliceEffect
from clipaudit.sae.model import SAE, decoder_rows_for

FAITHFULNESS_METHODS: tuple[str, ...] = (
    "act_x_grad", "act_x_grad_exact", "logit_lens", "act_x_logit_lens", "activation", "random",
)
"""``act_x_grad``: attributions with frozen norms (clipaudit's default); ``act_x_grad_exact``:
plain autograd (the paper's); Logit Lens; act x Logit Lens; activation; random."""

ReadoutLike = Tower | PooledReadout


def _atoms(sae: SAE) -> torch.Tensor:
    """Decoder directions [n_latents, d] (raw space up to each row's multiplier)."""
    return sae.W_dec.detach().float().T


def _row_multiplier(sae: SAE, h: torch.Tensor) -> torch.Tensor:
    """[n, 1]: what each row's decoder multiplies a direction by (1 / scale, or the row's
    own factor for SAEs that normalise each input row)."""
    mult, _ = decoder_rows_for(sae, h)
    return torch.as_tensor(mult, dtype=h.dtype).reshape(-1, 1).expand(len(h), 1)


@torch.no_grad()
def ablated_scores(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: ReadoutLike,
                   components: Sequence[int], *, codes=None) -> torch.Tensor:
    """Class scores [n, C] with ``components`` set to zero (error held fixed).

    ``codes`` (sparse codes of ``acts_nd``, ``.indices``/``.values`` [n, k]) saves
    re-encoding when many ablations run on the same activations."""
    h = acts_nd.float()
    if len(components):
        codes = codes if codes is not None else sae.encode(h)
        z = torch.stack([(codes.values.float() * (codes.indices == j)).sum(1) for j in components], 1)
        h = h - (z @ _atoms(sae)[list(components)]) * _row_multiplier(sae, h)
    return head.scores(as_readout(tower)(h))


@dataclass(frozen=True)
class _Outcome:
    scores: torch.Tensor
    pred: torch.Tensor


def ablation_effect(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: ReadoutLike, component: int,
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
def deletion_curves(acts_nd: torch.Tensor, sae: SAE, head: Head, tower: ReadoutLike,
                    target: torch.Tensor, *, steps: int = 16, seed: int = 0,
                    methods: Sequence[str] = FAITHFULNESS_METHODS) -> list[FaithfulnessCurve]:
    """Remove each instance's top components (by each ranking) one at a time and record
    the mean score of its ``target`` class; a faithful ranking makes the score fall fast.

    Rankings: act x grad with frozen norms and with exact gradients (the two gradient
    modes side by side), Logit Lens (decoder direction through the rest of the tower
    onto the class direction, instance-independent), act x Logit Lens, activation,
    random. ``auc`` is the mean of the curve normalised by the clean score's magnitude
    (lower = evidence removed faster).
    """
    readout = as_readout(tower)
    h = acts_nd.float()
    n = len(h)
    codes = sae.encode(h)
    idx, z = codes.indices, codes.values.float()
    lens = _logit_lens(sae, head, readout, idx, target)  # [n, k]
    keys = {
        "act_x_grad": _act_x_grad(h, idx, sae, head, readout, target, "frozen"),
        "act_x_grad_exact": _act_x_grad(h, idx, sae, head, readout, target, "exact"),
        "logit_lens": lens,
        "act_x_logit_lens": z * lens,
        "activation": z,
        "random": torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)),
    }
    atoms = _atoms(sae)
    mult = _row_multiplier(sae, h)
    clean = head.scores(readout(h))[torch.arange(n), target]
    norm = clean.abs().mean().clamp_min(1e-12)
    steps = min(steps, idx.shape[1])
    curves = []
    for method in methods:
        order = keys[method].argsort(dim=1, descending=True)
        hm, scores = h.clone(), [float(clean.mean())]
        for s in range(steps):
            pick = order[:, s]
            j, zj = idx[torch.arange(n), pick], z[torch.arange(n), pick]
            hm = hm - zj[:, None] * atoms[j] * mult
            scores.append(float(head.scores(readout(hm))[torch.arange(n), target].mean()))
        curves.append(FaithfulnessCurve(method=method, steps=list(range(steps + 1)), scores=scores,
                                        auc=float(np.mean(scores) / float(norm))))
    return curves


def _act_x_grad(h: torch.Tensor, idx: torch.Tensor, sae: SAE, head: Head, readout: PooledReadout,
                target: torch.Tensor, gradient: str) -> torch.Tensor:
    """[n, k] each instance's attribution to its target class, in the order of ``idx``.

    Frozen: the closed form (``attribute_cls``). Exact: z times the gradient of the target
    class's score, in one backward pass of the targets' summed scores (an instance's
    score depends on its own codes only), not one per class: at 1,000 classes and a wide
    SAE the per-class gradients of the decoded activations would take tens of GB."""
    from clipaudit.attribution.patching import _scores, attribute_cls, decode_codes

    if gradient == "exact":
        codes = sae.encode(h)
        with torch.enable_grad():
            z = codes.values.float().detach().requires_grad_(True)
            h_hat = decode_codes(sae, codes.indices, z, codes)
            scores, _ = _scores(readout(h_hat + (h - h_hat).detach()), head, gradient)
            (grad_z,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), z)
        attr = z.detach() * grad_z
        slot = (codes.indices[:, :, None] == idx[:, None, :]).int().argmax(1)  # codes -> idx order
        return attr.gather(1, slot)
    frozen = attribute_cls(h, torch.arange(len(h)), sae, head, readout, gradient=gradient)
    slot = (idx[frozen.rows] == frozen.components[:, None]).int().argmax(1)
    out = torch.zeros(idx.shape)
    out[frozen.rows, slot] = frozen.values[torch.arange(len(frozen.rows)), target[frozen.rows]]
    return out


def _logit_lens(sae: SAE, head: Head, readout: PooledReadout, idx: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
    """[n, k]: the Logit Lens of each instance's active components ``idx`` for its target
    class: the decoder direction through the rest of the tower (the norm's centring and
    gain, no scale or shift: a direction; then the projection, minus where it sends
    zero), dotted with the target's class direction. Only the components and classes
    asked for are computed (every component x every class is a 32,768 x 1,000 product
    through the projection at the paper's scale); an affine readout pulls the class
    direction back instead (``NormSpec.adjoint`` is the transpose of ``linear_part``)."""
    atoms = sae.W_dec.detach().float().T  # [m, d]

    def class_weight(dim: int) -> torch.Tensor:  # [C, D]; the scale is irrelevant for ranking
        return head.linear_form(torch.ones(1, dim)).weight.detach().float()

    if readout.affine is not None:
        w_proj = readout.affine[0].float()  # [d, D]
        back = class_weight(w_proj.shape[1])[target] @ w_proj.T  # [n, d]
        back = readout.norm.adjoint(back) if readout.norm is not None else back
        return torch.einsum("nkd,nd->nk", atoms[idx], back)
    latents, where = torch.unique(idx, return_inverse=True)
    directed = readout.norm.linear_part(atoms[latents]) if readout.norm is not None else atoms[latents]
    dirs = readout.post(directed) - readout.post(torch.zeros(1, atoms.shape[1]).to(directed))
    return torch.einsum("nkD,nD->nk", dirs[where], class_weight(dirs.shape[1])[target])
