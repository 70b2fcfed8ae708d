"""Reading an activation cache: ``open_cache`` and ``ActivationCache``.

Shards are memory-mapped (safetensors stores each tensor as one contiguous
little-endian block after a JSON header), so streaming and shuffled batches read
only the rows they need: memory stays bounded by a batch plus the page cache, not
by the data set. See ``clipaudit.extraction.cache`` for the layout.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clipaudit.artifacts import check_header, read_json, read_parquet
from clipaudit.errors import ArtifactError

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
FIELDS = ("acts", "embeds", "ids")


def shard_fpath(dpath: Path | str, k: int) -> Path:
    return Path(dpath) / "shards" / f"shard-{k:05d}.safetensors"


def _map_safetensors(fpath: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read-only memory maps of a safetensors file's tensors, and its clipaudit header."""
    try:
        with open(fpath, "rb") as f:
            (n_header,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n_header))
    except (OSError, struct.error, ValueError) as e:
        raise ArtifactError(f"{fpath}: not a readable safetensors file ({e})") from None
    meta = json.loads(header.pop("__metadata__", {}).get("clipaudit", "null") or "null")
    if meta is None:
        raise ArtifactError(f"{fpath}: safetensors file without a clipaudit header")
    arrays = {}
    for name, info in header.items():
        dtype, shape = _NP_DTYPES[info["dtype"]], tuple(info["shape"])
        start, stop = info["data_offsets"]
        if start == stop:
            arrays[name] = np.empty(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(fpath, dtype=dtype, mode="r", offset=8 + n_header + start,
                                     shape=shape)
    return arrays, meta


LEAN_SKIPPED_COLUMNS = ("path", "sha256", "reason", "caption")
"""Index columns a lean cache leaves on disk: per-item strings that only a few items'
reports need (``index_rows`` reads them for those items)."""


def open_cache(dpath: Path | str, *, lean: bool = False) -> ActivationCache:
    """Open a finished activation cache (``clipaudit extract`` output).

    ``lean``: read only the index columns an audit uses (``LEAN_SKIPPED_COLUMNS`` stay
    on disk) and string columns as categoricals, so the index of a million items costs
    tens of MB, not hundreds."""
    dpath = Path(dpath)
    manifest = read_json(dpath / "manifest.json", "activation-cache")
    if not manifest.get("complete"):
        present = sum(shard_fpath(dpath, k).is_file() for k in range(manifest["n_shards"]))
        raise ArtifactError(f"{dpath}: the cache is incomplete ({present} of "
                            f"{manifest['n_shards']} shards written); rerun clipaudit extract "
                            "with the same options to finish it")
    if lean:
        index, _ = read_parquet(dpath / "index.parquet", "cache-index",
                                skip_columns=LEAN_SKIPPED_COLUMNS, strings_as_categories=True)
    else:
        index, _ = read_parquet(dpath / "index.parquet", "cache-index")
    return ActivationCache(dpath, manifest, index)


def index_rows(dpath: Path | str, ids: Sequence[int], columns: Sequence[str]) -> pd.DataFrame:
    """The index rows of items ``ids`` (columns ``id`` and those of ``columns`` present),
    read without loading the other rows."""
    import pyarrow.dataset as ds

    fpath = Path(dpath) / "index.parquet"
    dataset = ds.dataset(str(fpath), format="parquet")
    wanted = ["id", *(c for c in columns if c in dataset.schema.names and c != "id")]
    table = dataset.to_table(columns=wanted, filter=ds.field("id").isin(list(map(int, ids))))
    return table.to_pandas()


class ActivationCache:
    """An extracted cache; implements ``clipaudit.extraction.sources.ActivationSource``."""

    def __init__(self, dpath: Path, manifest: dict[str, Any], index: pd.DataFrame):
        self.dpath, self.manifest, self.index = Path(dpath), manifest, index
        self.ok_index = (index[index["status"] == "ok"].sort_values("id")
                         .reset_index(drop=True))
        shard_of = self.ok_index["id"].to_numpy() // manifest["layout"]["shard_size"]
        self._shard_n_ok = np.bincount(shard_of, minlength=manifest["n_shards"])
        self._shard_start = np.concatenate([[0], np.cumsum(self._shard_n_ok)])
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------ description

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest["provenance"]

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def token(self) -> str:
        return str(self.manifest["token"])

    @property
    def n_ok(self) -> int:
        return len(self.ok_index)

    @property
    def tokens_per_image(self) -> int:
        """1 for ``pooled`` and ``cls`` caches, the number of patch tokens for ``spatial`` ones."""
        return 1 if self.token != "spatial" else int(self.manifest["n_tokens"])

    @property
    def n_rows(self) -> int:
        return self.n_ok * self.tokens_per_image

    def __repr__(self) -> str:
        from clipaudit.extraction.hooks import describe_hook

        return (f"ActivationCache({str(self.dpath)!r}, model={self.provenance['backbone']['id']}, "
                f"hook={describe_hook(self.provenance['hook'])!r}, n_ok={self.n_ok}, d={self.d})")

    # ------------------------------------------------------------ shards

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._maps:
            fpath = shard_fpath(self.dpath, k)
            if not fpath.is_file():
                raise ArtifactError(f"{fpath}: shard missing from a cache marked complete")
            arrays, meta = _map_safetensors(fpath)
            check_header(meta, "cache-shard", fpath)
            expected = (int(self._shard_n_ok[k]), *self._acts_tail())
            if tuple(arrays["acts"].shape) != expected or "embeds" not in arrays:
                raise ArtifactError(f"{fpath}: holds acts of shape {arrays['acts'].shape}, "
                                    f"the index expects {expected}")
            got = meta.get("provenance", {}).get("backbone", {}).get("id")
            if got != self.provenance["backbone"]["id"]:
                raise ArtifactError(f"{fpath}: shard of model {got!r} in a cache of "
                                    f"{self.provenance['backbone']['id']!r}")
            self._maps[k] = arrays
        return self._maps[k]

    def _acts_tail(self) -> tuple[int, ...]:
        return (self.d,) if self.token != "spatial" else (self.tokens_per_image, self.d)

    def _load(self, name: str, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty((self.n_ok, *tail), dtype=dtype)
        for k in np.flatnonzero(self._shard_n_ok):
            start, stop = self._shard_start[k], self._shard_start[k + 1]
            out[start:stop] = torch.from_numpy(np.array(self._shard(int(k))[name]))
        return out

    def load_acts(self) -> torch.Tensor:
        """All activations, float32: [n_ok, d] (cls) or [n_ok, t, d] (spatial)."""
        return self._load("acts", self._acts_tail(), torch.float32)

    def load_embeds(self) -> torch.Tensor:
        """All image embeddings [n_ok, embed_dim], float32, exactly ``encode_image``."""
        return self._load("embeds", (self.embed_dim,), torch.float32)

    def take(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Values of ``name`` (``acts``, ``embeds``, ``ids``) at global rows ``rows`` (any
        order, cls caches), float32 (ids int64). Only the shards holding them are mapped,
        and they are unmapped again, so resident memory stays what was asked for."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        out = torch.empty((len(rows), *self._field_tail(name)),
                          dtype=torch.int64 if name == "ids" else torch.float32)
        if len(rows):
            out[torch.from_numpy(order)] = self._tensor(name, rows[order], release=True)
        return out

    def iter_shards(self, fields: Sequence[str] = ("acts",)) -> Iterator[dict[str, torch.Tensor]]:
        """Every row, shard by shard in row order (pooled and cls caches): float32 ``acts`` [n_k, d],
        ``embeds`` [n_k, D], int64 ``ids`` [n_k]. Each shard is unmapped once read, so
        resident memory stays about one shard however large the cache is."""
        if self.token == "spatial":
            raise ValueError("iter_shards reads pooled and cls caches; use iter_batches for spatial ones")
        for k in np.flatnonzero(self._shard_n_ok):
            arrays = self._shard(int(k))
            yield {f: torch.from_numpy(np.array(arrays[f])).to(
                torch.int64 if f == "ids" else torch.float32) for f in fields}
            del arrays
            self._maps.pop(int(k), None)

    def load_ids(self) -> torch.Tensor:
        """Item ids [n_ok] of the rows of ``load_acts`` (= ``ok_index.id``)."""
        return self._load("ids", (), torch.int64)

    # ------------------------------------------------------------ streaming

    def _rows(self, name: str, rows: np.ndarray, release: bool = False) -> np.ndarray:
        """Values of ``name`` at global row numbers ``rows`` (sorted ascending).
        ``release``: unmap each shard this call mapped as soon as its rows are copied, so
        that the pages read (and read ahead) count against resident memory one shard at a
        time: a sample of 20,000 rows spread over a million-row cache touched most of its
        pages, 600 MB of it resident until the last shard was read."""
        t = self.tokens_per_image
        images = rows // t if name != "acts" else rows
        starts = self._shard_start * (t if name == "acts" else 1)
        shard_of = np.searchsorted(starts, images, side="right") - 1
        mapped = set(self._maps)
        parts = []
        for k in np.unique(shard_of):
            arr = self._shard(int(k))[name]
            if name == "acts":
                arr = arr.reshape(-1, self.d)
            local = images[shard_of == k] - starts[k]
            if len(local) and local[-1] - local[0] + 1 == len(local):  # a contiguous run
                parts.append(np.array(arr[local[0]:local[-1] + 1]))
            else:
                parts.append(arr[local])
            del arr
            if release and int(k) not in mapped:
                self._maps.pop(int(k), None)
        return np.concatenate(parts)

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     fields: Sequence[str] = ("acts",), window_rows: int | None = None,
                     skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of rows (spatial tokens flattened into rows), float32 ``acts`` [b, d],
        ``embeds`` [b, D] (pooled and cls caches) and ``ids`` [b] (int64, the image of the row).

        ``shuffle``: a permutation of the rows drawn from ``seed`` (8 bytes per row); rows
        are gathered from memory-mapped shards, so memory is bounded by a batch. With
        ``window_rows`` below the number of rows, the permutation is local: shards in a
        random order, grouped into windows of at least ``window_rows`` rows, rows shuffled
        within each window; a batch then reads a few neighbouring shards instead of
        touching every shard of a large cache (which the page cache cannot hold).
        ``skip_batches``: start after that many batches of the same order (a resumed
        training run), without reading them."""
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; available: {', '.join(FIELDS)}")
        if "embeds" in fields and self.token == "spatial":
            raise ValueError("embeds are only available for pooled and cls activations")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        order = self._order(seed, window_rows) if shuffle else None
        for start in range(skip_batches * batch_size, self.n_rows, batch_size):
            stop = min(start + batch_size, self.n_rows)
            if order is None:
                yield {f: self._tensor(f, np.arange(start, stop)) for f in fields}
                continue
            rows = order[start:stop]
            sort = np.argsort(rows, kind="stable")
            batch = {}
            for f in fields:
                values = torch.empty((stop - start, *self._field_tail(f)),
                                     dtype=torch.int64 if f == "ids" else torch.float32)
                values[torch.from_numpy(sort)] = self._tensor(f, rows[sort])
                batch[f] = values
            yield batch

    def _order(self, seed: int, window_rows: int | None) -> np.ndarray:
        """A permutation of the rows: global, or local to windows of whole shards."""
        gen = torch.Generator().manual_seed(seed)
        if window_rows is None or window_rows >= self.n_rows:
            return torch.randperm(self.n_rows, generator=gen).numpy()
        t = self.tokens_per_image
        starts = self._shard_start * t
        shards = np.flatnonzero(self._shard_n_ok)
        parts: list[np.ndarray] = []
        window: list[np.ndarray] = []
        n_window = 0
        for k in shards[torch.randperm(len(shards), generator=gen).numpy()]:
            window.append(np.arange(starts[k], starts[k + 1]))
            n_window += len(window[-1])
            if n_window >= window_rows:
                rows = np.concatenate(window)
                parts.append(rows[torch.randperm(len(rows), generator=gen).numpy()])
                window, n_window = [], 0
        if window:
            rows = np.concatenate(window)
            parts.append(rows[torch.randperm(len(rows), generator=gen).numpy()])
        return np.concatenate(parts)

    def _field_tail(self, name: str) -> tuple[int, ...]:
        return {"acts": (self.d,), "embeds": (self.embed_dim,), "ids": ()}[name]

    def _tensor(self, name: str, rows: np.ndarray, release: bool = False) -> torch.Tensor:
        values = torch.from_numpy(np.ascontiguousarray(self._rows(name, rows, release)))
        return values if name == "ids" else values.float()
