"""Training a TopK SAE on an ActivationSource, streaming shuffled batches.

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
- inputs scaled so that their mean squared norm is d (the scale is stored with the SAE);
- b_dec initialised at the geometric median (or mean) of a data sample, decoder
  columns random unit vectors, encoder initialised as the decoder's transpose;
- then ``SAETrainer`` steps (normalised MSE + auxiliary-K, Adam with warm-up and decay,
  unit-norm decoder columns) over seeded epochs of shuffled batches.

Memory is bounded by one batch plus the SAE and its optimiser state: nothing grows
with the number of cached rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipaudit.device import resolve_device, torch_threads
from clipaudit.errors import InputError
from clipaudit.extraction.sources import ActivationSource
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.checkpoint import (
    checkpoint_fpath_for,
    load_checkpoint,
    save_checkpoint,
    training_identity,
)
from clipaudit.sae.config import SAETrainConfig
from clipaudit.sae.metrics import SAEMetrics, evaluate_sae
from clipaudit.sae.model import TopKSAE
from clipaudit.sae.settings import SAESettings, choose_sae_settings
from clipaudit.sae.trainer import SAETrainer

log = logging.getLogger(__name__)

_MIN_DEFAULT_STEPS = 1000
SMALL_STEP_MACS = 50_000_000
"""Below this many multiply-adds per training step (batch x width x latents x 3: encode,
decode, gradients), a CPU step is a fraction of a millisecond of arithmetic, and
splitting each small operation across threads costs more in synchronisation than it
saves (the demo's 192-latent SAE stepped several times slower on two busy cores than on
one): such SAEs train on one thread."""
_DEFAULT_EPOCHS = 10.0

__all__ = ["SAETrainConfig", "TrainResult", "geometric_median", "initialise_sae", "train_sae",
           "train_sae_on_cache"]


@dataclass(frozen=True)
class TrainResult:
    sae: TopKSAE
    metrics: SAEMetrics
    """Evaluated on the whole source after training."""
    steps: int
    settings: SAESettings | None = None
    """The settings trained with, and which the data chose (``clipaudit.sae.settings``)."""
    coverage: list[Any] = field(default_factory=list)
    """Per declared artifact column: how well the best component separates it beside how
    well a linear probe decodes it (filled by ``train_sae_on_cache``'s ``coverage``)."""


# ------------------------------------------------------------------ driver


def train_sae(source: ActivationSource, config: SAETrainConfig = SAETrainConfig(), *,
              reporter: Reporter = NULL_REPORTER,
              embed_readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
              checkpoint_fpath: Path | str | None = None) -> TrainResult:
    """Train a TopK SAE on ``source`` and evaluate it; the SAE's ``meta`` carries the
    source's provenance, the config (with what the data chose filled in), the seed and
    the metrics.

    With ``checkpoint_fpath`` and ``config.checkpoint_every``, the training state is
    written there every that many steps, and a checkpoint found there is resumed from
    (``clipaudit.sae.checkpoint``; the caller removes it once the SAE is saved)."""
    d, n_rows = source.d, source.n_rows
    if n_rows == 0:
        raise InputError("the activation source is empty: nothing to train on")
    _validate(config)
    settings = choose_sae_settings(config, d, n_rows)  # expansion, k, steps from d and N
    config = settings.config
    assert config.n_latents is not None and config.k is not None
    n_latents = config.n_latents
    if not 0 < config.k <= n_latents:
        raise InputError(f"k must be between 1 and the number of latents ({n_latents}), "
                         f"got {config.k}")
    device = resolve_device(config.device)
    total_steps = _total_steps(config, n_rows)
    if config.bf16 and device.type != "cuda":
        log.warning("bf16 autocast on %s: supported, but rarely faster than float32 there",
                    device)

    sae = TopKSAE(d, n_latents, config.k, relu=True)
    dead_after = config.dead_after_samples or min(max(n_rows, 4 * config.batch_size), 1_000_000)
    resume = checkpoint_fpath is not None and Path(checkpoint_fpath).is_file()
    data_variance = 1.0 if resume else initialise_sae(sae, _head_rows(source, config), config)
    sae.to(device)
    trainer = SAETrainer(sae, config, total_steps=total_steps, dead_after_samples=dead_after,
                         data_variance=data_variance)
    identity = training_identity(source, config)
    if resume:
        assert checkpoint_fpath is not None
        load_checkpoint(checkpoint_fpath, trainer, identity)
    log.info("training a %d-latent TopK SAE (k=%d) on %d rows of width %d for %d steps on %s",
             n_latents, config.k, n_rows, d, total_steps, device)
    every = config.checkpoint_every if checkpoint_fpath is not None else None
    task = reporter.task("train SAE", total=total_steps)
    small = config.batch_size * d * n_latents * 3 < SMALL_STEP_MACS
    with torch_threads(1 if small and device.type == "cpu" else None):
        try:
            task.advance(trainer.steps_done)
            for h_nd in _batches(source, config, total_steps, start=trainer.steps_done):
                stats = trainer.step(h_nd)
                task.advance(1, loss=stats.loss, fvu=stats.fvu, dead=stats.dead_fraction)
                if every and trainer.steps_done % every == 0 and trainer.steps_done < total_steps:
                    assert checkpoint_fpath is not None
                    save_checkpoint(checkpoint_fpath, trainer, identity)
        finally:
            task.close()

    sae.eval()
    metrics = evaluate_sae(sae, source, embed_readout=embed_readout, reporter=reporter)
    sae.meta = _training_meta(sae, source, config, metrics, total_steps)
    sae.meta["settings"] = settings.as_dict()
    return TrainResult(sae=sae, metrics=metrics, steps=total_steps, settings=settings)


def _validate(config: SAETrainConfig) -> None:
    if config.k is not None and config.k < 1:
        raise InputError(f"k must be between 1 and the number of latents, got {config.k}")
    checks = {"batch_size": config.batch_size, "expansion": config.expansion,
              "n_latents": config.n_latents, "init_rows": config.init_rows}
    for name, value in checks.items():
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if config.steps is not None and config.steps < 1:
        raise InputError(f"steps must be at least 1, got {config.steps}")
    if config.epochs is not None and config.epochs <= 0:
        raise InputError(f"epochs must be positive, got {config.epochs}")
    if config.lr is not None and config.lr <= 0:
        raise InputError(f"lr must be positive, got {config.lr}")
    if config.checkpoint_every is not None and config.checkpoint_every < 1:
        raise InputError(f"checkpoint_every must be at least 1, got {config.checkpoint_every}")
    if config.shuffle_window is not None and config.shuffle_window < 1:
        raise InputError(f"shuffle_window must be at least 1 row, got {config.shuffle_window}")


def _total_steps(config: SAETrainConfig, n_rows: int) -> int:
    steps_per_epoch = math.ceil(n_rows / config.batch_size)
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * steps_per_epoch))
    return max(_MIN_DEFAULT_STEPS, math.ceil(_DEFAULT_EPOCHS * steps_per_epoch))


