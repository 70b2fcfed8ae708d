"""Train a world's tiny CLIP on that world (contrastive, captions generated on the fly).

Each world has a recipe (``RECIPES``): a plain open_clip ``CLIP`` config, the input
statistics of its images and how its quality is measured.

- dermatology (``tiny-derm-clip``, ``MODEL_CFG``): a ViT of 4 blocks (width 96, patch 8
  on 64 px) and a 3-block text tower of width 48;
- birds (``tiny-birds-clip``, ``BIRDS_MODEL_CFG``): a ViT of 6 blocks (width 64, patch 12
  on 72 px: a 6 x 6 grid of patches) and a 4-block text tower of width 32, trained in
  batches of 256 (``BIRDS_TRAIN_CONFIG``).

Both text towers use open_clip's ``SimpleTokenizer`` (its token table is most of the
weights, so the text width is small). Every batch is drawn fresh from the world with a
seed made of (run seed, step), so a run never sees an image twice and a rerun with the
same seed on the same machine gives the same weights. Artifacts occur independently of
the label during training: the tiny CLIP itself learns no shortcut.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipaudit._version import __version__
from clipaudit.artifacts import save_tensors, sha256_file, write_json
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BIRDS_MODEL_NAME, TINY_MODEL_NAME
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic import birds
from clipaudit.synthetic.birds_quality import measure_birds_quality
from clipaudit.synthetic.quality import measure_quality
from clipaudit.synthetic.world import IMAGE_SIZE
from clipaudit.synthetic.worlds import DEFAULT_WORLD, World, get_world

log = logging.getLogger(__name__)

MODEL_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 96, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 48, "heads": 4,
                 "layers": 3},
}
"""open_clip model config of the tiny CLIP."""

PREPROCESS_CFG: dict[str, Any] = {"mean": [0.661, 0.522, 0.436], "std": [0.267, 0.252, 0.233]}
"""Per-channel statistics of world images (measured once on 500 images)."""

BIRDS_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": birds.IMAGE_SIZE, "layers": 6, "width": 64, "head_width": 32,
                   "patch_size": 12, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 32, "heads": 4,
                 "layers": 4},
}
"""open_clip model config of the tiny birds CLIP: deeper and narrower than the
dermatology one, another patch grid (6 x 6) and embedding width (48)."""

BIRDS_PREPROCESS_CFG: dict[str, Any] = {"mean": [0.340, 0.383, 0.341], "std": [0.228, 0.212, 0.258]}
"""Per-channel statistics of birds-world images (measured once on 500 images)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train the tiny CLIP."""

    seed: int = 0
    """Seeds the initial weights and every batch of world images."""
    steps: int = 1000
    """Optimiser steps; each sees ``batch_size`` new images."""
    batch_size: int = 128
    """Images (and captions) per contrastive batch."""
    lr: float = 3e-3
    """Peak learning rate of AdamW (cosine decay after a linear warm-up)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on gains, biases, embeddings or the scale)."""
    artifact_prob: float = 0.3
    """Chance of each artifact in a training image, independent of the diagnosis."""
    eval_images: int = 600
    """Fresh images (another seed) the quality figures in the provenance are measured on."""


BIRDS_TRAIN_CONFIG = TrainConfig(steps=500, batch_size=256, warmup_steps=50)
"""How tiny-birds-clip is trained: as many images as the dermatology run (128,000), in
batches of 256. The bird is a small part of a picture whose sky (time of day) and ground
(water) vary far more; a batch whose items those easy features already tell apart gives
the towers little reason to look at the bird. At 128,000 images, batches of 64 learnt
only water and time of day (kind 0.49), 128 began to learn the kind (0.65), 256 learnt
it (0.955; README, Measured)."""


@dataclass(frozen=True)
class ClipRecipe:
    """What a world's bundled tiny CLIP is: its architecture, input statistics and the
    quality measure its provenance records."""

    model_name: str
    """The ``--model`` name it ships under."""
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    measure_quality: Callable[..., Any]
    """(backbone, *, seed, n, reporter) -> a quality record with ``as_dict()`` and ``summary()``."""
    train_config: TrainConfig = TrainConfig()
    """How the shipped weights were trained (``train-clip`` trains so unless told otherwise)."""


RECIPES: dict[str, ClipRecipe] = {
    "dermatology": ClipRecipe(TINY_MODEL_NAME, MODEL_CFG, PREPROCESS_CFG, measure_quality),
    "birds": ClipRecipe(BIRDS_MODEL_NAME, BIRDS_MODEL_CFG, BIRDS_PREPROCESS_CFG,
                        measure_birds_quality, BIRDS_TRAIN_CONFIG),
}
"""The tiny CLIP of each world that ships one."""


def default_train_config(world: str | World = DEFAULT_WORLD) -> TrainConfig:
    """How ``world``'s shipped tiny CLIP was trained."""
    return recipe_for(world).train_config


def recipe_for(world: str | World) -> ClipRecipe:
    """The tiny-CLIP recipe of ``world`` (an InputError when it has none)."""
    w = get_world(world)
    if w.name not in RECIPES:
        raise InputError(f"the {w.name} world has no tiny-CLIP recipe. Worlds with one: "
                         f"{', '.join(sorted(RECIPES))}")
    return RECIPES[w.name]


@dataclass(frozen=True)
class TrainedClip:
    """Where a training run wrote the model, and what it measured."""

    dpath: Path
    config_fpath: Path
    weights_fpath: Path
    provenance_fpath: Path
    provenance: dict[str, Any]
    summary: str = ""
    """One line of the quality figures, for people."""


