"""Attribution patching towards zero: A[n, j, c] = z[n, j] * dy_c/dz[n, j].

Conventions (the contract is shared/DESIGN.md section 2):

- The SAE error eps = h - h_hat is computed on the clean pass and held fixed, so
  the patched model reproduces the original scores exactly.
- Gradients are taken with every LayerNorm scale downstream of the hook point
  and the head's per-instance normalisation (|e| for cosine / L2 heads) held
  fixed: the common "frozen LayerNorm" linearisation. At the default hook point
  (last block, CLS) the rest of the tower is then affine in h, and attributions
  are complete: for every instance and class
      y_c - b_c = sum_j A[n, j, c] + A_err[n, c] + A_bias[n, c],
  where A_err = eps . dy_c/dh and A_bias = b_dec . dy_c/dh plus the constant
  that the downstream biases (ln_post's beta, the head's offset) contribute.
  (With exact LayerNorm gradients h . dy/dh is zero, since LayerNorm is scale
  invariant, and no such decomposition exists.) At earlier blocks the tower is
  not affine, and A_bias is the b_dec term alone.
- All classes come from one forward pass per batch: analytically at the default
  hook point (the gradient is a fixed direction per class divided by a
  per-instance scale), by one batched backward pass elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipaudit.extraction.hooks import HookPoint, VisionTower, replace_tokens, select_tokens
from clipaudit.heads import Head
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attributions:
    """Per-instance attributions for every class, stored sparsely (active components only).

    Row ``r`` of the sparse part is instance ``rows[r]`` (a position in ``ids``),
    component ``components[r]`` with activation ``activations[r]`` (summed over
    tokens for spatial hook points) and attributions ``values[r, c]``.
    """

    ids: torch.Tensor
    """[n] instance ids."""
    class_names: list[str]
    n_latents: int
    rows: torch.Tensor
    """[nnz] position of each entry's instance in ``ids``."""
    components: torch.Tensor
    """[nnz] SAE component index."""
    activations: torch.Tensor
    """[nnz] z[n, j]."""
    values: torch.Tensor
    """[nnz, C] A[n, j, c]."""
    error: torch.Tensor
    """[n, C] A_err: the evidence the SAE does not reconstruct."""
    bias: torch.Tensor
    """[n, C] A_bias: b_dec and downstream constant terms."""
    scores: torch.Tensor
    """[n, C] y_c, exact."""
    head_bias: torch.Tensor
    """[C] b_c."""

    @property
    def predictions(self) -> torch.Tensor:
        return self.scores.argmax(dim=1)

    def dense(self) -> torch.Tensor:
        """A as a dense [n, n_latents, C] tensor (small data only)."""
        out = torch.zeros(len(self.ids), self.n_latents, len(self.class_names))
        out.index_put_((self.rows, self.components), self.values, accumulate=True)
        return out

    def to_parquet(self, fpath: Path | str, provenance: dict[str, Any] | None = None) -> Path:
        """Long table: one row per (instance, active component, class)."""
        import pyarrow as pa

        from clipaudit.artifacts import write_parquet

        n_classes = len(self.class_names)
        nnz = len(self.rows)
        table = pa.table({
            "instance_id": np.repeat(self.ids[self.rows].numpy(), n_classes),
            "component": np.repeat(self.components.numpy().astype(np.int32), n_classes),
            "activation": np.repeat(self.activations.numpy(), n_classes),
            "class": pa.DictionaryArray.from_arrays(
                np.tile(np.arange(n_classes, dtype=np.int32), nnz), self.class_names),
            "attribution": self.values.reshape(-1).numpy(),
        })
        return write_parquet(fpath, "attributions", table,
                             meta={"class_names": self.class_names, "n_latents": self.n_latents},
                             provenance=provenance)

    def instance_table(self) -> Any:
        """pandas DataFrame: instance_id, class, score, error, bias, head_bias."""
        import pandas as pd

        n, c = self.scores.shape
        return pd.DataFrame({
            "instance_id": np.repeat(self.ids.numpy(), c),
            "class": np.tile(np.asarray(self.class_names, dtype=object), n),
            "score": self.scores.reshape(-1).numpy(),
            "error": self.error.reshape(-1).numpy(),
            "bias": self.bias.reshape(-1).numpy(),
        })


# ------------------------------------------------------------------ default hook point


@dataclass(frozen=True)
class _ClsReadout:
    """The affine structure of ln_post -> proj -> head for one head (default hook point)."""

    directions: torch.Tensor
    """[C, d] centred g * (proj @ W_eff_c): dy_c/dh = directions[c] / (sigma_n * s_n)."""
    latent_dirs: torch.Tensor
    """[C, n_latents] directions @ W_dec / scale."""
    b_dec_term: torch.Tensor
    """[C] directions @ b_dec / scale."""


