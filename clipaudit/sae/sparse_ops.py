"""The sparse half of a TopK SAE training step.

Only the encoder's forward matmul is dense ([n, d] x [d, m]). Everything after the
top-k selection touches the k active latents of each row and nothing else (for large
dictionaries; small ones, with m <= 128 k, use dense matmuls, which are faster there):

- decoder: ``embedding_bag`` over the rows of ``W_dec.T`` (forward and backward);
- encoder backward: ``SelectedPreacts`` hands gradients back only for the selected
  pre-activations: dW_enc[i] = sum over (row b, slot j) with idx[b, j] = i of g[b, j] x[b],
  which is exactly the weight gradient of an ``embedding_bag`` whose per-sample
  weights are g, so it reuses that kernel instead of a dense [m, n] x [n, d] product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SelectedPreacts(torch.autograd.Function):
    """values[b, j] = W_enc[idx[b, j]] . xc[b] + b_enc[idx[b, j]], with the values already
    computed by the dense forward; the backward is sparse."""

    @staticmethod
    def forward(ctx, xc_nd: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,  # type: ignore[override,unused-ignore]
                indices_nk: torch.Tensor, values_nk: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xc_nd, W_enc, indices_nk)
        return values_nk.clone()

    @staticmethod
    def backward(ctx, grad_nk: torch.Tensor):  # type: ignore[override,unused-ignore]
        xc_nd, W_enc, indices_nk = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_nk = grad_nk.contiguous()
        grad_x = grad_w = grad_b = None
        if (need_x or need_w) and dense_is_faster(W_enc.shape[0], indices_nk.shape[1]):
            g_nm = grad_nk.new_zeros(grad_nk.shape[0], W_enc.shape[0]).scatter_add_(1, indices_nk, grad_nk)
            grad_w = g_nm.T @ xc_nd if need_w else None
            grad_x = g_nm @ W_enc if need_x else None
        elif need_x or need_w:
            with torch.enable_grad():
                weight = W_enc.detach().requires_grad_(need_w)
                back_nd = F.embedding_bag(indices_nk, weight, per_sample_weights=grad_nk,
                                          mode="sum")
                if need_w:
                    (grad_w,) = torch.autograd.grad(back_nd, weight, grad_outputs=xc_nd)
            grad_x = back_nd.detach() if need_x else None
        if need_b:
            grad_b = torch.zeros(W_enc.shape[0], dtype=grad_nk.dtype, device=grad_nk.device)
            grad_b.index_add_(0, indices_nk.reshape(-1), grad_nk.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


def selected_preacts(xc_nd: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                     indices_nk: torch.Tensor, values_nk: torch.Tensor) -> torch.Tensor:
    """Differentiable view of the selected pre-activations (see ``SelectedPreacts``)."""
    return SelectedPreacts.apply(xc_nd, W_enc, b_enc, indices_nk, values_nk)


def sparse_decode(indices_nk: torch.Tensor, values_nk: torch.Tensor,
                  W_dec_md: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec_md[idx[b, j]] -> [n, d], differentiable in both.
    ``W_dec_md`` holds the decoder columns as rows (``W_dec.T``)."""
    if dense_is_faster(W_dec_md.shape[0], indices_nk.shape[1]):
        z_nm = values_nk.new_zeros(values_nk.shape[0], W_dec_md.shape[0]).scatter_add(1, indices_nk, values_nk)
        return z_nm @ W_dec_md
    return F.embedding_bag(indices_nk, W_dec_md, per_sample_weights=values_nk, mode="sum")


DENSE_LATENTS_PER_ACTIVE = 128
"""Below this many latents per active latent, a dense matmul over all latents beats the
scatter kernels on CPU (small dictionaries: many collisions per latent row)."""


def dense_is_faster(n_latents: int, k: int) -> bool:
    return n_latents <= DENSE_LATENTS_PER_ACTIVE * k


def parallel_components(n_latents: int, *terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                        ) -> torch.Tensor:
    """(grad of W_dec[:, i]) . W_dec[:, i] for every latent i, [m], without touching W_dec.

    For a decode sum_j v[b, j] W_dec[:, idx[b, j]], column i's gradient is
    sum over (b, j) with idx = i of v[b, j] g[b], and its dot with the column is
    sum v[b, j] (g[b] . W_dec[:, i]) = sum v[b, j] dL/dv[b, j]. Each term is
    (indices, values, dL/dvalues) of one decode.
    """
    parallel_m = None
    for indices_nk, values_nk, grad_nk in terms:
        contrib = (values_nk * grad_nk).reshape(-1)
        if parallel_m is None:
            parallel_m = contrib.new_zeros(n_latents)
        parallel_m.index_add_(0, indices_nk.reshape(-1), contrib)
    assert parallel_m is not None
    return parallel_m


@torch.no_grad()
def remove_parallel_(grad_md: torch.Tensor, cols_md: torch.Tensor,
                     parallel_m: torch.Tensor) -> None:
    """Drop the part of each decoder column's gradient along the (unit) column itself:
    the renormalisation after the step would undo it anyway."""
    grad_md.addcmul_(parallel_m.unsqueeze(1), cols_md, value=-1)


@torch.no_grad()
def normalise_rows_(cols_md: torch.Tensor, eps: float = 1e-12) -> None:
    cols_md.div_(cols_md.norm(dim=1, keepdim=True).clamp_min(eps))