def world_batch(seed: int, step: int, batch_size: int, artifact_prob: float,
                world: str | World = DEFAULT_WORLD) -> tuple[np.ndarray, list[str]]:
    """Images [b, H, W, 3] uint8 and one caption each, a pure function of (seed, step)."""
    w = get_world(world)
    images, captions = [], []
    probs = {a: artifact_prob for a in w.artifacts}
    for i in range(batch_size):
        rng = np.random.default_rng([seed, step, i])
        scene = w.sample_scene(rng, artifact_probs=probs)
        images.append(w.render_scene(scene, rng).image)
        captions.append(w.caption_scene(scene, rng))
    return np.stack(images), captions


def images_to_tensor(images_bhwc: np.ndarray,
                     preprocess_cfg: dict[str, Any] = PREPROCESS_CFG) -> torch.Tensor:
    """uint8 images -> normalised float tensor [b, 3, H, W], as the backbone's preprocess does."""
    x = torch.from_numpy(images_bhwc).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    def no_decay(name: str, p: torch.Tensor) -> bool:
        return (p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
                or "embedding" in name)

    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))


def train_model(cfg: TrainConfig, reporter: Reporter = NULL_REPORTER, *,
                world: str | World = DEFAULT_WORLD) -> torch.nn.Module:
    """The trained tiny CLIP of ``world`` (fp32, eval mode)."""
    import open_clip
    from open_clip.model import CLIP

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InputError(f"training needs steps >= 1 and batch size >= 2 "
                         f"(got {cfg.steps}, {cfg.batch_size})")
    recipe = recipe_for(world)
    torch.manual_seed(cfg.seed)
    model = CLIP(**recipe.model_cfg)
    tokenizer = open_clip.SimpleTokenizer(
        context_length=recipe.model_cfg["text_cfg"]["context_length"])
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    labels = torch.arange(cfg.batch_size)
    model.train()
    with reporter.task("training tiny CLIP", total=cfg.steps) as task:
        for step in range(cfg.steps):
            images, captions = world_batch(cfg.seed, step, cfg.batch_size, cfg.artifact_prob,
                                           world)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            img_f, txt_f, scale = model(images_to_tensor(images, recipe.preprocess_cfg),
                                        tokenizer(captions))
            logits = scale * img_f @ txt_f.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # as in CLIP: the temperature may not exceed 100
                model.logit_scale.clamp_(0, math.log(100))
            task.advance(1, loss=float(loss.detach()))
    return model.eval()


def train_tiny_clip(out_dpath: Path | str, cfg: TrainConfig | None = None, *,
                    world: str | World = DEFAULT_WORLD,
                    reporter: Reporter = NULL_REPORTER) -> TrainedClip:
    """Train the tiny CLIP of ``world``, write ``config.json``, ``model.safetensors`` (fp16)
    and ``provenance.json`` into ``out_dpath``, reload the files through the backbone
    loader and measure them. ``cfg`` defaults to the world's recipe's (``RECIPES``)."""
    from clipaudit.extraction.backbone import BackboneSpec, load_backbone

    w = get_world(world)
    recipe = recipe_for(w)
    cfg = recipe.train_config if cfg is None else cfg
    out_dpath = Path(out_dpath)
    threads = torch.get_num_threads()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = train_model(cfg, reporter, world=w)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    log.info("trained the tiny CLIP in %.0f s (%.0f CPU s) on %d threads",
             seconds, cpu_seconds, threads)

    config_fpath = out_dpath / "config.json"
    weights_fpath = out_dpath / "model.safetensors"
    out_dpath.mkdir(parents=True, exist_ok=True)
    with open(config_fpath, "w") as f:  # a plain open_clip config: other tools read it too
        import json

        json.dump({"model_cfg": recipe.model_cfg, "preprocess_cfg": recipe.preprocess_cfg}, f,
                  indent=2)
        f.write("\n")
    state = {k: v.half() for k, v in model.state_dict().items()}
    save_tensors(weights_fpath, "tiny-clip", state, meta={"model_cfg": recipe.model_cfg},
                 provenance={"seed": cfg.seed, "steps": cfg.steps, "world": w.name})

    backbone = load_backbone(BackboneSpec(config=config_fpath, checkpoint=weights_fpath))
    quality = recipe.measure_quality(backbone, seed=cfg.seed + 1_000_003, n=cfg.eval_images,
                                     reporter=reporter)
    provenance = {
        "model": recipe.model_name,
        "world": w.name,
        "train_config": asdict(cfg),
        "data": f"clipaudit.synthetic {w.name} world, batches drawn fresh from seeds "
                "(seed, step, i)",
        "training_seconds": round(seconds, 1),
        # CPU time is what a shared machine cannot inflate much: on 2 dedicated cores
        # the run takes about cpu_seconds / 2 (or less when one thread was used).
        "training_cpu_seconds": round(cpu_seconds, 1),
        "torch_threads": threads,
        "torch_version": torch.__version__,
        "clipaudit_version": __version__,
        "weights_sha256": sha256_file(weights_fpath),
        "quality": quality.as_dict(),
    }
    provenance_fpath = write_json(out_dpath / "provenance.json", "tiny-clip", provenance)
    return TrainedClip(out_dpath, config_fpath, weights_fpath, provenance_fpath, provenance,
                       quality.summary())
