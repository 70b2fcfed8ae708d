"""Resumable SAE training: the whole training state, written every N steps.

A checkpoint (kind ``sae-checkpoint``, safetensors) holds the SAE's weights, Adam's
moments and step counts, each latent's rows-since-fired counter, the step reached and
the data variance measured at initialisation; its header names the training config and
the data it belongs to. Resuming restores all of it in place and skips the batches
already seen (the batch order is a function of the seed and the epoch), so the resumed
run computes exactly the steps the uninterrupted one would have: on the CPU its weights
are bit for bit the same.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import load_tensors, save_tensors
from clipaudit.errors import MismatchError
from clipaudit.extraction.sources import ActivationSource
from clipaudit.sae.config import SAETrainConfig
from clipaudit.sae.trainer import SAETrainer

log = logging.getLogger(__name__)

KIND = "sae-checkpoint"
# Options that may change between the run that wrote a checkpoint and the one resuming.
_FREE = ("device", "checkpoint_every")


def checkpoint_fpath_for(out_fpath: Path | str) -> Path:
    """Where ``train-sae --out X.safetensors`` keeps its checkpoint: ``X.checkpoint.safetensors``."""
    out_fpath = Path(out_fpath)
    stem = out_fpath.name[: -len(out_fpath.suffix)] if out_fpath.suffix else out_fpath.name
    return out_fpath.with_name(f"{stem}.checkpoint.safetensors")


def training_identity(source: ActivationSource, config: SAETrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config (but device and checkpoint
    frequency) and the data (model, hook point, data hash, rows)."""
    provenance = source.provenance
    return {"train_config": {k: v for k, v in dataclasses.asdict(config).items()
                             if k not in _FREE},
            "backbone": (provenance.get("backbone") or {}).get("id"),
            "hook": provenance.get("hook"), "data_sha256": provenance.get("data_sha256"),
            "n_rows": source.n_rows, "d": source.d}


def save_checkpoint(fpath: Path | str, trainer: SAETrainer, identity: dict[str, Any]) -> Path:
    """Write ``trainer``'s whole state, atomically."""
    sae = trainer.sae
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
               "scale": sae.scale, "rows_since_fired": trainer.rows_since_fired}
    state = trainer.optimizer.state_dict()
    for i, param_state in state["state"].items():
        for name, value in param_state.items():
            tensors[f"adam.{i}.{name}"] = torch.as_tensor(value)
    meta = {"identity": identity, "steps_done": trainer.steps_done,
            "total_steps": trainer.total_steps, "data_variance": trainer.data_variance,
            "param_groups": state["param_groups"]}
    return save_tensors(fpath, KIND, {k: v.detach() for k, v in tensors.items()}, meta)


def load_checkpoint(fpath: Path | str, trainer: SAETrainer, identity: dict[str, Any]) -> None:
    """Restore ``trainer`` (built for the same config and data) from ``fpath``; a
    ``MismatchError`` names what differs when the checkpoint belongs to another run."""
    tf = load_tensors(fpath, KIND)
    _check_identity(fpath, tf.meta.get("identity") or {}, identity)
    t = tf.tensors
    sae = trainer.sae
    with torch.no_grad():  # copies in place: the trainer holds views of W_dec
        sae.set_weights(W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"],
                        scale=t["scale"])
        trainer.rows_since_fired.copy_(t["rows_since_fired"])
    state: dict[str, Any] = {"state": {}, "param_groups": tf.meta["param_groups"]}
    for key, value in t.items():
        if key.startswith("adam."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    trainer.optimizer.load_state_dict(state)
    trainer.steps_done = int(tf.meta["steps_done"])
    trainer.data_variance = float(tf.meta["data_variance"])
    log.info("resumed SAE training from %s at step %d of %d", fpath, trainer.steps_done,
             trainer.total_steps)


def _check_identity(fpath: Path | str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if key == "train_config" and isinstance(before, dict) and isinstance(after, dict):
            for option in sorted(set(before) | set(after)):
                if before.get(option) != after.get(option):
                    raise MismatchError(
                        f"{fpath}: checkpoint of a run with {option}={before.get(option)!r}; "
                        f"this run asks for {after.get(option)!r}. Rerun with the checkpoint's "
                        "options to resume, or delete the checkpoint to start afresh")
        elif before != after:
            raise MismatchError(f"{fpath}: checkpoint of training on other data ({key} "
                                f"{before!r}; this run: {after!r}); delete it to start afresh")
