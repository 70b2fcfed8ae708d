"""The activation cache: h at the hook point and the image embeddings, in shards.

Layout of a cache folder::

    manifest.json              kind "activation-cache": provenance, layout, complete flag
    plan.parquet               every planned item (id, path, label, metadata)
    shards/shard-00000.safetensors   acts, embeds, ids of the decoded rows of ids
                               [k * shard_size, (k + 1) * shard_size); per-row status,
                               reason and content hash in its header
    index.parquet              plan + sha256, status, reason (written on completion)

A shard is written atomically, so it exists complete or not at all; a rerun skips
the shards that exist, which makes a killed run resumable at shard granularity.
Each shard is decoded and encoded in fixed batch boundaries, so a resumed cache
equals an uninterrupted one. Worker i of n writes shards i, i + n, ...; whichever
worker finds every shard present writes the index.

This module owns the format: the plan, the manifest, which shards are pending, their
batches (``plan_batches``), the shard files (``ShardWriter``) and the index. An engine
(``clipaudit.extraction.engines``: ``local`` or ``ray``) only computes the batches, so
both write the same files and either can resume a cache the other started.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import (
    read_json,
    read_parquet,
    read_tensor_meta,
    save_tensors,
    write_json,
    write_parquet,
)
from clipaudit.device import resolve_device
from clipaudit.errors import InputError, MismatchError
from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.extraction.cache_reader import ActivationCache, open_cache, shard_fpath
from clipaudit.extraction.data import ImageSource, load_image_source, reason_category
from clipaudit.extraction.engines import EncodeJob, RayConfig, get_engine
from clipaudit.extraction.hooks import HookPoint, Tower, describe_hook, make_tower
from clipaudit.extraction.locking import one_writer_per_worker_slot
from clipaudit.progress import NULL_REPORTER, Reporter

__all__ = ["ActivationCache", "EncodedBatch", "ExtractConfig", "ExtractResult", "ShardWriter",
           "extract", "open_cache", "plan_batches"]

log = logging.getLogger(__name__)

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_CACHE_FILES = {"manifest.json", "plan.parquet", "index.parquet", "shards"}


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract an activation cache."""

    backbone: BackboneSpec = BackboneSpec()
    """The CLIP to run (ignored when ``extract`` is given a loaded backbone). It must name
    a model: ``BackboneSpec()`` names none, and extracting with it is an InputError."""
    hook: HookPoint = HookPoint()
    """What to store: the pooled vector (default), or the residual stream at a layer and
    token."""
    batch_size: int = 64
    """Images per forward pass. Changing it between runs of one cache is allowed."""
    num_workers: int = 2
    """Decoding worker processes (0: decode in the main process)."""
    shard_size: int = 2048
    """Images per shard file: the unit of resumption, of parallel writing and of the
    memory ``iter_batches`` needs (spatial caches: keep shard_size x tokens x d small)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ..."""
    store_dtype: str = "float32"
    """``float32`` or ``float16`` (halves the cache; values are read back as float32)."""
    worker_index: int = 0
    """This worker's index among ``worker_count``; it writes shards i, i + n, ..."""
    worker_count: int = 1
    """Independent workers writing disjoint shards of one cache."""
    max_image_pixels: int | None = None
    """Decompression-bomb limit; None: $CLIPAUDIT_MAX_IMAGE_PIXELS or Pillow's default."""
    engine: str = "local"
    """``local`` (worker processes on this machine) or ``ray`` (Ray Data: a local Ray or a
    cluster). Both write the same cache; a cache started with one can be finished with
    the other."""
    ray: RayConfig = RayConfig()
    """How the ``ray`` engine uses Ray."""

    def validate(self) -> None:
        if self.batch_size <= 0 or self.shard_size <= 0 or self.num_workers < 0:
            raise InputError(f"batch size ({self.batch_size}) and shard size "
                             f"({self.shard_size}) must be positive, workers "
                             f"({self.num_workers}) >= 0")
        if self.store_dtype not in STORE_DTYPES:
            raise InputError(f"store dtype {self.store_dtype!r} is not one of "
                             f"{', '.join(STORE_DTYPES)}")
        if not 0 <= self.worker_index < self.worker_count:
            raise InputError(f"worker index {self.worker_index} is out of range for "
                             f"{self.worker_count} workers (valid: 0..{self.worker_count - 1})")
        self.ray.validate()


