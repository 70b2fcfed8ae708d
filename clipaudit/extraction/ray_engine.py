"""The ``ray`` extraction engine: Ray Data tasks decode, a pool of actors runs the model.

One Ray Data dataset per run, streamed:

1. **jobs** (``from_items``): one row per batch of the plan (``plan_batches``: fixed
   boundaries inside each shard, the same batches as the local engine), carrying the
   batch's item ids and paths;
2. **decode** (``map_batches`` with a function: Ray tasks, one CPU each): read, decode
   and preprocess the batch's images with the local engine's decoder (bad files are
   recorded with their reason, never dropped), padded to ``batch_size`` rows;
3. **encode** (``map_batches`` with a callable class: a fixed pool of actors, each
   loading the model once; ``num_gpus=1`` per actor when the cluster has GPUs): the
   activations at the hook point and the image embeddings;
4. **write** (this process): each result goes to the cache's ``ShardWriter``, which
   writes a shard atomically as soon as all its batches are in. Results arrive in job
   order (``preserve_order``), so at most one shard is open at a time and a killed run
   resumes from its last finished shard, exactly like the local engine.

Only this process touches the cache folder: workers need to read the images (a shared
file system, or the same paths on every node), never the output folder.

Why not ``ray.data.read_images`` / ``read_parquet``: they decode with their own code
and drop or fail on unreadable files, and give rows no stable id. Here the cache's plan
is the one list of items for both engines, so ids, skip reasons and content hashes are
the same whichever engine wrote a shard (WebDataset and Parquet inputs are read through
the same plan: see ``clipaudit.extraction.containers``).

Ray: a local Ray (``ray.init(address="local")``, sized for this machine, stopped after
the run) unless ``RayConfig.address`` or ``$RAY_ADDRESS`` names a cluster; an already
initialised Ray in this process is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from clipaudit.errors import ClipAuditError, InputError, MismatchError
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.cache import STORE_DTYPES, EncodedBatch
from clipaudit.extraction.data import _collate, _DecodeDataset, max_image_pixels
from clipaudit.extraction.engines import EncodeJob, RayConfig, run_tower
from clipaudit.extraction.hooks import HookPoint, make_tower
from clipaudit.progress import Reporter

log = logging.getLogger(__name__)

__all__ = ["encode_ray"]


def encode_ray(job: EncodeJob, reporter: Reporter) -> None:
    """Compute ``job.batches`` on Ray and hand each result to ``job.writer``."""
    config, rc = job.config, job.config.ray
    started = _connect(rc, config.num_workers, config.device)
    try:
        use_gpu, n_actors = _actor_layout(rc, config.device)
        threads = _threads(rc, n_actors, use_gpu)
        with _data_context(), reporter.task("extract", total=sum(map(len, job.batches))) as task:
            for batch in _stream(_pipeline(job, use_gpu, n_actors, threads)):
                job.writer.add(batch)
                task.advance(batch.n_rows, skipped=job.writer.n_skipped)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- cluster


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _connect(rc: RayConfig, num_workers: int, device: str) -> bool:
    """Connect to the cluster or start a local Ray; True when this run must shut it down."""
    if ray.is_initialized():
        return False
    address = rc.address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                              "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **common)
            return True
        # A local Ray sized like the local engine: the model actors' reservations plus one
        # CPU per decoding worker, whatever the machine (logical CPUs are only tokens).
        n_gpus = torch.cuda.device_count() if device != "cpu" else 0
        n_actors = rc.actors or max(1, n_gpus)
        ray_log = logging.getLogger("ray")
        level = ray_log.level
        ray_log.setLevel(logging.ERROR)  # Ray's notes on its own set-up: not for our users
        try:
            ray.init(address="local", num_cpus=int(np.ceil(n_actors * rc.cpus_per_actor))
                     + max(1, num_workers), num_gpus=n_gpus,
                     object_store_memory=rc.object_store_mb * 1024 * 1024,
                     include_dashboard=False, **common)
        finally:
            ray_log.setLevel(level)
    except ConnectionError as e:
        raise InputError(f"cannot connect to the Ray cluster at {address!r} ({e}); check "
                         "--ray-address or $RAY_ADDRESS") from None
    return True


def _actor_layout(rc: RayConfig, device: str) -> tuple[bool, int]:
    """(GPU actors?, how many)."""
    n_gpus = int(ray.cluster_resources().get("GPU", 0))
    wants_gpu = device.startswith("cuda")
    if wants_gpu and n_gpus == 0:
        raise InputError(f"device {device!r} asked for, but the Ray cluster has no GPU")
    use_gpu = n_gpus > 0 and device != "cpu"
    n_actors = rc.actors or (n_gpus if use_gpu else 1)
    if use_gpu and n_actors > n_gpus:
        raise InputError(f"{n_actors} GPU actors asked for, but the Ray cluster has {n_gpus} "
                         "GPU(s)")
    return use_gpu, n_actors


def _threads(rc: RayConfig, n_actors: int, use_gpu: bool) -> int | None:
    """torch threads of a CPU actor: the cores shared out in a local Ray (whoever started
    it in this process), the CPUs an actor reserves on a cluster."""
    if use_gpu:
        return None
    if rc.threads_per_actor is not None:
        return rc.threads_per_actor
    if not (rc.address or os.environ.get("RAY_ADDRESS")):
        return max(1, _local_cpus() // n_actors)
    return max(1, int(rc.cpus_per_actor))


# ---------------------------------------------------------------- pipeline


def _pipeline(job: EncodeJob, use_gpu: bool, n_actors: int, threads: int | None) -> Any:
    config = job.config
    ids = job.items["id"].to_numpy(dtype=np.int64)
    paths = job.items["path"].astype(str).to_numpy()
    jobs = [{"shard": rows[0] // config.shard_size, "n_rows": len(rows),
             "ids": ids[rows].tolist(), "paths": paths[rows].tolist()} for rows in job.batches]
    image_shape = tuple(job.backbone.preprocess(Image.new("RGB", (32, 32))).shape)
    limit = max_image_pixels() if config.max_image_pixels is None else config.max_image_pixels
    dataset: Any = ray.data.from_items(jobs, override_num_blocks=min(len(jobs), 4096))
    # The memory a decoded batch takes (pixels, twice: decoded and padded), reserved per
    # task; unlike the actors' resources, which also keeps Ray from fusing decoding into
    # the model actors (it fuses stages whose resource requests are the same).
    batch_bytes = 2 * 4 * config.batch_size * int(np.prod(image_shape))
    dataset = dataset.map_batches(
        _decode_jobs, batch_size=1, num_cpus=1, memory=batch_bytes,
        fn_kwargs={"preprocess": job.backbone.preprocess, "max_pixels": limit,
                   "batch_size": config.batch_size, "image_shape": image_shape})
    return dataset.map_batches(
        _Encoder, batch_size=1, concurrency=n_actors, num_gpus=1 if use_gpu else 0,
        num_cpus=job.config.ray.cpus_per_actor,
        fn_constructor_kwargs={
            "spec": config.backbone, "hook": config.hook, "backbone_id": job.backbone.id,
            "device": ("cuda" if use_gpu else "cpu"), "store_dtype": config.store_dtype,
            "batch_size": config.batch_size, "threads": threads,
            "acts_tail": job.writer.acts_tail})


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for this run (a dataset keeps the context it was built in)."""
    ctx = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    detectors = getattr(ctx, "issue_detectors_config", None)  # Ray >= 2.50
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, data_log.level,
             detectors.detectors if detectors is not None else None)
    ctx.execution_options.preserve_order = True  # shards complete one after the other
    # The caller's reporter shows progress: no Ray progress bars, no log lines about them,
    # no advice on Ray's own settings on stderr (errors still come as exceptions).
    ctx.enable_progress_bars = False
    data_log.setLevel(logging.ERROR)
    if detectors is not None:
        detectors.detectors = []
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved[:2]
        data_log.setLevel(saved[2])
        if detectors is not None:
            detectors.detectors = saved[3]


