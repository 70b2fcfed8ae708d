"""Extraction engines: what runs the model over the pending shards of a cache.

``clipaudit.extraction.cache`` owns the cache format: it writes the plan and the
manifest, decides which shards are pending, cuts them into batches and finally
writes the index. An engine only computes those batches and hands each result to
the cache's ``ShardWriter``, so every engine writes the same files, byte for byte
the same code path:

- ``local``: decoding in DataLoader worker processes, the model in this process
  (``clipaudit.extraction.local_engine``);
- ``ray``: Ray Data, decoding in Ray tasks and the model in a pool of actors, one
  per GPU, in a local Ray or on a cluster (``clipaudit.extraction.ray_engine``;
  needs ``pip install 'clipaudit[ray]'``).

Engines are registered by name and imported only when used, so that the ``ray``
engine costs nothing (and needs no Ray) until someone asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from clipaudit.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from clipaudit.extraction.backbone import Backbone
    from clipaudit.extraction.cache import ExtractConfig, ShardWriter
    from clipaudit.extraction.hooks import HookPoint, Tower
    from clipaudit.progress import Reporter

__all__ = ["EncodeJob", "Engine", "RayConfig", "get_engine", "list_engines", "register_engine",
           "run_tower"]

RAY_INSTALL_HINT = "pip install 'clipaudit[ray]'"


@dataclass(frozen=True)
class RayConfig:
    """How the ``ray`` engine uses Ray (ignored by the ``local`` engine)."""

    address: str | None = None
    """Ray cluster to connect to (``ray://head:10001``, ``head:6379`` or ``auto``); None:
    ``$RAY_ADDRESS`` when set, else a local Ray started for this run and stopped after it."""
    actors: int | None = None
    """Model actors; None: one per GPU when the cluster has GPUs (and ``device`` allows
    them), else one."""
    cpus_per_actor: float = 1.0
    """CPUs each model actor reserves in Ray's scheduler (GPU actors too: they feed the GPU)."""
    threads_per_actor: int | None = None
    """torch threads of a CPU actor; None: this machine's cores / actors in a local Ray,
    ``cpus_per_actor`` (at least 1) on a cluster."""
    object_store_mb: int = 1024
    """Object-store memory of a local Ray, in MiB (a cluster sets its own). Decoded
    batches pass through it; Ray spills to disk beyond it."""

    def validate(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise InputError(f"ray actors must be at least 1, got {self.actors}")
        if self.cpus_per_actor < 0:
            raise InputError(f"CPUs per ray actor must be >= 0, got {self.cpus_per_actor}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise InputError(f"threads per ray actor must be at least 1, got "
                             f"{self.threads_per_actor}")
        if self.object_store_mb < 80:
            raise InputError(f"ray object store must be at least 80 MiB, got "
                             f"{self.object_store_mb}")


@dataclass(frozen=True)
class EncodeJob:
    """The pending shards of one cache, cut into batches, for an engine to compute."""

    items: pd.DataFrame
    """The plan (columns ``id``, ``path``, ...), row position = item id."""
    batches: list[list[int]]
    """Row positions of each batch; a batch never spans two shards; shards in order."""
    config: ExtractConfig
    backbone: Backbone
    """The model, loaded in this process (the ``ray`` engine's actors load their own
    from ``config.backbone`` and check that it has this one's id)."""
    tower: Tower
    writer: ShardWriter
    """Receives every computed batch (``ShardWriter.add``) and writes finished shards."""


@dataclass(frozen=True)
class Engine:
    """A registered engine: ``target`` (``module:function``) is imported when first used;
    the function takes an ``EncodeJob`` and a ``Reporter``."""

    name: str
    description: str
    target: str


_ENGINES: dict[str, Engine] = {}


def register_engine(engine: Engine) -> None:
    """Add (or replace) an engine under ``engine.name``."""
    _ENGINES[engine.name] = engine


def list_engines() -> list[Engine]:
    return [_ENGINES[name] for name in sorted(_ENGINES)]


def get_engine(name: str) -> Callable[[EncodeJob, Reporter], None]:
    """The run function of engine ``name``; an InputError lists the engines when unknown,
    and says how to install Ray when the ``ray`` engine lacks it."""
    if name not in _ENGINES:
        raise InputError(f"unknown extraction engine {name!r}. Available: "
                         f"{', '.join(sorted(_ENGINES))}")
    module_name, function = _ENGINES[name].target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] == "ray":
            raise InputError(f"the {name} engine needs Ray, which is not installed: "
                             f"{RAY_INSTALL_HINT}") from None
        raise
    run: Callable[[EncodeJob, Reporter], None] = getattr(module, function)
    return run


def run_tower(tower: Tower, images: torch.Tensor, hook: HookPoint, dtype: torch.dtype,
              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts, embeds) of one batch, on the CPU in ``dtype``: what every engine stores."""
    try:
        with torch.inference_mode():
            cap = tower.capture(images, hook)
    except torch.cuda.OutOfMemoryError:
        raise InputError(f"out of GPU memory at batch size {batch_size}; rerun with a smaller "
                         "--batch-size (finished shards are kept)") from None
    # copy: cls acts are a view that would keep the batch's whole residual alive
    return (cap.acts.to(device="cpu", dtype=dtype, copy=True),
            cap.embeds.to(device="cpu", dtype=dtype, copy=True))


def describe_engines() -> dict[str, Any]:
    """name -> description, for help texts."""
    return {e.name: e.description for e in list_engines()}


register_engine(Engine("local", "decoding in worker processes, the model in this process",
                       "clipaudit.extraction.local_engine:encode_local"))
register_engine(Engine("ray", "Ray Data: decoding in Ray tasks, the model in an actor pool "
                              "(local Ray or a cluster)",
                       "clipaudit.extraction.ray_engine:encode_ray"))
