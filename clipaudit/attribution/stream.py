"""Streaming attribution at the pooled hook point: any class's attribution on demand,
and per-class relevance accumulated batch by batch.

From the pooled vector h the image embedding is e = post(norm(h)) with ``post`` affine
(``clipaudit.extraction.readout.PooledReadout``; every open_clip tower but the MLP
projection of ``convnext_large_d``). With the norm's scale and the head's
normalisation frozen (the ``frozen`` gradient, ``clipaudit.attribution.patching``),
the gradient of class c's score is a fixed direction divided by a per-instance scale:

    dy_c/dh = directions[c] * inv[n],   inv[n] = 1 / (sigma_n * s_n)
    A[n, j, c] = z[n, j] * latent_dirs[c, j] * dec[n],   latent_dirs = directions @ W_dec

with dec[n] = inv[n] * m[n], m[n] the SAE decoder's row multiplier (1 / scale, times
the row's norm for SAEs that normalise each input), so an instance's attribution to
any class is one gather of its active components. ``BatchAttribution`` keeps what that
gather needs (codes, ``dec``, the SAE error) and computes attributions for the classes
asked for only; ``RelevanceAccumulator`` sums each instance's attributions to its own
class. Neither holds anything of size instances x classes, so the audit's memory does
not grow with the data. (``patching.attribute_cls`` computes every class of every
instance, for small data, and the ``exact`` gradient.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipaudit.attribution.patching import Relevance, _closed_form, as_readout
from clipaudit.extraction.hooks import Tower
from clipaudit.extraction.readout import PooledReadout
from clipaudit.heads import Head
from clipaudit.sae.model import SAE, decoder_rows

_GATHER_CLASSES_MAX = 16
"""Up to this many classes per instance the SAE error's attribution is gathered per
class; beyond, one [b, d] x [d, C] product is cheaper."""


@dataclass(frozen=True)
class ClsReadout:
    """norm -> projection -> head as seen from h at the pooled hook point (one head)."""

    directions: torch.Tensor
    """[C, d]: dy_c/dh = directions[c] * inv[n]."""
    latent_dirs: torch.Tensor
    """[C, n_latents] directions @ W_dec: component j's attribution per unit z, times dec[n]."""
    b_dec_term: torch.Tensor
    """[C] directions @ b_dec (times dec[n])."""
    ones_term: torch.Tensor
    """[C] directions @ 1: what a per-row decoder offset contributes (times offset * inv)."""
    const_numer: torch.Tensor
    """[C] (offset of the readout - the head's offset) @ W_c: the downstream biases,
    before the head's scale."""
    head_bias: torch.Tensor
    """[C] b_c: y_c - b_c = sum_j A[n, j, c] + A_err + A_bias."""

    @staticmethod
    def build(head: Head, readout: PooledReadout, sae: SAE, e_sample: torch.Tensor) -> ClsReadout:
        """The readout of ``head``; ``e_sample`` [b, D] (any embeddings) fixes the head's
        class directions, which do not depend on the instance."""
        if not readout.is_affine:
            raise ValueError(f"streaming attribution needs an affine readout, not {readout.description}")
        form = head.linear_form(e_sample)
        cf = _closed_form(readout, form.weight.float(), sae)
        return ClsReadout(cf.directions, cf.latent_dirs, cf.b_dec_term, cf.ones_term,
                          (cf.offset - form.offset) @ form.weight.float().T,
                          form.bias.detach().float())


@dataclass(frozen=True)
class BatchAttribution:
    """One batch at the pooled hook point: exact scores, and what any class's
    attribution of any of its instances needs."""

    indices: torch.Tensor
    """long [b, k] active components."""
    values: torch.Tensor
    """float [b, k] z (0 where TopK picked a non-positive pre-activation, or padding)."""
    inv: torch.Tensor
    """[b] 1 / (sigma_n * s_n)."""
    dec: torch.Tensor
    """[b] inv times the decoder's row multiplier: A[n, j, c] = z * latent_dirs[c, j] * dec."""
    shift_inv: torch.Tensor
    """[b] the decoder's per-row offset times inv (0 for SAEs without one)."""
    form_scale: torch.Tensor
    """[b] the head's per-instance scale s_n."""
    eps: torch.Tensor
    """[b, d] SAE error h - h_hat (held fixed)."""
    scores: torch.Tensor
    """[b, C] exact class scores."""
    readout: ClsReadout

    @property
    def predictions(self) -> torch.Tensor:
        return self.scores.argmax(dim=1)

    def components(self, classes: torch.Tensor) -> torch.Tensor:
        """A[n, j, c] for the active j of each instance and ``classes`` [b, r] -> [b, k, r]."""
        dirs = self.readout.latent_dirs[classes[:, None, :], self.indices[:, :, None]]  # [b, k, r]
        return self.values[..., None] * dirs * self.dec[:, None, None]

    def error(self, classes: torch.Tensor) -> torch.Tensor:
        """A_err for ``classes`` [b, r] -> [b, r]."""
        if classes.shape[1] > _GATHER_CLASSES_MAX:
            full = self.eps @ self.readout.directions.T
            return full.gather(1, classes) * self.inv[:, None]
        dirs = self.readout.directions[classes]  # [b, r, d]
        return torch.einsum("bd,brd->br", self.eps, dirs) * self.inv[:, None]

    def bias(self, classes: torch.Tensor) -> torch.Tensor:
        """A_bias for ``classes`` [b, r] -> [b, r] (b_dec, a per-row decoder offset and the
        downstream constants)."""
        r = self.readout
        return (r.b_dec_term[classes] * self.dec[:, None] + r.ones_term[classes] * self.shift_inv[:, None]
                + r.const_numer[classes] / self.form_scale[:, None])


