"""The TopK sparse autoencoder (DESIGN.md section 2).

    x     = h * scale                                   (input normalisation)
    z     = TopK_k(W_enc (x - b_dec) + b_enc), then ReLU (``relu=True``)
    x_hat = W_dec z + b_dec,  decoder columns of unit norm
    h_hat = x_hat / scale

Everything the outside sees is in the raw space of ``h``; ``scale`` stays inside.
Converted checkpoints may set ``relu=False`` (top-k on raw pre-activations) and may
carry decoder columns that are not of unit norm (see ``clipaudit.sae.formats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparseCodes:
    """The k active components of each row: ``indices`` long [n, k], ``values`` [n, k].

    Rows are ordered by value (largest first), ties by latent index (smallest first).
    With ``relu=True`` a selected value may be 0 (fewer than k positive pre-activations).
    """

    indices: torch.Tensor
    values: torch.Tensor

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """The codes as a dense [n, n_latents] matrix."""
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter(1, self.indices, self.values)


@runtime_checkable
class SAE(Protocol):
    """What the attribution, ablation and description code needs of an SAE.

    ``TopKSAE`` is one; so is any object with these attributes (a test's reference
    implementation, a converted checkpoint). Codes are sparse: ``encode`` returns the k
    active components of each row, ``decode`` maps them back to raw activations.
    """

    d: int
    n_latents: int
    k: int
    meta: dict[str, Any]

    # Read-only in the protocol, so a module's Parameter (a Tensor subclass) satisfies it.
    @property
    def W_dec(self) -> torch.Tensor:
        """[d, n_latents] decoder, in the normalised input space."""

    @property
    def b_dec(self) -> torch.Tensor:
        """[d] decoder bias, in the normalised input space."""

    @property
    def scale(self) -> torch.Tensor:
        """Input normalisation: the SAE sees h * scale."""

    def encode(self, h: torch.Tensor) -> SparseCodes: ...

    def decode(self, codes: SparseCodes) -> torch.Tensor: ...


class TopKSAE(torch.nn.Module):
    """TopK SAE with parameters ``W_enc`` [m, d], ``b_enc`` [m], ``W_dec`` [d, m], ``b_dec`` [d]
    and the buffer ``scale`` (0-d)."""

    scale: torch.Tensor  # a registered buffer (for the type checker: not a Module)

    def __init__(self, d: int, n_latents: int, k: int, *, relu: bool = True,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents ({n_latents}), got {k}")
        self.d, self.n_latents, self.k, self.relu = int(d), int(n_latents), int(k), bool(relu)
        # A usable random SAE until trained or loaded (like torch.nn.Linear, from the
        # global RNG): random unit decoder columns, encoder = decoder transpose.
        directions_md = torch.randn(n_latents, d)
        directions_md /= directions_md.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc = torch.nn.Parameter(directions_md.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents))
        # W_dec is [d, m] but stored column-major: the training step gathers whole
        # decoder columns (rows of W_dec.T), which is only fast when they are contiguous.
        self.W_dec = torch.nn.Parameter(directions_md.T)
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.register_buffer("scale", torch.tensor(1.0))
        self.meta: dict[str, Any] = dict(meta or {})

    def extra_repr(self) -> str:
        return f"d={self.d}, n_latents={self.n_latents}, k={self.k}, relu={self.relu}"

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ------------------------------------------------------------- encode

    def _normalised(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.d:
            raise ValueError(f"expected activations of width {self.d}, got shape {tuple(h.shape)}")
        return h.reshape(-1, self.d).to(self.W_enc.dtype) * self.scale

    def pre_acts(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [n, m] of raw activations h [..., d] (rows flattened)."""
        x = self._normalised(h)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)

    def encode(self, h: torch.Tensor) -> SparseCodes:
        """The k active components of each row of h [..., d] (leading dims flattened)."""
        values, indices = canonical_topk(self.pre_acts(h), self.k)
        if self.relu:
            values = F.relu(values)
        return SparseCodes(indices=indices, values=values)

    def encode_dense(self, h: torch.Tensor) -> torch.Tensor:
        """Codes as a dense matrix: h [..., d] -> z [..., m]."""
        z = self.encode(h).to_dense(self.n_latents)
        return z.reshape(*h.shape[:-1], self.n_latents)

    # ------------------------------------------------------------- decode

    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """Raw-space reconstruction [n, d]; touches only the k active decoder columns."""
        x_hat = F.embedding_bag(codes.indices, self.W_dec.T, mode="sum",
                                per_sample_weights=codes.values.to(self.W_dec.dtype))
        return (x_hat + self.b_dec) / self.scale

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes: z [..., m] -> h_hat [..., d]."""
        return (z.to(self.W_dec.dtype) @ self.W_dec.T + self.b_dec) / self.scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Reconstruction of h [..., d] (same shape)."""
        return self.decode(self.encode(h)).reshape(h.shape)

    # ------------------------------------------------------------- weights

    @torch.no_grad()
    def set_weights(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, scale: float | torch.Tensor = 1.0) -> TopKSAE:
        """Copy weights in (shapes as the attributes), keeping the decoder's layout."""
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(b_dec)
        self.scale.fill_(float(scale))
        return self

    @torch.no_grad()
    def decoder_norms(self) -> torch.Tensor:
        """Norm of each decoder column, [m]."""
        return self.W_dec.T.norm(dim=1)

    def _apply(self, fn: Any, recurse: bool = True) -> TopKSAE:
        # .to()/.cuda() may hand back a row-major copy of W_dec; restore the layout.
        super()._apply(fn, recurse)
        if not self.W_dec.T.is_contiguous():
            self.W_dec.data = self.W_dec.data.T.contiguous().T
        return self


def canonical_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``pre`` [n, m] with a canonical answer: ties at the k-th value
    go to the smallest latent index, and the result is ordered by value (descending),
    then index. ``torch.topk`` leaves both unspecified (and devices differ)."""
    values, indices = pre.topk(k, dim=1, sorted=True)
    kth = values[:, -1:]
    ambiguous = (pre == kth).sum(1) > (values == kth).sum(1)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        # a stable descending sort keeps equal values in index order
        sorted_vals, sorted_idx = torch.sort(pre[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = sorted_vals[:, :k], sorted_idx[:, :k]
    # order inside the selection: by index, then (stably) by value
    by_index = indices.argsort(dim=1)
    indices, values = indices.gather(1, by_index), values.gather(1, by_index)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), indices.gather(1, by_value)
