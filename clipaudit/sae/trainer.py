"""One optimisation step of a TopK SAE at a time.

The step follows Gao et al. 2024: squared error normalised by the data variance (so
it reads as FVU) plus the auxiliary-K loss on dead latents; Adam; decoder gradients
made orthogonal to the columns and the columns renormalised after each step. Only the
encoder's forward matmul is dense (see ``clipaudit.sae.sparse_ops``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipaudit.sae.config import SAETrainConfig, default_lr
from clipaudit.sae.model import TopKSAE
from clipaudit.sae.sparse_ops import (
    normalise_rows_,
    parallel_components,
    remove_parallel_,
    selected_preacts,
    sparse_decode,
)


@dataclass(frozen=True)
class StepStats:
    """One optimisation step, as shown beside the progress bar."""

    loss: float
    fvu: float
    """Batch reconstruction error over the data variance estimated at initialisation."""
    aux_loss: float
    dead_fraction: float
    lr: float


@dataclass(frozen=True)
class StepGradients:
    """What ``compute_gradients`` measured; the gradients themselves are in ``.grad``."""

    recon_loss: float
    aux_loss: float
    dead_fraction: float
    top_idx: torch.Tensor
    top_vals: torch.Tensor


class SAETrainer:
    """Optimises an initialised SAE one batch at a time (``train_sae`` drives it;
    the speed benchmark times ``step``)."""

    def __init__(self, sae: TopKSAE, config: SAETrainConfig, *, total_steps: int,
                 dead_after_samples: int, data_variance: float):
        self.sae, self.config, self.total_steps = sae, config, total_steps
        self.dead_after_samples = dead_after_samples
        self.data_variance = max(float(data_variance), 1e-12)
        self.base_lr = config.lr if config.lr is not None else default_lr(sae.n_latents)
        self.aux_k = config.aux_k if config.aux_k is not None else max(1, sae.d // 2)
        # Adam updates the decoder through a contiguous [m, d] alias of W_dec's storage:
        # given the column-major W_dec itself, the fused kernel copies it every step.
        self._W_dec_md = sae.W_dec.detach().T
        assert self._W_dec_md.is_contiguous(), "TopKSAE keeps W_dec column-major"
        params = [sae.W_enc, sae.b_enc, self._W_dec_md, sae.b_dec]
        self.optimizer = torch.optim.Adam(params, lr=self.base_lr, betas=(0.9, 0.999),
                                          eps=6.25e-10, fused=sae.device.type in ("cpu", "cuda"))
        self.rows_since_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=sae.device)
        self.steps_done = 0

    def lr_at(self, step: int) -> float:
        total = self.total_steps
        warmup = max(1, round(self.config.warmup_fraction * total))
        decay = round(self.config.decay_fraction * total)
        factor = min(1.0, (step + 1) / warmup)
        if decay > 0 and step >= total - decay:
            factor *= max(0.0, (total - step) / decay)
        return self.base_lr * factor

    def dead_mask(self) -> torch.Tensor:
        return self.rows_since_fired >= self.dead_after_samples

    def step(self, h_nd: torch.Tensor) -> StepStats:
        """One Adam step on a batch of raw activations h [n, d]."""
        grads = self.compute_gradients(h_nd)
        lr = self.lr_at(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        normalise_rows_(self.sae.W_dec.data.T)
        self._track_firing(grads.top_idx, grads.top_vals)
        self.steps_done += 1
        return StepStats(loss=grads.recon_loss + self.config.aux_coef * grads.aux_loss,
                         fvu=grads.recon_loss, aux_loss=grads.aux_loss,
                         dead_fraction=grads.dead_fraction, lr=lr)

    def compute_gradients(self, h_nd: torch.Tensor) -> StepGradients:
        """Loss and gradients (``.grad`` of every parameter, the decoder's with the part
        parallel to its columns removed) for a batch of raw activations h [n, d]."""
        sae = self.sae
        x_nd = h_nd.to(sae.device, torch.float32) * sae.scale
        xc_nd = x_nd - sae.b_dec
        # The decoder enters the graph as its own leaf, [m, d]: its gradient then
        # arrives as a plain tensor that autograd keeps as it is, instead of copying a
        # transposed view into W_dec's layout (100 MB per step at d=768, m=32768).
        W_dec_md = sae.W_dec.detach().T.requires_grad_()
        with torch.no_grad(), torch.autocast(sae.device.type, torch.bfloat16,
                                             enabled=self.config.bf16):
            pre_nm = torch.addmm(sae.b_enc, xc_nd, sae.W_enc.T)
            top_vals, top_idx = pre_nm.topk(sae.k, dim=1, sorted=False)
        top_vals = top_vals.float()  # a no-op without autocast
        vals = torch.relu(selected_preacts(xc_nd, sae.W_enc, sae.b_enc, top_idx, top_vals))
        vals.retain_grad()
        x_hat = sparse_decode(top_idx, vals, W_dec_md) + sae.b_dec
        recon_loss = (x_hat - x_nd).pow(2).sum(1).mean() / self.data_variance
        dead = self.dead_mask()
        aux = self._aux_terms(pre_nm, xc_nd, x_nd - x_hat.detach(), dead, W_dec_md)
        loss = (recon_loss + self.config.aux_coef * aux[0]) if aux else recon_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert vals.grad is not None
        terms = [(top_idx, vals.detach(), vals.grad)]
        if aux:
            assert aux[2].grad is not None
            terms.append((aux[1], aux[2].detach(), aux[2].grad))
        assert W_dec_md.grad is not None
        remove_parallel_(W_dec_md.grad, W_dec_md.detach(),
                         parallel_components(sae.n_latents, *terms))
        self._W_dec_md.grad = W_dec_md.grad
        sae.W_dec.grad = W_dec_md.grad.T
        return StepGradients(recon_loss=float(recon_loss.detach()),
                          aux_loss=float(aux[0].detach()) if aux else 0.0,
                          dead_fraction=float(dead.float().mean()),
                          top_idx=top_idx, top_vals=vals.detach())

    def _aux_terms(self, pre_nm: torch.Tensor, xc_nd: torch.Tensor, residual_nd: torch.Tensor,
                   dead_m: torch.Tensor, W_dec_md: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Auxiliary-K: the top dead latents of each row reconstruct the residual, so
        that dead latents get a gradient and come back. Returns (loss, indices, acts)."""
        if self.config.aux_coef <= 0 or not bool(dead_m.any()):
            return None
        dead_idx = dead_m.nonzero().squeeze(1)
        k_aux = min(self.aux_k, int(dead_idx.numel()))
        with torch.no_grad():
            aux_vals, local = pre_nm[:, dead_idx].topk(k_aux, dim=1, sorted=False)
            aux_vals, aux_idx = aux_vals.float(), dead_idx[local]
        sae = self.sae
        acts = torch.relu(selected_preacts(xc_nd, sae.W_enc, sae.b_enc, aux_idx, aux_vals))
        acts.retain_grad()
        residual_hat = sparse_decode(aux_idx, acts, W_dec_md)
        scale = residual_nd.pow(2).sum(1).mean().clamp_min(1e-12)
        return (residual_hat - residual_nd).pow(2).sum(1).mean() / scale, aux_idx, acts

    @torch.no_grad()
    def _track_firing(self, top_idx: torch.Tensor, vals: torch.Tensor) -> None:
        fired = torch.zeros_like(self.rows_since_fired, dtype=torch.bool)
        fired[top_idx[vals > 0]] = True
        self.rows_since_fired += top_idx.shape[0]
        self.rows_since_fired[fired] = 0