@torch.no_grad()
def attribute_batch(h: torch.Tensor, codes: object, sae: SAE, head: Head,
                    tower: Tower | PooledReadout,
                    cls_readout: ClsReadout | None = None) -> BatchAttribution:
    """``h`` [b, d] float32 activations and their SAE ``codes`` (``.indices``/``.values``
    [b, k]) -> a ``BatchAttribution``; ``tower``: the tower or its pooled readout. Pass the
    head's ``cls_readout`` to skip rebuilding it."""
    readout = as_readout(tower)
    idx, z = codes.indices, codes.values.detach().float()  # type: ignore[attr-defined]
    h = h.float()
    h_hat = sae.decode(codes).float()  # type: ignore[arg-type]
    sigma = readout.norm.sigma(h) if readout.norm is not None else torch.ones(len(h))
    e = readout(h)
    form = head.linear_form(e)
    cls_readout = cls_readout or ClsReadout.build(head, readout, sae, e)
    inv = 1.0 / (sigma * form.scale)
    mult, shift = decoder_rows(sae, codes)
    dec = inv * torch.as_tensor(mult, dtype=torch.float32)
    shift_inv = torch.as_tensor(shift, dtype=torch.float32) * inv
    return BatchAttribution(idx, z, inv, dec, shift_inv.expand_as(inv).contiguous(), form.scale,
                            h - h_hat, form.scores(e), cls_readout)


class RelevanceAccumulator:
    """Per-class relevance over a stream of batches: each instance adds its attribution
    to the class it is assigned to (its label, or its prediction), and its error and bias
    terms; memory n_latents x C, whatever the number of instances."""

    def __init__(self, n_latents: int, n_classes: int) -> None:
        self.n_latents, self.n_classes = n_latents, n_classes
        self.sums = torch.zeros(n_latents * n_classes, dtype=torch.float64)
        self.error = torch.zeros(n_classes, dtype=torch.float64)
        self.bias = torch.zeros(n_classes, dtype=torch.float64)
        self.counts = torch.zeros(n_classes, dtype=torch.long)

    def add(self, batch: BatchAttribution, assign: torch.Tensor) -> None:
        """Add a batch; ``assign`` long [b]: each instance's class (-1: left out)."""
        keep = assign >= 0
        if not bool(keep.any()):
            return
        cls = assign[keep]
        values = batch.values[keep]
        own = batch.components(cls[:, None])[..., 0]  # [b', k]
        key = batch.indices[keep] * self.n_classes + cls[:, None]
        fired = values != 0
        self.sums.index_add_(0, key[fired], own[fired].double())
        sub = _select(batch, keep)
        self.error.index_add_(0, cls, sub.error(cls[:, None])[:, 0].double())
        self.bias.index_add_(0, cls, sub.bias(cls[:, None])[:, 0].double())
        self.counts += torch.bincount(cls, minlength=self.n_classes)

    def result(self, by: str) -> Relevance:
        """R = sums / counts and the shares, as ``patching.class_relevance`` defines them."""
        counts = self.counts.clamp_min(1)
        mean = (self.sums.reshape(self.n_latents, self.n_classes) / counts).float()
        share = mean / mean.abs().sum(0, keepdim=True).clamp_min(1e-12)
        return Relevance(mean, share, self.counts.clone(), (self.error / counts).float(),
                         (self.bias / counts).float(), by)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sums, self.error, self.bias, self.counts))


def _select(batch: BatchAttribution, keep: torch.Tensor) -> BatchAttribution:
    return BatchAttribution(batch.indices[keep], batch.values[keep], batch.inv[keep],
                            batch.dec[keep], batch.shift_inv[keep], batch.form_scale[keep],
                            batch.eps[keep], batch.scores[keep], batch.readout)