@dataclass(frozen=True)
class ExtractResult:
    """What one ``extract`` run did. Counts cover this worker's shards."""

    dpath: Path
    n_planned: int
    """Items in the whole cache."""
    n_ok: int
    n_skipped: int
    skipped_reasons: dict[str, int]
    """Reason category (``truncated``, ``not an image``, ...) -> number of files skipped."""
    n_shards: int
    shards_written: int
    """Shards this run computed."""
    shards_resumed: int
    """Shards of this worker already present from an earlier run (not recomputed)."""
    complete: bool
    """True when every shard exists and the index is written."""
    cache: ActivationCache | None
    """The finished cache (None while other workers' shards are missing)."""


@one_writer_per_worker_slot
def extract(source: ImageSource | str | Path, out_dpath: str | Path,
            config: ExtractConfig = ExtractConfig(), *, reporter: Reporter = NULL_REPORTER,
            backbone: Backbone | None = None) -> ExtractResult:
    """Extract (or resume) the activation cache of ``source`` into ``out_dpath``.

    Refuses (``MismatchError``) a folder that holds a cache of another model, hook
    point, preprocessing, data set or layout, naming both values. A ``backbone``
    given here is used on its own device unless ``config.device`` names one.
    """
    config.validate()
    engine = get_engine(config.engine)  # before any work: an unknown or uninstalled engine
    dpath = Path(out_dpath)
    if not isinstance(source, ImageSource):
        source = load_image_source(source)
    if backbone is None:
        # The ray engine's actors run the model; this process only needs its description.
        here = config.device if config.engine == "local" else "cpu"
        backbone = load_backbone(config.backbone, resolve_device(here), text=False)
    elif config.engine == "local" and config.device != "auto":
        backbone.to(resolve_device(config.device))
    tower = make_tower(backbone.model)
    provenance = {"backbone": backbone.provenance, "hook": tower.hook_dict(config.hook),
                  "data_sha256": source.source_sha256,
                  "preprocess": backbone.provenance.get("preprocess")}
    layout = {"shard_size": config.shard_size, "store_dtype": config.store_dtype,
              "max_image_pixels": config.max_image_pixels}
    manifest = _prepare(dpath, source, config, provenance, layout, tower, backbone)
    n_shards = manifest["n_shards"]
    mine = list(range(config.worker_index, n_shards, config.worker_count))
    pending = [k for k in mine if not shard_fpath(dpath, k).is_file()]
    _remove_stale_tmp(dpath, pending)
    if pending:
        writer = ShardWriter(dpath, provenance, config, len(source.items),
                             acts_tail(tower, config.hook, backbone), backbone.embed_dim)
        batches = plan_batches(len(source.items), pending, config.shard_size, config.batch_size)
        engine(EncodeJob(source.items, batches, config, backbone, tower, writer), reporter)
        assert not writer.open_shards, f"shards left unwritten: {writer.open_shards}"
    counts = Counter(_shard_statuses(dpath, mine))
    complete = all(shard_fpath(dpath, k).is_file() for k in range(n_shards))
    if complete and not manifest.get("complete"):
        _finalize(dpath, manifest, reporter)
    n_ok = counts.pop("ok", 0)
    return ExtractResult(
        dpath=dpath, n_planned=manifest["n_planned"], n_ok=n_ok,
        n_skipped=sum(counts.values()), skipped_reasons=dict(sorted(counts.items())),
        n_shards=n_shards, shards_written=len(pending), shards_resumed=len(mine) - len(pending),
        complete=complete, cache=open_cache(dpath) if complete else None,
    )


# ---------------------------------------------------------------- setup


def _describe(key: str, value: Any) -> str:
    if key == "hook":
        return describe_hook(value)
    if key == "backbone":
        return str(value.get("id"))
    return repr(value)


