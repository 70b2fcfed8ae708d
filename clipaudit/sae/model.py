"""The sparse autoencoder (DESIGN.md section 2): TopK, and the encodings that
published SAEs use at inference.

    x     = h * scale                                   (input normalisation)
    pre   = W_enc (x - b_dec) + b_enc
    z     = TopK_k(pre), then ReLU (``relu=True``)      activation "topk"
          | ReLU(pre) * (ReLU(pre) > threshold)          activation "threshold"
    x_hat = W_dec z + b_dec,  decoder columns of unit norm
    h_hat = x_hat / scale

The ``threshold`` activation is plain ReLU (threshold 0), JumpReLU (a threshold per
latent) and the inference rule of BatchTopK and Matryoshka BatchTopK SAEs (one
learnt threshold): the number of active latents then varies from row to row, and
codes are padded with zeros to the widest row of a batch.

``input_norm`` is a per-row input normalisation that is undone after decoding
(ViT-Prisma's ``normalize_activations``): ``constant_norm_rescale`` scales each row
to norm sqrt(d) and back; ``layer_norm`` centres and divides by the (unbiased)
standard deviation + eps, and decodes as x_hat * std + mean. The decoder is then an
affine map per row, h_hat = x_hat * out_scale_n + out_shift_n, which the codes carry
(``SparseCodes.out_scale``/``out_shift``) and ``decoder_rows`` reports.

Everything the outside sees is in the raw space of ``h``; ``scale`` stays inside.
Converted checkpoints may set ``relu=False`` (top-k on raw pre-activations) and may
carry decoder columns that are not of unit norm (see ``clipaudit.sae.formats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

ACTIVATIONS: tuple[str, ...] = ("topk", "threshold")
INPUT_NORMS: tuple[str, ...] = ("none", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class SparseCodes:
    """The active components of each row: ``indices`` long [n, k], ``values`` [n, k].

    Rows are ordered by value (largest first), ties by latent index (smallest first).
    A value may be 0 (fewer active latents than the width: padding).
    ``out_scale``/``out_shift`` [n]: the per-row decoder affine of SAEs that normalise
    each input row (None: h_hat = x_hat / scale).
    """

    indices: torch.Tensor
    values: torch.Tensor
    out_scale: torch.Tensor | None = None
    out_shift: torch.Tensor | None = None

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
    """Sparse autoencoder with parameters ``W_enc`` [m, d], ``b_enc`` [m], ``W_dec`` [d, m],
    ``b_dec`` [d] and the buffers ``scale`` (0-d) and ``threshold`` (0-d or [m]).

    ``activation``: ``topk`` (TopK, the default and what clipaudit trains) or
    ``threshold`` (ReLU, JumpReLU, BatchTopK inference; ``k`` is then the nominal
    number of active latents the file states). ``input_norm``: see the module doc."""

    scale: torch.Tensor  # a registered buffer (for the type checker: not a Module)

    def __init__(self, d: int, n_latents: int, k: int, *, relu: bool = True,
                 activation: str = "topk", input_norm: str = "none", input_norm_eps: float = 1e-5,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents ({n_latents}), got {k}")
        if activation not in ACTIVATIONS or input_norm not in INPUT_NORMS:
            raise ValueError(f"activation {activation!r} / input_norm {input_norm!r} unknown "
                             f"({', '.join(ACTIVATIONS)} / {', '.join(INPUT_NORMS)})")
        self.d, self.n_latents, self.k, self.relu = int(d), int(n_latents), int(k), bool(relu)
        self.activation, self.input_norm = activation, input_norm
        self.input_norm_eps = float(input_norm_eps)
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
        self.register_buffer("threshold", torch.tensor(0.0))
        self.meta: dict[str, Any] = dict(meta or {})

    def extra_repr(self) -> str:
        return (f"d={self.d}, n_latents={self.n_latents}, k={self.k}, relu={self.relu}, "
                f"activation={self.activation}, input_norm={self.input_norm}")

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ------------------------------------------------------------- encode

    def row_affine(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(out_scale [n], out_shift [n]) of the per-row input normalisation of h [..., d]
        (rows flattened): the decoder maps x_hat to h_hat = x_hat / scale * out_scale +
        out_shift. (None, None) for SAEs without one."""
        if self.input_norm == "none":
            return None, None
        h = h.reshape(-1, self.d).float()
        if self.input_norm == "constant_norm_rescale":
            norm = h.norm(dim=-1)
            return norm / self.d ** 0.5, torch.zeros_like(norm)
        return h.std(dim=-1), h.mean(dim=-1)

    def _normalised(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                    torch.Tensor | None]:
        if h.shape[-1] != self.d:
            raise ValueError(f"expected activations of width {self.d}, got shape {tuple(h.shape)}")
        x = h.reshape(-1, self.d).to(self.W_enc.dtype)
        out_scale, out_shift = self.row_affine(x)
        if out_scale is not None and out_shift is not None:
            if self.input_norm == "constant_norm_rescale":
                x = x * (self.d ** 0.5 / x.norm(dim=-1, keepdim=True))
            else:
                x = (x - out_shift[:, None]) / (out_scale[:, None] + self.input_norm_eps)
        return x * self.scale, out_scale, out_shift

    def pre_acts(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [n, m] of raw activations h [..., d] (rows flattened)."""
        x, _, _ = self._normalised(h)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)

    def encode(self, h: torch.Tensor) -> SparseCodes:
        """The active components of each row of h [..., d] (leading dims flattened)."""
        x, out_scale, out_shift = self._normalised(h)
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)
        if self.activation == "topk":
            values, indices = canonical_topk(pre, self.k)
            if self.relu:
                values = F.relu(values)
        else:
            post = F.relu(pre)
            dense = post * (post > self.threshold)
            width = max(int((dense != 0).sum(1).max()) if len(dense) else 1, 1)
            values, indices = canonical_topk(dense, width)
        return SparseCodes(indices=indices, values=values, out_scale=out_scale, out_shift=out_shift)

    def encode_dense(self, h: torch.Tensor) -> torch.Tensor:
        """Codes as a dense matrix: h [..., d] -> z [..., m]."""
        z = self.encode(h).to_dense(self.n_latents)
        return z.reshape(*h.shape[:-1], self.n_latents)

    # ------------------------------------------------------------- decode

    def decode(self, codes: SparseCodes) -> torch.Tensor:
        """Raw-space reconstruction [n, d]; touches only the active decoder columns."""
        x_hat = F.embedding_bag(codes.indices, self.W_dec.T, mode="sum",
                                per_sample_weights=codes.values.to(self.W_dec.dtype))
        return _to_raw(x_hat + self.b_dec, self.scale, codes)

    def decode_dense(self, z: torch.Tensor, codes: SparseCodes | None = None) -> torch.Tensor:
        """Raw-space reconstruction of dense codes: z [n, m] -> h_hat [n, d] (``codes``: the
        rows' encoding, for SAEs that normalise each row)."""
        return _to_raw(z.to(self.W_dec.dtype) @ self.W_dec.T + self.b_dec, self.scale, codes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Reconstruction of h [..., d] (same shape)."""
        return self.decode(self.encode(h)).reshape(h.shape)

    # ------------------------------------------------------------- weights

    @torch.no_grad()
    def set_weights(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                    b_dec: torch.Tensor, scale: float | torch.Tensor = 1.0,
                    threshold: float | torch.Tensor = 0.0) -> TopKSAE:
        """Copy weights in (shapes as the attributes), keeping the decoder's layout."""
        self.W_enc.copy_(W_enc)
        self.b_enc.copy_(b_enc)
        self.W_dec.copy_(W_dec)
        self.b_dec.copy_(b_dec)
        self.scale.fill_(float(scale))
        threshold = torch.as_tensor(threshold, dtype=torch.float32)
        if threshold.numel() not in (1, self.n_latents):
            raise ValueError(f"threshold has {threshold.numel()} values; expected 1 or {self.n_latents}")
        # a copy: a view would keep the storage it came from alive (a whole memory-mapped
        # weights file, for a threshold read from one)
        self.threshold = (threshold.reshape(()) if threshold.numel() == 1 else threshold.reshape(-1)
                          ).to(self.scale.device, copy=True)
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


def _to_raw(x_hat: torch.Tensor, scale: torch.Tensor, codes: Any) -> torch.Tensor:
    out_scale = getattr(codes, "out_scale", None)
    if out_scale is None:
        return x_hat / scale
    shift = getattr(codes, "out_shift", None)
    h_hat = x_hat / scale * out_scale[:, None]
    return h_hat + shift[:, None] if shift is not None else h_hat


def decoder_rows(sae: Any, codes: Any) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(multiplier, offset) that map each row's normalised reconstruction to raw space:
    h_hat = (W_dec z + b_dec) * multiplier + offset, multiplier [n] or a number, offset
    [n] (added to every coordinate) or 0. For any SAE object: one without per-row
    normalisation gives (1 / scale, 0)."""
    out_scale = getattr(codes, "out_scale", None)
    if out_scale is None:
        return 1.0 / float(sae.scale), 0.0
    shift = getattr(codes, "out_shift", None)
    return out_scale / float(sae.scale), shift if shift is not None else 0.0


def decoder_rows_for(sae: Any, h: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``decoder_rows`` from the raw activations h [n, d] (without encoding them)."""
    row_affine = getattr(sae, "row_affine", None)
    out_scale, out_shift = row_affine(h) if row_affine is not None else (None, None)
    if out_scale is None:
        return 1.0 / float(sae.scale), 0.0
    return out_scale / float(sae.scale), out_shift if out_shift is not None else 0.0


def cat_codes(parts: list[SparseCodes]) -> SparseCodes:
    """Codes of several batches as one, padded with zeros to the widest batch."""
    width = max((p.indices.shape[1] for p in parts), default=1)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t

    rows = [p.out_scale for p in parts]
    shifts = [p.out_shift for p in parts]
    return SparseCodes(
        indices=torch.cat([pad(p.indices) for p in parts]),
        values=torch.cat([pad(p.values) for p in parts]),
        out_scale=torch.cat(rows) if rows and all(r is not None for r in rows) else None,  # type: ignore[arg-type]
        out_shift=torch.cat(shifts) if shifts and all(r is not None for r in shifts) else None,  # type: ignore[arg-type]
    )
