"""Attribution patching towards zero: A[n, j, c] = z[n, j] * dy_c/dz[n, j].

Conventions (the contract is shared/DESIGN.md section 2):

- The SAE error eps = h - h_hat is computed on the clean pass and held fixed, so
  the patched model reproduces the original scores exactly.
- Two gradient modes. ``frozen`` (the default) holds every norm scale downstream of
  the hook point and the head's per-instance normalisation (|e| for cosine / L2
  heads) fixed: the common "frozen LayerNorm" linearisation. At the pooled hook
  point (and the last block's class token of a class-token ViT) the rest of the
  tower is then affine in h for every open_clip tower but the two with an MLP
  projection, and attributions are complete: for every instance and class
      y_c - b_c = sum_j A[n, j, c] + A_err[n, c] + A_bias[n, c],
  where A_err = eps . dy_c/dh and A_bias = b_dec . dy_c/dh plus the constant
  that the downstream biases (the norm's beta, the projection's bias, the head's
  offset) contribute. (With exact LayerNorm gradients h . dy/dh is zero, since
  LayerNorm is scale invariant, and no such decomposition exists.) ``exact`` is
  plain autograd through every norm and the head's normalisation, as the paper's
  reference code does; it reproduces that code's attributions. Elsewhere (earlier
  blocks, exact mode, MLP projections) A_bias is the b_dec term alone.
- All classes come from one forward pass per batch: in closed form from a pooled
  cache (the gradient is a fixed direction per class divided by a per-instance
  scale), by one batched backward pass elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from clipaudit.attribution.records import (  # noqa: F401  (Attributions re-exported)
    Attributions,
    assemble,
    concat_attributions,
    sparse_part,
    spatial_part,
)
from clipaudit.errors import InputError
from clipaudit.extraction.hooks import HookPoint, Tower
from clipaudit.extraction.readout import PooledReadout, frozen_norms
from clipaudit.heads import Head
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.model import SAE, decoder_rows

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ pooled hook point

GRADIENT_MODES: tuple[str, ...] = ("frozen", "exact")


def check_gradient(gradient: str) -> None:
    if gradient not in GRADIENT_MODES:
        raise InputError(f"gradient {gradient!r} is not one of {', '.join(GRADIENT_MODES)}")


def as_readout(tower: Tower | PooledReadout) -> PooledReadout:
    """The rest of the tower from its pooled vector (a readout passes through)."""
    return tower if isinstance(tower, PooledReadout) else tower.pooled_readout


@dataclass(frozen=True)
class _ClosedForm:
    """The affine structure of norm -> projection -> head for one head (frozen mode)."""

    directions: torch.Tensor
    """[C, d]: dy_c/dh = directions[c] / (sigma_n * s_n)."""
    latent_dirs: torch.Tensor
    """[C, n_latents] directions @ W_dec (times the decoder's row multiplier, 1 / scale)."""
    b_dec_term: torch.Tensor
    """[C] directions @ b_dec (likewise)."""
    ones_term: torch.Tensor
    """[C] directions @ 1: what a per-row decoder offset contributes."""
    offset: torch.Tensor
    """[D] the embedding of h = 0 with the norm's scale set aside: beta @ W + b."""


def _closed_form(readout: PooledReadout, weight: torch.Tensor, sae: SAE) -> _ClosedForm:
    assert readout.affine is not None
    W, b = (t.float().to(weight.device) for t in readout.affine)
    u = weight @ W.T  # [C, d]
    norm = readout.norm
    dirs = norm.adjoint(u) if norm is not None else u
    has_beta = norm is not None and norm.bias is not None
    beta = norm.bias.float().to(W) if has_beta else torch.zeros(W.shape[0]).to(W)  # type: ignore[union-attr]
    return _ClosedForm(dirs, dirs @ sae.W_dec.detach().float(), dirs @ sae.b_dec.detach().float(),
                       dirs.sum(-1), beta @ W + b)


@torch.no_grad()
def attribute_cls(acts_nd: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                  tower: Tower | PooledReadout, *, batch_size: int = 4096,
                  gradient: str = "frozen", reporter: Reporter = NULL_REPORTER) -> Attributions:
    """Attributions from cached pooled vectors (or the last block's class token of a
    class-token ViT, which is the same vector). ``tower``: the tower or its
    ``pooled_readout``. ``gradient``: ``frozen`` (complete attributions) or ``exact``
    (the paper's plain autograd)."""
    batches = (
        (acts_nd[s:s + batch_size], ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)
    )
    return attribute_cls_batches(batches, sae, head, tower, n_total=len(ids), gradient=gradient,
                                 reporter=reporter)


@torch.no_grad()
def attribute_cls_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], sae: SAE,
                          head: Head, tower: Tower | PooledReadout, *, n_total: int | None = None,
                          gradient: str = "frozen",
                          reporter: Reporter = NULL_REPORTER) -> Attributions:
    """Streaming version of ``attribute_cls`` over (acts [b, d], ids [b]) batches."""
    check_gradient(gradient)
    readout = as_readout(tower)
    closed = gradient == "frozen" and readout.is_affine
    form_cache: dict[str, _ClosedForm] = {}
    parts: list[dict[str, torch.Tensor]] = []
    head_bias = torch.zeros(len(head.class_names))
    with reporter.task("attributing", total=n_total) as task:
        for h, ids in batches:
            if closed:
                part, head_bias = _closed_form_part(h.float(), ids, sae, head, readout, form_cache)
            else:
                with torch.enable_grad():
                    part, head_bias = _autograd_part(h.float(), ids, sae, head, readout, gradient)
            parts.append(part)
            task.advance(len(ids))
    return assemble(parts, head, sae.n_latents, head_bias)