def _shuffled(source: ActivationSource, config: SAETrainConfig, seed: int,
              skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled pass; the keywords a source may lack are passed only when needed."""
    kwargs: dict[str, Any] = {}
    if config.shuffle_window is not None and config.shuffle_window < source.n_rows:
        kwargs["window_rows"] = config.shuffle_window
    if skip_batches:
        if "skip_batches" in inspect.signature(source.iter_batches).parameters:
            kwargs["skip_batches"] = skip_batches
        else:  # a source that cannot skip: read the batches and drop them
            batches = source.iter_batches(config.batch_size, shuffle=True, seed=seed, **kwargs)
            yield from itertools.islice(batches, skip_batches, None)
            return
    yield from source.iter_batches(config.batch_size, shuffle=True, seed=seed, **kwargs)


def _head_rows(source: ActivationSource, config: SAETrainConfig) -> torch.Tensor:
    """The first ``init_rows`` rows of a shuffled pass (read lazily, then dropped)."""
    parts, n = [], 0
    for batch in _shuffled(source, config, config.seed):
        parts.append(batch["acts"].float())
        n += parts[-1].shape[0]
        if n >= config.init_rows:
            break
    return torch.cat(parts)[: config.init_rows]


def _batches(source: ActivationSource, config: SAETrainConfig, total_steps: int,
             start: int = 0) -> Iterator[torch.Tensor]:
    """Batches ``start`` to ``total_steps``, epoch after epoch, each epoch in its own seeded
    order (so that a resumed run sees exactly the batches an uninterrupted one would)."""
    per_epoch = math.ceil(source.n_rows / config.batch_size)
    done, epoch = start, start // per_epoch
    skip = start - epoch * per_epoch
    while done < total_steps:
        for batch in _shuffled(source, config, config.seed + 1 + epoch, skip):
            yield batch["acts"]
            done += 1
            if done == total_steps:
                return
        epoch, skip = epoch + 1, 0


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


CoverageFn = Callable[[TopKSAE, Any], list[Any]]
"""(trained SAE, activation cache) -> coverage of the cache's declared artifact columns."""


def train_sae_on_cache(cache_dpath: Path | str, out_fpath: Path | str,
                       config: SAETrainConfig = SAETrainConfig(), *, embed_check: bool = True,
                       coverage: CoverageFn | None = None,
                       reporter: Reporter = NULL_REPORTER) -> TrainResult:
    """``clipaudit train-sae``: train on an activation cache, measure the downstream
    embedding cosine where the hook point allows it, and save the SAE to ``out_fpath``.

    The cache is streamed from its memory-mapped shards (``config.shuffle_window``), never
    loaded whole. With ``config.checkpoint_every`` the training state goes to
    ``checkpoint_fpath_for(out_fpath)`` every that many steps; a rerun with the same
    options resumes from it, and it is removed once the SAE is saved.

    ``coverage``, when given, measures on the training cache how well the SAE's best
    component separates each declared artifact column beside how well a linear probe
    decodes it (the figures of the audit's coverage check); they land in
    ``TrainResult.coverage``."""
    from clipaudit.extraction.cache import open_cache
    from clipaudit.sae.files import save_sae
    from clipaudit.sae.info import embed_readout_for

    cache = open_cache(cache_dpath)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(device))
    readout = embed_readout_for(cache.provenance, device) if embed_check else None
    checkpoint = checkpoint_fpath_for(out_fpath)
    result = train_sae(cache, config, reporter=reporter, embed_readout=readout,
                       checkpoint_fpath=checkpoint if config.checkpoint_every else None)
    result.sae.meta["data"]["cache"] = str(cache_dpath)
    save_sae(result.sae, out_fpath)
    checkpoint.unlink(missing_ok=True)  # the SAE is saved: nothing left to resume
    if coverage is not None:
        result = dataclasses.replace(result, coverage=list(coverage(result.sae, cache)))
    return result
