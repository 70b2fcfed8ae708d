"""Train the tiny CLIP on the synthetic world (contrastive, captions generated on the fly).

The model is a plain open_clip ``CLIP`` built from ``MODEL_CFG``: a ViT of 4 blocks
(width 96, patch 8 on 64 px) and a 3-block text tower of width 48 that uses
open_clip's ``SimpleTokenizer`` (its token table is most of the weights, so the
text width is small). Every batch is drawn fresh from the world with a seed made
of (run seed, step), so a run never sees an image twice and a rerun with the same
seed on the same machine gives the same weights. Artifacts occur independently of
the diagnosis during training: the tiny CLIP itself learns no shortcut.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipaudit._version import __version__
from clipaudit.artifacts import save_tensors, sha256_file, write_json
from clipaudit.errors import InputError
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.captions import caption_scene
from clipaudit.synthetic.world import ARTIFACTS, IMAGE_SIZE, render_scene, sample_scene

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


@dataclass(frozen=True)
class TrainedClip:
    """Where a training run wrote the model, and what it measured."""

    dpath: Path
    config_fpath: Path
    weights_fpath: Path
    provenance_fpath: Path
    provenance: dict[str, Any]


def world_batch(seed: int, step: int, batch_size: int,
                artifact_prob: float) -> tuple[np.ndarray, list[str]]:
    """Images [b, H, W, 3] uint8 and one caption each, a pure function of (seed, step)."""
    images, captions = [], []
    probs = {a: artifact_prob for a in ARTIFACTS}
    for i in range(batch_size):
        rng = np.random.default_rng([seed, step, i])
        scene = sample_scene(rng, artifact_probs=probs)
        images.append(render_scene(scene, rng))
        captions.append(caption_scene(scene, rng))
    return np.stack(images), captions


def images_to_tensor(images_bhwc: np.ndarray) -> torch.Tensor:
    """uint8 images -> normalised float tensor [b, 3, H, W], as the backbone's preprocess does."""
    x = torch.from_numpy(images_bhwc).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
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


def train_model(cfg: TrainConfig, reporter: Reporter = NULL_REPORTER) -> torch.nn.Module:
    """The trained tiny CLIP (fp32, eval mode)."""
    import open_clip
    from open_clip.model import CLIP

    if cfg.steps < 1 or cfg.batch_size < 2:
        raise InputError(f"training needs steps >= 1 and batch size >= 2 "
                         f"(got {cfg.steps}, {cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    model = CLIP(**MODEL_CFG)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    labels = torch.arange(cfg.batch_size)
    model.train()
    with reporter.task("training tiny CLIP", total=cfg.steps) as task:
        for step in range(cfg.steps):
            images, captions = world_batch(cfg.seed, step, cfg.batch_size, cfg.artifact_prob)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            img_f, txt_f, scale = model(images_to_tensor(images), tokenizer(captions))
            logits = scale * img_f @ txt_f.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # as in CLIP: the temperature may not exceed 100
                model.logit_scale.clamp_(0, math.log(100))
            task.advance(1, loss=float(loss.detach()))
    return model.eval()


def train_tiny_clip(out_dpath: Path | str, cfg: TrainConfig = TrainConfig(), *,
                    reporter: Reporter = NULL_REPORTER) -> TrainedClip:
    """Train, write ``config.json``, ``model.safetensors`` (fp16) and ``provenance.json``
    into ``out_dpath``, reload the files through the backbone loader and measure them."""
    from clipaudit.extraction.backbone import BackboneSpec, load_backbone
    from clipaudit.synthetic.quality import measure_quality

    out_dpath = Path(out_dpath)
    threads = torch.get_num_threads()
    start, cpu_start = time.perf_counter(), time.process_time()
    model = train_model(cfg, reporter)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    log.info("trained the tiny CLIP in %.0f s (%.0f CPU s) on %d threads",
             seconds, cpu_seconds, threads)

    config_fpath = out_dpath / "config.json"
    weights_fpath = out_dpath / "model.safetensors"
    out_dpath.mkdir(parents=True, exist_ok=True)
    with open(config_fpath, "w") as f:  # a plain open_clip config: other tools read it too
        import json

        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
        f.write("\n")
    state = {k: v.half() for k, v in model.state_dict().items()}
    save_tensors(weights_fpath, "tiny-clip", state, meta={"model_cfg": MODEL_CFG},
                 provenance={"seed": cfg.seed, "steps": cfg.steps})

    backbone = load_backbone(BackboneSpec(config=config_fpath, checkpoint=weights_fpath))
    quality = measure_quality(backbone, seed=cfg.seed + 1_000_003, n=cfg.eval_images,
                              reporter=reporter)
    provenance = {
        "train_config": asdict(cfg),
        "data": "clipaudit.synthetic world, batches drawn fresh from seeds (seed, step, i)",
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
    return TrainedClip(out_dpath, config_fpath, weights_fpath, provenance_fpath, provenance)
