"""How a TopK SAE is trained: the configuration and its resolved defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SAETrainConfig:
    """How to train a TopK SAE (``clipaudit train-sae``)."""

    n_latents: int | None = None
    """Dictionary size m; None: ``expansion`` x d."""
    expansion: int | None = None
    """m = expansion x d when ``n_latents`` is not given; None: from the data (the largest
    power of two from 2 to 32 at which a latent fires on >= 100 rows on average)."""
    k: int | None = None
    """Active latents per row; None: from the width (1.6 x sqrt(d) within 8-64, at most d / 4)."""
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
    """Passes over the data when ``steps`` is None; with neither, 10 epochs within 1,000 to
    100,000 steps."""
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
    """Seeds initialisation and batch order: same seed, same data -> same weights (bit
    for bit on CPU; on CUDA up to the order of atomic additions in the sparse backward)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    bf16: bool = False
    """Run the encoder's dense matmul (the bulk of a step) in bfloat16 autocast: for CUDA
    GPUs with bf16 (Ampere and later). The selection of the top k latents then sees
    bf16 pre-activations; gradients, weights and Adam state stay float32."""
    shuffle_window: int | None = 2_000_000
    """Rows shuffled together: caches with more rows are shuffled within windows of whole
    shards of at least this many rows, read a few shards at a time (a global permutation
    of a cache larger than memory reads every shard for every batch); None: always one
    global permutation."""
    checkpoint_every: int | None = None
    """Write a checkpoint (weights, Adam state, step) every this many steps; a rerun with
    the same options resumes from it and ends with the same weights as an uninterrupted
    run (bit for bit on the CPU). None: no checkpoints."""


def default_lr(n_latents: int) -> float:
    return 2e-4 / math.sqrt(n_latents / 2**14)