def _ln_params(ln: torch.nn.Module, d: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    if not isinstance(ln, torch.nn.LayerNorm):
        raise TypeError(f"ln_post is {type(ln).__name__}, not a LayerNorm")
    weight = ln.weight if ln.weight is not None else torch.ones(d)
    bias = ln.bias if ln.bias is not None else torch.zeros(d)
    return weight.detach().float(), bias.detach().float(), float(ln.eps)


def _proj(tower: VisionTower) -> torch.Tensor:
    proj = tower.visual.proj
    return proj.detach().float() if proj is not None else torch.eye(tower.width)


@torch.no_grad()
def attribute_cls(acts_nd: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                  tower: VisionTower, *, batch_size: int = 4096,
                  reporter: Reporter = NULL_REPORTER) -> Attributions:
    """Attributions at the default hook point (last block, CLS) from cached activations."""
    batches = (
        (acts_nd[s:s + batch_size], ids[s:s + batch_size]) for s in range(0, len(ids), batch_size)
    )
    return attribute_cls_batches(batches, sae, head, tower, n_total=len(ids), reporter=reporter)


@torch.no_grad()
def attribute_cls_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], sae: SAE,
                          head: Head, tower: VisionTower, *, n_total: int | None = None,
                          reporter: Reporter = NULL_REPORTER) -> Attributions:
    """Streaming version of ``attribute_cls`` over (acts [b, d], ids [b]) batches."""
    if not tower.cls_readout_ok:
        raise ValueError("the default-hook attribution needs a tower that reads out the CLS token")
    g, beta, ln_eps = _ln_params(tower.visual.ln_post, tower.width)
    proj = _proj(tower)
    w_dec = sae.W_dec.detach().float()
    scale = float(sae.scale)
    readout: _ClsReadout | None = None
    parts: list[dict[str, torch.Tensor]] = []
    with reporter.task("attributing", total=n_total) as task:
        for h, ids in batches:
            h = h.float()
            codes = sae.encode(h)
            idx, z = codes.indices, codes.values.float()
            h_hat = sae.decode(codes).float()
            eps = h - h_hat
            mu = h.mean(-1, keepdim=True)
            sigma = ((h - mu).pow(2).mean(-1) + ln_eps).sqrt()  # [b]
            e = tower.readout_cls(h)
            form = head.linear_form(e)
            if readout is None:
                u = form.weight @ proj.T  # [C, d]
                dg = g * u
                dirs = dg - dg.mean(-1, keepdim=True)
                readout = _ClsReadout(dirs, dirs @ w_dec / scale, dirs @ sae.b_dec.detach().float() / scale)
            inv = 1.0 / (sigma * form.scale)  # [b]
            values = z[..., None] * readout.latent_dirs.T[idx] * inv[:, None, None]  # [b, k, C]
            error = (eps @ readout.directions.T) * inv[:, None]
            const = ((beta @ proj - form.offset) @ form.weight.T) / form.scale[:, None]
            bias = readout.b_dec_term * inv[:, None] + const
            scores = form.scores(e)
            parts.append(_sparse_part(ids, idx, z, values, error, bias, scores))
            task.advance(len(ids))
    return _assemble(parts, head, sae.n_latents, form.bias if parts else torch.zeros(len(head.class_names)))


def _sparse_part(ids, idx, z, values, error, bias, scores) -> dict[str, torch.Tensor]:
    b, k = idx.shape
    keep = (z != 0).reshape(-1)
    rows = torch.arange(b).repeat_interleave(k)[keep]
    return {"ids": ids.long(), "rows": rows, "components": idx.reshape(-1)[keep],
            "activations": z.reshape(-1)[keep], "values": values.reshape(b * k, -1)[keep],
            "error": error, "bias": bias, "scores": scores}


def _assemble(parts: list[dict[str, torch.Tensor]], head: Head, n_latents: int,
              head_bias: torch.Tensor) -> Attributions:
    n_classes = len(head.class_names)
    if not parts:
        empty = torch.zeros(0, n_classes)
        return Attributions(torch.zeros(0, dtype=torch.long), list(head.class_names), n_latents,
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0), empty, empty, empty, empty, head_bias.detach().cpu())
    offsets = np.cumsum([0] + [len(p["ids"]) for p in parts[:-1]])
    cat = {key: torch.cat([p[key].detach().cpu() for p in parts]) for key in parts[0] if key != "rows"}
    rows = torch.cat([p["rows"] + int(off) for p, off in zip(parts, offsets)])
    return Attributions(cat["ids"], list(head.class_names), n_latents, rows, cat["components"],
                        cat["activations"].float(), cat["values"].float(), cat["error"].float(),
                        cat["bias"].float(), cat["scores"].float(), head_bias.detach().cpu().float())