def _stream(dataset: Any) -> Iterator[EncodedBatch]:
    """The encoded batches in job order, as ``EncodedBatch``es; a ClipAuditError raised in
    a task or an actor comes out as itself."""
    try:
        for row in dataset.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            yield _encoded_batch(row)
    except Exception as e:
        cause = _user_error(e)
        if cause is not None:
            raise cause from None
        raise


def _user_error(e: BaseException) -> ClipAuditError | None:
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, ClipAuditError):
            return cur
        stack += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    return None


def _encoded_batch(row: dict[str, np.ndarray]) -> EncodedBatch:
    n_ok = int(row["n_ok"][0])
    ids = torch.from_numpy(row["ids"][0][:n_ok].copy())
    acts = embeds = None
    if n_ok:  # copies: Ray's arrays are read-only views of its object store
        acts = torch.from_numpy(row["acts"][0][:n_ok].copy())
        embeds = torch.from_numpy(row["embeds"][0][:n_ok].copy())
    skipped = [(int(i), str(r)) for i, r in json.loads(str(row["skipped"][0]))]
    sha256 = {int(i): str(d) for i, d in json.loads(str(row["sha256"][0]))}
    return EncodedBatch(shard=int(row["shard"][0]), n_rows=int(row["n_rows"][0]), ids=ids,
                        acts=acts, embeds=embeds, skipped=skipped, sha256=sha256)