def _check_same(dpath: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    labels = {"backbone": "model", "hook": "hook point", "preprocess": "preprocessing",
              "data_sha256": "data set (hash of paths, labels, metadata)",
              "shard_size": "shard size", "store_dtype": "store dtype",
              "max_image_pixels": "image pixel limit"}
    for key, what in labels.items():
        before, now = old.get(key), new.get(key)
        if key == "backbone":
            before, now = (before or {}).get("id"), (now or {}).get("id")
        if before != now:
            raise MismatchError(
                f"{dpath}: holds a cache of {what} {_describe(key, old.get(key))}; this run "
                f"asks for {_describe(key, new.get(key))}. Extract into another --out folder, "
                "or rerun with the cache's options")


def _prepare(dpath: Path, source: ImageSource, config: ExtractConfig, provenance: dict,
             layout: dict, tower: Tower, backbone: Backbone) -> dict[str, Any]:
    """Check an existing cache matches this run, or start a new one; return its manifest."""
    manifest_fpath = dpath / "manifest.json"
    if manifest_fpath.is_file():
        manifest = read_json(manifest_fpath, "activation-cache")
        _check_same(dpath, {**manifest["provenance"], **manifest["layout"]},
                    {**provenance, **layout})
        return manifest
    if dpath.exists() and not dpath.is_dir():
        raise InputError(f"{dpath}: exists and is not a folder")
    if dpath.is_dir() and any(not p.name.startswith(".") and p.name not in _CACHE_FILES
                              for p in dpath.iterdir()):
        raise InputError(f"{dpath}: folder is not empty and holds no clipaudit cache; "
                         "extract into a new or empty folder")
    n = len(source.items)
    try:
        write_parquet(dpath / "plan.parquet", "cache-plan", source.items, provenance=provenance)
    except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowTypeError subclass these
        raise InputError(f"{source.root}: a metadata column cannot be stored in Parquet "
                         f"({str(e)[:200]})") from None
    tail = acts_tail(tower, config.hook, backbone)
    # What ran is the provenance (model, hook point, data, preprocessing) and the layout;
    # nothing here repeats them, so no two fields can disagree.
    payload = {
        "layout": layout, "n_planned": n, "n_shards": -(-n // config.shard_size),
        "d": tail[-1], "embed_dim": backbone.embed_dim, "token": config.hook.token,
        "n_tokens": tail[0] if len(tail) == 2 else None, "tower": tower.family,
        "source": {"root": str(source.root), "n_items": n}, "complete": False,
        "engine": config.engine,  # the run that started the cache: recorded, not compared
    }
    write_json(manifest_fpath, "activation-cache", payload, provenance=provenance)
    return read_json(manifest_fpath, "activation-cache")


def _remove_stale_tmp(dpath: Path, pending: list[int]) -> None:
    # A kill -9 during a shard write leaves its temporary file behind; only this
    # worker's pending shards are touched, so other workers' writes are safe.
    for k in pending:
        final = shard_fpath(dpath, k)
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class EncodedBatch:
    """One computed batch of a shard: what an engine hands to ``ShardWriter.add``."""

    shard: int
    n_rows: int
    """Planned rows the batch covers (decoded or skipped)."""
    ids: torch.Tensor
    """int64 [b]: ids of the decoded rows, in order."""
    acts: torch.Tensor | None
    """[b, d] or [b, t, d] in the store dtype, on the CPU (None when b = 0)."""
    embeds: torch.Tensor | None
    """[b, D] in the store dtype, on the CPU (None when b = 0)."""
    skipped: list[tuple[int, str]]
    """(id, reason) of the rows that could not be used."""
    sha256: dict[int, str]
    """Content hash of every row whose bytes could be read."""


class _ShardBuffer:
    """Rows of one shard as they come in, written as one file when the shard is done."""

    def __init__(self, k: int, first_id: int, n_planned: int):
        self.k, self.first_id, self.n_planned = k, first_id, n_planned
        self.acts: list[torch.Tensor] = []
        self.embeds: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.status: list[str] = ["ok"] * n_planned
        self.reason: list[str | None] = [None] * n_planned
        self.sha256: list[str | None] = [None] * n_planned
        self.n_seen = 0

    def write(self, dpath: Path, provenance: dict, config: ExtractConfig) -> None:
        assert self.n_seen == self.n_planned, (self.k, self.n_seen, self.n_planned)
        ids = torch.cat(self.ids) if self.ids else torch.empty(0, dtype=torch.int64)
        tensors = {"acts": torch.cat(self.acts), "embeds": torch.cat(self.embeds), "ids": ids}
        meta = {"shard": self.k, "first_id": self.first_id, "n_planned": self.n_planned,
                "n_ok": int(ids.numel()), "status": self.status, "reason": self.reason,
                "sha256": self.sha256, "batch_size": config.batch_size,
                "written_by": {"worker_index": config.worker_index,
                               "worker_count": config.worker_count}}
        save_tensors(shard_fpath(dpath, self.k), "cache-shard", tensors, meta, provenance)


class ShardWriter:
    """Collects the batches of the pending shards, in any order, and writes each shard
    (atomically) as soon as all its rows are in. Every engine writes through it."""

    def __init__(self, dpath: Path, provenance: dict, config: ExtractConfig, n_items: int,
                 acts_tail: tuple[int, ...], embed_dim: int):
        self.dpath, self.provenance, self.config, self.n_items = dpath, provenance, config, n_items
        self.acts_tail, self.embed_dim = acts_tail, embed_dim
        self.dtype = STORE_DTYPES[config.store_dtype]
        self._buffers: dict[int, _ShardBuffer] = {}
        self.n_skipped = 0

    def add(self, batch: EncodedBatch) -> None:
        size = self.config.shard_size
        k = batch.shard
        buf = self._buffers.setdefault(
            k, _ShardBuffer(k, k * size, min(size, self.n_items - k * size)))
        if batch.ids.numel():
            assert batch.acts is not None and batch.embeds is not None
            buf.acts.append(batch.acts)
            buf.embeds.append(batch.embeds)
            buf.ids.append(batch.ids)
        elif not buf.acts:  # keep the tensor shapes of an all-skipped batch
            buf.acts.append(torch.empty(0, *self.acts_tail, dtype=self.dtype))
            buf.embeds.append(torch.empty(0, self.embed_dim, dtype=self.dtype))
        for item_id, reason in batch.skipped:
            buf.status[item_id - buf.first_id] = "skipped"
            buf.reason[item_id - buf.first_id] = reason
        for item_id, digest in batch.sha256.items():
            buf.sha256[item_id - buf.first_id] = digest
        buf.n_seen += batch.n_rows
        self.n_skipped += len(batch.skipped)
        if buf.n_seen == buf.n_planned:
            self._buffers.pop(k).write(self.dpath, self.provenance, self.config)

    @property
    def open_shards(self) -> list[int]:
        """Shards with some but not all of their rows in (none once an engine is done)."""
        return sorted(self._buffers)


def plan_batches(n_items: int, shards: list[int], shard_size: int,
                 batch_size: int) -> list[list[int]]:
    """Row positions of the batches of ``shards``: fixed boundaries within each shard, so
    that every engine, batch size aside, computes a shard the same way."""
    return [list(range(s, min(s + batch_size, (k + 1) * shard_size, n_items)))
            for k in shards for s in range(k * shard_size, min((k + 1) * shard_size, n_items),
                                           batch_size)]


def acts_tail(tower: Tower, hook: HookPoint, backbone: Backbone) -> tuple[int, ...]:
    """Shape of one image's activations: (d,) for pooled and cls, (t, d) for spatial."""
    size = backbone.provenance.get("preprocess", {}).get("size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    return tower.acts_tail(hook, size)


# ---------------------------------------------------------------- completion


def _shard_statuses(dpath: Path, shards: list[int]) -> list[str]:
    """``ok`` or the reason category of every planned row of ``shards`` present on disk."""
    out = []
    for k in shards:
        fpath = shard_fpath(dpath, k)
        if fpath.is_file():
            meta = read_tensor_meta(fpath) or {}
            out += ["ok" if s == "ok" else reason_category(r or "unknown")
                    for s, r in zip(meta.get("status", []), meta.get("reason", []))]
    return out


def _finalize(dpath: Path, manifest: dict[str, Any], reporter: Reporter) -> None:
    """Write the index from the plan and the shards' headers, then mark the cache complete."""
    plan, _ = read_parquet(dpath / "plan.parquet", "cache-plan")
    status, reason, sha256 = [], [], []
    with reporter.task("index", total=manifest["n_shards"]) as task:
        for k in range(manifest["n_shards"]):
            meta = read_tensor_meta(shard_fpath(dpath, k)) or {}
            status += meta["status"]
            reason += meta["reason"]
            sha256 += meta["sha256"]
            task.advance()
    assert len(status) == len(plan), (len(status), len(plan))
    index = plan.assign(sha256=sha256, status=status, reason=reason)
    write_parquet(dpath / "index.parquet", "cache-index", index,
                  provenance=manifest["provenance"])
    counts = Counter(reason_category(r) for r in reason if r is not None)
    payload = {k: v for k, v in manifest.items() if k not in
               ("kind", "schema_version", "clipaudit_version", "created", "provenance")}
    payload.update(complete=True, n_ok=status.count("ok"), n_skipped=len(status) -
                   status.count("ok"), skipped_reasons=dict(sorted(counts.items())))
    write_json(dpath / "manifest.json", "activation-cache", payload,
               provenance=manifest["provenance"])