# ------------------------------------------------------------------ any hook point (autograd)


def _frozen_ln_forward(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    mu = x32.mean(-1, keepdim=True)
    sigma = ((x32 - mu).pow(2).mean(-1, keepdim=True) + self.eps).sqrt().detach()
    out = (x32 - mu) / sigma
    if self.weight is not None:
        out = out * self.weight.float()
    if self.bias is not None:
        out = out + self.bias.float()
    return out.to(x.dtype)


@contextlib.contextmanager
def frozen_layernorms(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every LayerNorm in ``module`` treats its scale as a constant
    in backward passes (values are unchanged)."""
    patched = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    for m in patched:
        m.forward = types.MethodType(_frozen_ln_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def decode_codes(sae: SAE, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """h_hat in raw space, differentiable in ``values`` ([..., k] -> [..., d])."""
    atoms = sae.W_dec.T[indices]  # [..., k, d]
    return (torch.einsum("...k,...kd->...d", values, atoms) + sae.b_dec) / sae.scale


def attribute_images(images: torch.Tensor, ids: torch.Tensor, sae: SAE, head: Head,
                     tower: VisionTower, hook: HookPoint) -> Attributions:
    """Attributions at any hook point for one batch of preprocessed images.

    One forward pass and one batched backward pass (all classes at once). For
    spatial tokens the attribution of a component is summed over tokens.
    """
    layer = hook.resolve(tower.n_blocks)
    with torch.no_grad():
        resid = tower.run_blocks(tower.embed(images), 0, layer + 1)
    h = select_tokens(resid, hook.token).float()
    d = h.shape[-1]
    codes = sae.encode(h.reshape(-1, d))
    idx = codes.indices.reshape(*h.shape[:-1], -1)
    z = codes.values.float().reshape(idx.shape).detach().requires_grad_(True)
    h_hat = decode_codes(sae, idx, z)
    eps = (h - h_hat).detach()
    h_patched = h_hat + eps
    with frozen_layernorms(tower.visual):
        e = tower.rest(replace_tokens(resid, hook.token, h_patched.to(resid.dtype)), layer)
    form = head.linear_form(e)
    scores = form.scores(e)
    grad_z, grad_h = _all_class_grads(scores, (z, h_patched))  # [C, *z.shape], [C, *h.shape]
    values = (z.detach()[None] * grad_z).movedim(0, -1)  # [..., k, C]
    error = torch.einsum("...d,c...d->c...", eps, grad_h)
    bias = torch.einsum("d,c...d->c...", sae.b_dec.detach().float() / float(sae.scale), grad_h)
    if hook.token == "spatial":  # sum token-level terms per instance
        error, bias = error.sum(-1), bias.sum(-1)
        return _spatial_part(ids, idx, z.detach(), values, error.T, bias.T, scores.detach(),
                             head, sae.n_latents, form.bias)
    part = _sparse_part(ids, idx, z.detach(), values, error.T, bias.T, scores.detach())
    return _assemble([part], head, sae.n_latents, form.bias)


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


def _spatial_part(ids, idx, z, values, error, bias, scores, head, n_latents, head_bias) -> Attributions:
    """Sum token-level (instance, component) entries into one entry per instance and component."""
    b, t, k = idx.shape
    n_classes = values.shape[-1]
    flat = idx.reshape(b, t * k)
    key = torch.arange(b)[:, None] * n_latents + flat
    keep = (z.reshape(b, t * k) != 0).reshape(-1)
    uniq, inverse = torch.unique(key.reshape(-1)[keep], return_inverse=True)
    acts = torch.zeros(len(uniq)).index_add_(0, inverse, z.reshape(-1)[keep])
    vals = torch.zeros(len(uniq), n_classes).index_add_(
        0, inverse, values.detach().reshape(-1, n_classes)[keep])
    return Attributions(ids.long(), list(head.class_names), n_latents, uniq // n_latents,
                        uniq % n_latents, acts, vals, error.detach(), bias.detach(),
                        scores, head_bias.detach().cpu())


def concat_attributions(parts: Sequence[Attributions]) -> Attributions:
    """Join per-batch attributions (same head and SAE) into one."""
    first = parts[0]
    offsets = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    return Attributions(
        torch.cat([p.ids for p in parts]), first.class_names, first.n_latents,
        torch.cat([p.rows + int(o) for p, o in zip(parts, offsets)]),
        torch.cat([p.components for p in parts]), torch.cat([p.activations for p in parts]),
        torch.cat([p.values for p in parts]), torch.cat([p.error for p in parts]),
        torch.cat([p.bias for p in parts]), torch.cat([p.scores for p in parts]), first.head_bias)


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