def _closed_form_part(h: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                      readout: PooledReadout, cache: dict[str, _ClosedForm]
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    codes = sae.encode(h)
    idx, z = codes.indices, codes.values.float()
    eps = h - sae.decode(codes).float()
    sigma = readout.norm.sigma(h) if readout.norm is not None else torch.ones(len(h)).to(h)
    e = readout(h)
    form = head.linear_form(e)
    if "form" not in cache:
        cache["form"] = _closed_form(readout, form.weight.float(), sae)
    cf = cache["form"]
    inv = 1.0 / (sigma * form.scale)  # [b]
    mult, shift = decoder_rows(sae, codes)
    dec = inv * mult  # [b]: the decoder's row multiplier and the readout's scale together
    values = z[..., None] * cf.latent_dirs.T[idx] * dec[:, None, None]  # [b, k, C]
    error = (eps @ cf.directions.T) * inv[:, None]
    const = ((cf.offset - form.offset) @ form.weight.T) / form.scale[:, None]
    offset = (torch.as_tensor(shift).to(h) * inv)[..., None] * cf.ones_term  # per-row decoder offset
    bias = cf.b_dec_term * dec[:, None] + offset + const
    return sparse_part(ids, idx, z, values, error, bias, form.scores(e)), form.bias


def _autograd_part(h: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                   readout: PooledReadout, gradient: str
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    codes = sae.encode(h)
    idx = codes.indices
    z = codes.values.float().detach().requires_grad_(True)
    h_hat = decode_codes(sae, idx, z, codes)
    eps = (h - h_hat).detach()
    h_patched = h_hat + eps
    scores, head_bias = _scores(readout.frozen(h_patched) if gradient == "frozen"
                                else readout(h_patched), head, gradient)
    grad_z, grad_h = _all_class_grads(scores, (z, h_patched))
    values = (z.detach()[None] * grad_z).movedim(0, -1)  # [b, k, C]
    error = torch.einsum("nd,cnd->nc", eps, grad_h)
    bias = torch.einsum("nd,cnd->nc", _decoder_constant(sae, codes, h.shape), grad_h)
    return sparse_part(ids, idx, z.detach(), values.detach(), error.detach(), bias.detach(),
                        scores.detach()), head_bias


def _scores(e: torch.Tensor, head: Head, gradient: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class scores of ``e`` with the head's normalisation held fixed (frozen) or
    differentiated through (exact), and the head's bias."""
    form = head.linear_form(e)
    return (form.scores(e) if gradient == "frozen" else head.scores(e)), form.bias


# ------------------------------------------------------------------ any hook point (autograd)


frozen_layernorms = frozen_norms
"""Former name of ``clipaudit.extraction.readout.frozen_norms``."""


def decode_codes(sae: SAE, indices: torch.Tensor, values: torch.Tensor,
                 codes: object = None) -> torch.Tensor:
    """h_hat in raw space, differentiable in ``values`` ([..., k] -> [..., d]); ``codes``
    carry the per-row decoder affine of SAEs that normalise each row."""
    atoms = sae.W_dec.T[indices]  # [..., k, d]
    x_hat = torch.einsum("...k,...kd->...d", values, atoms) + sae.b_dec
    mult, shift = decoder_rows(sae, codes)
    if isinstance(mult, torch.Tensor):
        lead = indices.shape[:-1]
        return x_hat * mult.reshape(*lead, 1) + torch.as_tensor(shift).reshape(*lead, 1)
    return x_hat * mult


def _decoder_constant(sae: SAE, codes: object, shape: torch.Size) -> torch.Tensor:
    """[..., d] the part of h_hat that does not depend on the codes: b_dec through the
    decoder's row affine (A_bias is its attribution)."""
    mult, shift = decoder_rows(sae, codes)
    lead = shape[:-1]
    b_dec = sae.b_dec.detach().float()
    if isinstance(mult, torch.Tensor):
        return b_dec * mult.reshape(*lead, 1) + torch.as_tensor(shift).reshape(*lead, 1)
    return (b_dec * mult).expand(*lead, -1)


@contextlib.contextmanager
def _no_weight_grads(module: torch.nn.Module) -> Iterator[None]:
    """The tower's weights are constants here: no graph is built for the blocks before
    the hook point, only from the patched activations on."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def attribute_images(images: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                     tower: Tower, hook: HookPoint, *, gradient: str = "frozen") -> Attributions:
    """Attributions at any hook point of any tower for one batch of preprocessed images.

    One forward pass and one batched backward pass (all classes at once). For spatial
    tokens the attribution of a component is summed over tokens. At the pooled hook
    point this is ``attribute_cls`` on the captured pooled vectors.
    """
    check_gradient(gradient)
    layer = tower.resolve(hook)
    if layer is None:
        with torch.no_grad():
            pooled = tower.capture(images, hook).acts
        return attribute_cls(pooled, ids, sae, head, tower, gradient=gradient)
    state: dict[str, torch.Tensor] = {}

    def patch(resid: torch.Tensor) -> torch.Tensor:
        resid = resid.detach()
        h = tower.select(resid, hook.token).float()
        d = h.shape[-1]
        codes = sae.encode(h.reshape(-1, d))
        idx = codes.indices.reshape(*h.shape[:-1], -1)
        z = codes.values.float().reshape(idx.shape).detach().requires_grad_(True)
        h_hat = decode_codes(sae, idx, z, codes)
        state.update(idx=idx, z=z, eps=(h - h_hat).detach(),
                     constant=_decoder_constant(sae, codes, h.shape))
        state["h_patched"] = h_hat + state["eps"]
        return tower.replace(resid, hook.token, state["h_patched"].to(resid.dtype))

    frozen = frozen_norms(tower.module) if gradient == "frozen" else contextlib.nullcontext()
    with torch.enable_grad(), _no_weight_grads(tower.module), frozen:
        e = tower.forward_edited(images, layer, patch)
        scores, head_bias = _scores(e, head, gradient)
    idx, z, eps = state["idx"], state["z"], state["eps"]
    grad_z, grad_h = _all_class_grads(scores, (z, state["h_patched"]))  # [C, *z], [C, *h]
    values = (z.detach()[None] * grad_z).movedim(0, -1)  # [..., k, C]
    error = torch.einsum("...d,c...d->c...", eps, grad_h)
    bias = torch.einsum("...d,c...d->c...", state["constant"], grad_h)
    if hook.token == "spatial":  # sum token-level terms per instance
        error, bias = error.sum(-1), bias.sum(-1)
        return spatial_part(ids, idx, z.detach(), values, error.T, bias.T, scores.detach(),
                             head, sae.n_latents, head_bias)
    part = sparse_part(ids, idx, z.detach(), values.detach(), error.T.detach(), bias.T.detach(),
                        scores.detach())
    return assemble([part], head, sae.n_latents, head_bias)


def _all_class_grads(scores: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d scores[:, c] / d inputs for every class c, in one batched backward pass."""
    n_classes = scores.shape[1]
    eye = torch.eye(n_classes, dtype=scores.dtype)[:, None, :].expand(n_classes, *scores.shape)
    try:
        return list(torch.autograd.grad(scores, inputs, grad_outputs=eye, is_grads_batched=True))
    except RuntimeError:  # an op without a batching rule: fall back to one pass per class
        per_class = [torch.autograd.grad(scores[:, c].sum(), inputs, retain_graph=True)
                     for c in range(n_classes)]
        return [torch.stack(g) for g in zip(*per_class)]


# ------------------------------------------------------------------ per-class relevance


@dataclass(frozen=True)
class Relevance:
    """R[j, c] = mean over class c's instances of A[n, j, c]; share = R / sum_j |R|."""

    mean: torch.Tensor
    """[n_latents, C] R."""
    share: torch.Tensor
    """[n_latents, C] rho."""
    n_instances: torch.Tensor
    """[C] instances per class."""
    error_mean: torch.Tensor
    """[C] mean A_err."""
    bias_mean: torch.Tensor
    """[C] mean A_bias."""
    by: str
    """``label`` or ``prediction``: how instances were assigned to classes."""

    @property
    def unexplained_share(self) -> torch.Tensor:
        """[C] |mean A_err| / (sum_j |R_j| + |mean A_err| + |mean A_bias|)."""
        total = self.mean.abs().sum(0) + self.error_mean.abs() + self.bias_mean.abs()
        return self.error_mean.abs() / total.clamp_min(1e-12)


def class_relevance(attr: Attributions, labels: Sequence[str | None] | None = None) -> Relevance:
    """Per-class relevance over instances by label (by prediction where labels are missing).

    An instance labelled with something that is not one of the head's classes (an image
    of another category) belongs to no class and is left out; map data labels to class
    names first (``clipaudit.heads.labels``).
    """
    n_classes = len(attr.class_names)
    assignment = attr.predictions.clone()
    by = "prediction"
    if labels is not None and any(lab is not None for lab in labels):
        lookup = {name: i for i, name in enumerate(attr.class_names)}
        for pos, lab in enumerate(labels):
            if lab is not None:
                assignment[pos] = lookup.get(lab, -1)
        by = "label"
    kept = assignment >= 0
    counts = torch.bincount(assignment[kept], minlength=n_classes).float()
    inst_class = assignment[attr.rows]  # class of each sparse entry's instance
    entry = torch.nonzero(inst_class >= 0).flatten()
    own = attr.values[entry, inst_class[entry]]
    total = torch.zeros(attr.n_latents * n_classes).index_add_(
        0, attr.components[entry] * n_classes + inst_class[entry], own)
    mean = total.reshape(attr.n_latents, n_classes) / counts.clamp_min(1)
    share = mean / mean.abs().sum(0, keepdim=True).clamp_min(1e-12)
    pick, cls = torch.nonzero(kept).flatten(), assignment[kept]
    err = torch.zeros(n_classes).index_add_(0, cls, attr.error[pick, cls])
    bias = torch.zeros(n_classes).index_add_(0, cls, attr.bias[pick, cls])
    return Relevance(mean, share, counts.long(), err / counts.clamp_min(1),
                     bias / counts.clamp_min(1), by)
