"""Training a TopK SAE on an ActivationSource, streaming shuffled batches.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
- inputs scaled so that their mean squared norm is d (the scale is stored with the SAE);
- b_dec initialised at the geometric median (or mean) of a data sample, decoder
  columns random unit vectors, encoder initialised as the decoder's transpose;
- loss: squared error normalised by the data variance (so it reads as FVU), plus the
  auxiliary-K loss: the top ``aux_k`` dead latents reconstruct the residual error;
- Adam, linear warm-up, linear decay over the last part of training;
- decoder gradients made orthogonal to the columns, columns renormalised after each step.

Memory is bounded by one batch plus the SAE and its optimiser state: nothing grows
with the number of cached rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from clipaudit.errors import InputError
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.metrics import SAEMetrics, evaluate_sae
from clipaudit.sae.model import TopKSAE
from clipaudit.sae.sparse_ops import (
    normalise_rows_,
    parallel_components,
    remove_parallel_,
    selected_preacts,
    sparse_decode,
)
from clipaudit.sources import ActivationSource

log = logging.getLogger(__name__)

_MIN_DEFAULT_STEPS = 1000
_DEFAULT_EPOCHS = 10.0


@dataclass(frozen=True)
class SAETrainConfig:
    """How to train a TopK SAE (``clipaudit train-sae``)."""

    n_latents: int | None = None
    """Dictionary size m; None: ``expansion`` x d."""
    expansion: int = 8
    """m = expansion x d when ``n_latents`` is not given."""
    k: int = 32
    """Active latents per row."""
    batch_size: int = 1024
    """Rows per optimisation step."""
    lr: float | None = None
    """Adam learning rate; None: 2e-4 / sqrt(m / 2**14) (Gao et al.'s scaling law)."""
    warmup_fraction: float = 0.05
    """Share of the steps over which the learning rate rises linearly from 0."""
    decay_fraction: float = 0.2
    """Share of the steps, at the end, over which it falls linearly to 0."""
    steps: int | None = None
    """Optimisation steps; wins over ``epochs``."""
    epochs: float | None = None
    """Passes over the data when ``steps`` is None; with neither, 10 epochs but at least
    1000 steps."""
    aux_k: int | None = None
    """Dead latents that reconstruct the residual in the auxiliary loss; None: d // 2."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary-K loss (0 turns it off)."""
    dead_after_samples: int | None = None
    """A latent that has not fired for this many training rows is dead; None: one pass
    over the data, at least 4 batches, at most 1,000,000 rows."""
    b_dec_init: Literal["median", "mean"] = "median"
    """b_dec starts at the geometric median or the mean of ``init_rows`` rows."""
    normalize_input: bool = True
    """Scale inputs so that their mean squared norm is d; False: scale 1."""
    init_rows: int = 16384
    """Rows read (shuffled) to estimate the input scale and the b_dec start."""
    seed: int = 0
    """Seeds initialisation and batch order: same seed, same data -> same weights."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``...; None: CUDA when available."""


@dataclass(frozen=True)
class TrainResult:
    sae: TopKSAE
    metrics: SAEMetrics
    """Evaluated on the whole source after training."""
    steps: int


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
class _Gradients:
    recon_loss: float
    aux_loss: float
    dead_fraction: float
    top_idx: torch.Tensor
    top_vals: torch.Tensor


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"device {device!r} is not a torch device ({e})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def default_lr(n_latents: int) -> float:
    return 2e-4 / math.sqrt(n_latents / 2**14)


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

    def compute_gradients(self, h_nd: torch.Tensor) -> _Gradients:
        """Loss and gradients (``.grad`` of every parameter, the decoder's with the part
        parallel to its columns removed) for a batch of raw activations h [n, d]."""
        sae = self.sae
        x_nd = h_nd.to(sae.device, torch.float32) * sae.scale
        xc_nd = x_nd - sae.b_dec
        # The decoder enters the graph as its own leaf, [m, d]: its gradient then
        # arrives as a plain tensor that autograd keeps as it is, instead of copying a
        # transposed view into W_dec's layout (100 MB per step at d=768, m=32768).
        W_dec_md = sae.W_dec.detach().T.requires_grad_()
        with torch.no_grad():
            pre_nm = torch.addmm(sae.b_enc, xc_nd, sae.W_enc.T)
            top_vals, top_idx = pre_nm.topk(sae.k, dim=1, sorted=False)
        vals = torch.relu(selected_preacts(xc_nd, sae.W_enc, sae.b_enc, top_idx, top_vals))
        vals.retain_grad()
        x_hat = sparse_decode(top_idx, vals, W_dec_md) + sae.b_dec
        recon_loss = (x_hat - x_nd).pow(2).sum(1).mean() / self.data_variance
        dead = self.dead_mask()
        aux = self._aux_terms(pre_nm, xc_nd, x_nd - x_hat.detach(), dead, W_dec_md)
        loss = recon_loss + self.config.aux_coef * aux[0] if aux else recon_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        terms = [(top_idx, vals.detach(), vals.grad)]
        if aux:
            terms.append((aux[1], aux[2].detach(), aux[2].grad))
        assert W_dec_md.grad is not None
        remove_parallel_(W_dec_md.grad, W_dec_md.detach(),
                         parallel_components(sae.n_latents, *terms))
        self._W_dec_md.grad = W_dec_md.grad
        sae.W_dec.grad = W_dec_md.grad.T
        return _Gradients(recon_loss=float(recon_loss.detach()),
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
            aux_idx = dead_idx[local]
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


# ------------------------------------------------------------------ driver


def train_sae(source: ActivationSource, config: SAETrainConfig = SAETrainConfig(), *,
              reporter: Reporter = NULL_REPORTER,
              embed_readout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TrainResult:
    """Train a TopK SAE on ``source`` and evaluate it; the SAE's ``meta`` carries the
    source's provenance, the config, the seed and the metrics."""
    d, n_rows = source.d, source.n_rows
    n_latents = config.n_latents if config.n_latents is not None else config.expansion * d
    _validate(config, n_latents, n_rows)
    device = resolve_device(config.device)
    total_steps = _total_steps(config, n_rows)

    sae = TopKSAE(d, n_latents, config.k, relu=True)
    data_variance = initialise_sae(sae, _head_rows(source, config), config)
    sae.to(device)
    dead_after = config.dead_after_samples or min(max(n_rows, 4 * config.batch_size), 1_000_000)
    trainer = SAETrainer(sae, config, total_steps=total_steps, dead_after_samples=dead_after,
                         data_variance=data_variance)
    log.info("training a %d-latent TopK SAE (k=%d) on %d rows of width %d for %d steps on %s",
             n_latents, config.k, n_rows, d, total_steps, device)
    task = reporter.task("train SAE", total=total_steps)
    try:
        for h_nd in _batches(source, config, total_steps):
            stats = trainer.step(h_nd)
            task.advance(1, loss=stats.loss, fvu=stats.fvu, dead=stats.dead_fraction)
    finally:
        task.close()

    sae.eval()
    metrics = evaluate_sae(sae, source, embed_readout=embed_readout, reporter=reporter)
    sae.meta = _training_meta(sae, source, config, metrics, total_steps)
    return TrainResult(sae=sae, metrics=metrics, steps=total_steps)


def _validate(config: SAETrainConfig, n_latents: int, n_rows: int) -> None:
    if n_rows == 0:
        raise InputError("the activation source is empty: nothing to train on")
    if not 0 < config.k <= n_latents:
        raise InputError(f"k must be between 1 and the number of latents ({n_latents}), "
                         f"got {config.k}")
    checks = {"batch_size": config.batch_size, "expansion": config.expansion,
              "init_rows": config.init_rows}
    for name, value in checks.items():
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if config.steps is not None and config.steps < 1:
        raise InputError(f"steps must be at least 1, got {config.steps}")
    if config.epochs is not None and config.epochs <= 0:
        raise InputError(f"epochs must be positive, got {config.epochs}")
    if config.lr is not None and config.lr <= 0:
        raise InputError(f"lr must be positive, got {config.lr}")


def _total_steps(config: SAETrainConfig, n_rows: int) -> int:
    steps_per_epoch = math.ceil(n_rows / config.batch_size)
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * steps_per_epoch))
    return max(_MIN_DEFAULT_STEPS, math.ceil(_DEFAULT_EPOCHS * steps_per_epoch))


def _head_rows(source: ActivationSource, config: SAETrainConfig) -> torch.Tensor:
    """The first ``init_rows`` rows of a shuffled pass (read lazily, then dropped)."""
    parts, n = [], 0
    for batch in source.iter_batches(config.batch_size, shuffle=True, seed=config.seed):
        parts.append(batch["acts"].float())
        n += parts[-1].shape[0]
        if n >= config.init_rows:
            break
    return torch.cat(parts)[: config.init_rows]


def _batches(source: ActivationSource, config: SAETrainConfig,
             total_steps: int) -> Iterator[torch.Tensor]:
    """``total_steps`` batches, epoch after epoch, each epoch in its own seeded order."""
    done, epoch = 0, 0
    while done < total_steps:
        seed = config.seed + 1 + epoch
        for batch in source.iter_batches(config.batch_size, shuffle=True, seed=seed):
            yield batch["acts"]
            done += 1
            if done == total_steps:
                return
        epoch += 1


@torch.no_grad()
def initialise_sae(sae: TopKSAE, sample_nd: torch.Tensor, config: SAETrainConfig) -> float:
    """Set scale, b_dec, W_dec and W_enc from a data sample; return the sample's
    variance per row (sum over dimensions) in normalised space."""
    sample_nd = sample_nd.double()
    mean_sq_norm = float(sample_nd.pow(2).sum(1).mean())
    scale = math.sqrt(sae.d / mean_sq_norm) if config.normalize_input and mean_sq_norm > 0 else 1.0
    x_nd = sample_nd * scale
    b_dec = geometric_median(x_nd) if config.b_dec_init == "median" else x_nd.mean(0)
    gen = torch.Generator().manual_seed(config.seed)
    directions_md = torch.randn(sae.n_latents, sae.d, generator=gen, dtype=torch.float64)
    directions_md /= directions_md.norm(dim=1, keepdim=True)
    sae.set_weights(W_enc=directions_md, b_enc=torch.zeros(sae.n_latents),
                    W_dec=directions_md.T, b_dec=b_dec, scale=scale)
    variance = float((x_nd - x_nd.mean(0)).pow(2).sum(1).mean())
    return variance if variance > 0 else float(x_nd.pow(2).sum(1).mean())


def geometric_median(x_nd: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    y = x_nd.mean(0)
    for _ in range(iters):
        w = 1.0 / (x_nd - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w.unsqueeze(1) * x_nd).sum(0) / w.sum()
        moved = float((y_next - y).norm())
        y = y_next
        if moved <= tol * (float(y.norm()) + 1e-12):
            break
    return y


def _training_meta(sae: TopKSAE, source: ActivationSource, config: SAETrainConfig,
                   metrics: SAEMetrics, steps: int) -> dict[str, Any]:
    provenance = dict(source.provenance)
    return {
        "source_format": "clipaudit",
        "backbone": provenance.pop("backbone", None),
        "hook": provenance.pop("hook", None),
        "data": {**provenance, "n_rows": source.n_rows},
        "d": sae.d,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "relu": sae.relu,
        "scale": float(sae.scale),
        "normalisation": "mean squared norm = d" if config.normalize_input else "none",
        "seed": config.seed,
        "steps": steps,
        "train_config": dataclasses.asdict(config),
        "metrics": metrics.as_dict(),
    }


def train_sae_on_cache(cache_dpath: Path | str, out_fpath: Path | str,
                       config: SAETrainConfig = SAETrainConfig(), *, embed_check: bool = True,
                       reporter: Reporter = NULL_REPORTER) -> TrainResult:
    """``clipaudit train-sae``: train on an activation cache, measure the downstream
    embedding cosine where the hook point allows it, and save the SAE to ``out_fpath``."""
    from clipaudit.cache import open_cache
    from clipaudit.sae.files import save_sae
    from clipaudit.sae.info import embed_readout_for

    cache = open_cache(cache_dpath)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))
    readout = embed_readout_for(cache.provenance, device) if embed_check else None
    result = train_sae(cache, config, reporter=reporter, embed_readout=readout)
    result.sae.meta["data"]["cache"] = str(cache_dpath)
    save_sae(result.sae, out_fpath)
    return result