# ---------------------------------------------------------------- remote code


def _decode_jobs(batch: dict[str, np.ndarray], *, preprocess: Any, max_pixels: int,
                 batch_size: int, image_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Ray task: decode the one job of ``batch`` into pixels padded to ``batch_size`` rows."""
    ids, paths = [int(i) for i in batch["ids"][0]], [str(p) for p in batch["paths"][0]]
    dataset = _DecodeDataset(ids, paths, preprocess, max_pixels)
    decoded = _collate([dataset[i] for i in range(len(ids))])
    n_ok = int(decoded.ids.numel())
    pixels = np.zeros((1, batch_size, *image_shape), dtype=np.float32)
    padded_ids = np.full((1, batch_size), -1, dtype=np.int64)
    if n_ok:
        pixels[0, :n_ok] = decoded.images.numpy()
        padded_ids[0, :n_ok] = decoded.ids.numpy()
    return {"shard": batch["shard"], "n_rows": batch["n_rows"],
            "n_ok": np.array([n_ok], dtype=np.int64), "ids": padded_ids, "pixels": pixels,
            "skipped": np.array([json.dumps(decoded.skipped)], dtype=object),
            "sha256": np.array([json.dumps(sorted(decoded.sha256.items()))], dtype=object)}


class _Encoder:
    """Ray actor: loads the model once, then encodes one decoded job per call."""

    def __init__(self, spec: BackboneSpec, hook: HookPoint, backbone_id: str, device: str,
                 store_dtype: str, batch_size: int, threads: int | None,
                 acts_tail: tuple[int, ...]):
        if threads is not None:
            torch.set_num_threads(threads)
        backbone = load_backbone(spec, device, text=False)
        if backbone.id != backbone_id:
            raise MismatchError(f"the ray engine's actors load the model from its spec, which "
                                f"gives {backbone.id!r}, not the {backbone_id!r} given to "
                                "extract; pass the model as a BackboneSpec")
        self.tower, self.hook, self.device = make_tower(backbone.model), hook, backbone.device
        self.dtype, self.batch_size = STORE_DTYPES[store_dtype], batch_size
        self.acts_tail, self.embed_dim = tuple(acts_tail), backbone.embed_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_ok = int(batch["n_ok"][0])
        pixels = torch.from_numpy(batch["pixels"][0][:n_ok].copy()).to(self.device)
        acts: torch.Tensor | None = None
        embeds: torch.Tensor | None = None
        if n_ok:
            acts, embeds = run_tower(self.tower, pixels, self.hook, self.dtype, self.batch_size)
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        out_acts = _padded(acts, (self.batch_size, *self.acts_tail), np_dtype)
        out_embeds = _padded(embeds, (self.batch_size, self.embed_dim), np_dtype)
        return {"shard": batch["shard"], "n_rows": batch["n_rows"], "n_ok": batch["n_ok"],
                "ids": batch["ids"], "acts": out_acts, "embeds": out_embeds,
                "skipped": batch["skipped"], "sha256": batch["sha256"]}


def _padded(values: torch.Tensor | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """[1, *shape]: ``values`` in the first rows, then zeros (fixed shapes keep Ray's tensor
    columns plain)."""
    out = np.zeros((1, *shape), dtype=dtype)
    if values is not None:
        out[0, : values.shape[0]] = values.numpy()
    return out
