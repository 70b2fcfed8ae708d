"""Images inside container files: WebDataset tar shards and Parquet files of image bytes.

Large image sets rarely come as folders: img2dataset writes WebDataset tar shards
(``00000.tar`` holding ``000000001.jpg``, ``000000001.json``, ``000000001.txt``, ...),
Hugging Face ``datasets`` stores Parquet files whose image column holds
``{"bytes": ..., "path": ...}`` structs. Both become an item table like a manifest's,
so both engines, the cache, thumbnails and ``explain`` read them the same way.

**How an item is named.** Its ``path`` is the container file followed by where the
image sits inside it, like a path into a folder:

- WebDataset: ``/data/shards/00000.tar/000000001.jpg`` (the tar member's name);
- Parquet: ``/data/train-00000-of-00004.parquet/image/17`` (image column, row number
  within that file).

Reading such a path (``read_member_bytes``) opens the container and returns the
member's bytes: a tar is scanned once per process for its members' offsets, a Parquet
row group is read once per process and kept while consecutive rows are read. The item
table's hash (the data hash in every artifact's provenance) covers these paths,
labels and metadata, as for manifests; the index's ``sha256`` is that of each image's
own bytes.

**WebDataset samples** are runs of consecutive members sharing a key (the member name
up to the first dot of its base name). Per sample: the first member with an image
extension is the image; ``.cls`` is the label; ``.txt`` the ``caption``; the top-level
keys of ``.json`` become metadata columns (nested values as JSON text; a key that
clashes with a column clipaudit sets is stored as ``json_<key>``; its ``label`` key is
the label when there is no ``.cls``). A sample without an image is kept and recorded
as skipped (``missing file``), so the index says what was lost.

**Parquet** files with an image column (binary, or a struct with a ``bytes`` field):
every other scalar column is metadata (list and struct columns are left out, and the
log says so); the label column's integers become class names where the file carries
Hugging Face ``ClassLabel`` names.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clipaudit.errors import InputError

log = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet", ".pq")
CONTAINER_SUFFIXES = TAR_SUFFIXES + PARQUET_SUFFIXES
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm",
                        "jp2", "avif")
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "png", "image_bytes")
_SET_BY_CLIPAUDIT = ("id", "path", "label", "sha256", "status", "reason", "caption")


# ---------------------------------------------------------------- naming the files


def expand_pattern(pattern: str) -> list[Path]:
    """Files named by a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}.tar``) and/or a
    glob (``data/train-*.parquet``), sorted; an InputError when the pattern names none."""
    names = _expand_braces(pattern)
    found: list[str] = []
    for name in names:
        if glob.has_magic(name):
            found += glob.glob(name)
        elif os.path.isfile(name):
            found.append(name)
        else:
            raise InputError(f"{name}: not found (from the pattern {pattern!r})")
    if not found:
        raise InputError(f"{pattern}: the pattern names no files")
    return sorted({Path(f).resolve() for f in found})


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out = []
        for i in range(int(lo), int(hi) + 1):
            out += _expand_braces(pattern[:match.start()] + str(i).zfill(width)
                                  + pattern[match.end():])
        return out
    match = _CHOICE.search(pattern)
    if match:
        out = []
        for choice in match.group(1).split(","):
            out += _expand_braces(pattern[:match.start()] + choice + pattern[match.end():])
        return out
    return [pattern]


def is_pattern(path: str) -> bool:
    return bool(_RANGE.search(path) or _CHOICE.search(path) or glob.has_magic(path))


def container_files(dpath: Path) -> tuple[list[Path], list[Path]]:
    """(tar files, Parquet files) under ``dpath`` (recursively, hidden folders left out)."""
    tars, parquets = [], []
    for fpath in sorted(dpath.rglob("*")):
        rel = fpath.relative_to(dpath)
        if any(part.startswith(".") for part in rel.parts) or not fpath.is_file():
            continue
        if fpath.suffix.lower() in TAR_SUFFIXES:
            tars.append(fpath.resolve())
        elif fpath.suffix.lower() in PARQUET_SUFFIXES:
            parquets.append(fpath.resolve())
    return tars, parquets


def check_one_split(fpaths: Sequence[Path], where: Path) -> None:
    """Refuse a folder of Hugging Face Parquet files of several splits (train-*, test-*)."""
    splits = sorted({m.group(1) for f in fpaths
                     if (m := re.match(r"(.+?)-\d{5}-of-\d{5}\.parquet$", f.name))})
    if len(splits) > 1:
        raise InputError(f"{where}: holds Parquet files of several splits ({', '.join(splits)}); "
                         f"name one, e.g. '{where}/**/{splits[0]}-*.parquet'")


def scan_containers(fpaths: Sequence[Path], named: str, label_column: str | None,
                    image_column: str | None) -> pd.DataFrame:
    """Item table of tar shards or Parquet files of images (all of one kind)."""
    tars = [f for f in fpaths if f.suffix.lower() in TAR_SUFFIXES]
    parquets = [f for f in fpaths if f.suffix.lower() in PARQUET_SUFFIXES]
    if len(tars) + len(parquets) != len(fpaths) or (tars and parquets):
        raise InputError(f"{named}: expected .tar shards or Parquet files of images, all of "
                         "one kind (name the ones to extract with a pattern: shards/*.tar)")
    if tars:
        return scan_webdataset(tars, label_column)
    check_one_split(parquets, Path(named))
    return scan_image_parquet(parquets, image_column, label_column)


# ---------------------------------------------------------------- WebDataset


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = name up to the first dot of the base name; the rest is the
    extension (``a/b.seg.png`` -> (``a/b``, ``seg.png``))."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def scan_webdataset(tar_fpaths: Sequence[Path], label_key: str | None = "label") -> pd.DataFrame:
    """Item table (``path``, ``label``, metadata columns) of the samples in ``tar_fpaths``."""
    records: list[dict[str, Any]] = []
    for tar_fpath in tar_fpaths:
        for key, members in _samples(tar_fpath):
            records.append(_sample_record(tar_fpath, key, members, label_key))
    if not records:
        raise InputError(f"{tar_fpaths[0].parent}: the tar shards hold no samples")
    paths = [r["path"] for r in records]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise InputError(f"{dup}: the same member appears twice in its tar shard")
    return _records_table(records)


Members = dict[str, tuple[str, "bytes | None"]]


def _samples(tar_fpath: Path) -> list[tuple[str, Members]]:
    """(key, {extension: (member name, bytes of a metadata member or None)}) per sample."""
    samples: list[tuple[str, Members]] = []
    try:
        with tarfile.open(tar_fpath, mode="r:") as tf:
            while True:
                try:
                    info = tf.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    log.warning("%s: stopped reading at a damaged member (%s); the samples "
                                "before it are used", tar_fpath, e)
                    break
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                small = ext.lower() in ("json", "txt", "cls") and info.size <= 1 << 20
                data = tf.extractfile(info).read() if small else None  # type: ignore[union-attr]
                samples[-1][1].setdefault(ext, (info.name, data))
    except (tarfile.ReadError, OSError) as e:
        raise InputError(f"{tar_fpath}: not a readable tar file ({e})") from None
    return samples


def _sample_record(tar_fpath: Path, key: str, members: Members,
                   label_key: str | None) -> dict[str, Any]:
    image_ext = next((e for e in members
                      if e.rsplit(".", 1)[-1].lower() in WDS_IMAGE_EXTENSIONS), None)
    name = members[image_ext][0] if image_ext else key
    record: dict[str, Any] = {"path": f"{tar_fpath}/{name}", "label": None}
    data = {ext: members[ext][1] for ext in ("txt", "json", "cls") if ext in members}
    if data.get("txt") is not None:
        record["caption"] = _text(data["txt"])
    meta = _json_object(data.get("json"), tar_fpath, key)
    for k, v in meta.items():
        column = f"json_{k}" if k in _SET_BY_CLIPAUDIT else k
        record[column] = v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)
    if data.get("cls") is not None:
        record["label"] = _text(data["cls"])
    elif label_key and label_key in meta and meta[label_key] is not None:
        record["label"] = str(meta[label_key])
    return record


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace").strip()


def _json_object(data: bytes | None, tar_fpath: Path, key: str) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: sample %s: unreadable .json member, ignored", tar_fpath, key)
        return {}
    return doc if isinstance(doc, dict) else {}


def _records_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    columns = list(dict.fromkeys(c for r in records for c in r))
    table = pd.DataFrame({c: [r.get(c) for r in records] for c in columns})
    for c in columns[2:]:  # a column of mixed types (3 and "3") is stored as text
        kinds = {type(v) for v in table[c] if v is not None and not (isinstance(v, float)
                                                                    and np.isnan(v))}
        if len(kinds) > 1 and not kinds <= {int, float}:
            table[c] = [None if v is None else str(v) for v in table[c]]
    return table


# ---------------------------------------------------------------- Parquet


def scan_image_parquet(fpaths: Sequence[Path], image_column: str | None,
                       label_column: str | None) -> pd.DataFrame:
    """Item table of Parquet files of image bytes (``path``, ``label``, metadata)."""
    import pyarrow.parquet as pq

    first = _parquet_schema(fpaths[0])
    column = image_column or find_image_column(first, fpaths[0])
    if column is None:
        raise InputError(f"{fpaths[0]}: no image column (binary, or a struct with a 'bytes' "
                         f"field) among {', '.join(first.names)}; name it with --image-column")
    frames = []
    for fpath in fpaths:
        schema = _parquet_schema(fpath)
        if column not in schema.names or not _is_image_type(schema.field(column).type):
            raise InputError(f"{fpath}: no image column {column!r} (binary, or a struct with a "
                             f"'bytes' field); columns: {', '.join(schema.names)}")
        scalar = [f.name for f in schema if f.name != column and _is_scalar(f.type)]
        left_out = [f.name for f in schema if f.name != column and f.name not in scalar]
        if left_out:
            log.info("%s: columns %s are not scalar and are not kept as metadata", fpath,
                     ", ".join(left_out))
        table = pq.read_table(fpath, columns=scalar).to_pandas()
        table.insert(0, "path", [f"{fpath}/{column}/{row}" for row in range(len(table))])
        frames.append(table)
    items = pd.concat(frames, ignore_index=True)
    has_label = label_column is not None and label_column in items.columns
    if label_column is not None and not has_label and label_column != "label":
        raise InputError(f"{fpaths[0]}: no label column {label_column!r} (columns: "
                         f"{', '.join(c for c in items.columns if c != 'path')})")
    names = _class_label_names(fpaths[0], label_column) if has_label else None
    labels = items.pop(label_column) if has_label else pd.Series([None] * len(items))
    items.insert(1, "label", [_label(v, names) for v in labels])
    clash = [c for c in items.columns[2:] if c in _SET_BY_CLIPAUDIT]
    return items.rename(columns={c: f"parquet_{c}" for c in clash})


def _parquet_schema(fpath: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(fpath)
    except Exception as e:  # pyarrow's error types vary by version
        raise InputError(f"{fpath}: not a readable Parquet file ({str(e)[:200]})") from None


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _is_scalar(t: Any) -> bool:
    import pyarrow as pa

    return not (pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or pa.types.is_dictionary(t) and _is_image_type(t.value_type))


def find_image_column(schema: Any, fpath: Path) -> str | None:
    """The image column of a Parquet schema: a usual name, else the only image-typed one."""
    typed = [f.name for f in schema if _is_image_type(f.type)]
    for name in IMAGE_COLUMN_NAMES:
        if name in typed:
            return name
    if len(typed) > 1:
        raise InputError(f"{fpath}: several columns could hold images ({', '.join(typed)}); "
                         "name one with --image-column")
    return typed[0] if typed else None


def is_image_parquet(fpath: Path, path_column: str) -> bool:
    """True for a Parquet file of image bytes, False for a manifest (it has ``path_column``
    and no image column)."""
    schema = _parquet_schema(fpath)
    if path_column in schema.names:
        return False
    return any(_is_image_type(f.type) for f in schema)


def _class_label_names(fpath: Path, column: str | None) -> list[str] | None:
    schema = _parquet_schema(fpath)
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None or column is None:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _label(value: Any, names: list[str] | None) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if names is not None and isinstance(value, (int, np.integer)) and 0 <= value < len(names):
        return names[int(value)]
    return str(value)


# ---------------------------------------------------------------- reading members


def split_member_path(path: str | Path) -> tuple[Path, str] | None:
    """(container file, where inside) when ``path`` points into a tar or Parquet file."""
    text = str(path)
    for match in re.finditer(r"\.(tar|parquet|pq)/", text, flags=re.IGNORECASE):
        container = Path(text[:match.end() - 1])
        if container.is_file():
            return container, text[match.end():]
    return None


def read_member_bytes(path: str | Path) -> bytes:
    """The bytes of the image ``path`` names inside a container.

    Raises ``FileNotFoundError`` (with the reason) when the container has no such member,
    and ``ValueError`` when ``path`` does not point into a container."""
    where = split_member_path(path)
    if where is None:
        raise ValueError(f"{path}: not inside a tar or Parquet file")
    container, inner = where
    if container.suffix.lower() in TAR_SUFFIXES:
        return _read_tar_member(container, inner)
    return _read_parquet_cell(container, inner)


def _stamp(fpath: Path) -> tuple[str, int, int]:
    st = fpath.stat()
    return str(fpath), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _tar_offsets(stamp: tuple[str, int, int]) -> dict[str, tuple[int, int]]:
    offsets: dict[str, tuple[int, int]] = {}
    with tarfile.open(stamp[0], mode="r:") as tf:
        while True:
            try:
                info = tf.next()
            except (tarfile.ReadError, EOFError, OSError):
                break
            if info is None:
                break
            if info.isfile():
                offsets.setdefault(info.name, (info.offset_data, info.size))
    return offsets


def _read_tar_member(tar_fpath: Path, name: str) -> bytes:
    offsets = _tar_offsets(_stamp(tar_fpath))
    if name not in offsets:
        raise FileNotFoundError(f"no image member {name!r} in {tar_fpath.name}")
    offset, size = offsets[name]
    with open(tar_fpath, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise EOFError(f"truncated: {len(data)} of {size} bytes in {tar_fpath.name}")
    return data


class _RowGroups:
    """The last row groups read, per process: consecutive rows share one read."""

    def __init__(self, keep: int = 2):
        self.keep, self.lock = keep, threading.Lock()
        self.groups: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, fpath: Path, column: str, row: int) -> Any:
        import pyarrow.parquet as pq

        stamp = _stamp(fpath)
        meta = _parquet_meta(stamp)
        starts = meta["starts"]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        if row < 0 or row >= meta["n_rows"]:
            raise FileNotFoundError(f"no row {row} in {fpath.name} ({meta['n_rows']} rows)")
        key = (stamp, column, group)
        with self.lock:
            if key not in self.groups:
                table = pq.ParquetFile(fpath).read_row_group(group, columns=[column])
                self.groups[key] = table.column(column).combine_chunks()
                while len(self.groups) > self.keep:
                    self.groups.popitem(last=False)
            values = self.groups[key]
        return values[row - starts[group]].as_py()


@functools.lru_cache(maxsize=256)
def _parquet_meta(stamp: tuple[str, int, int]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(stamp[0]).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return {"starts": np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(np.int64)
            if sizes else np.zeros(0, np.int64), "n_rows": int(sum(sizes))}


_ROW_GROUPS = _RowGroups()


def _read_parquet_cell(fpath: Path, inner: str) -> bytes:
    column, _, row = inner.rpartition("/")
    if not column or not row.isdigit():
        raise FileNotFoundError(f"{inner!r} is not <image column>/<row> inside {fpath.name}")
    try:
        value = _ROW_GROUPS.get(fpath, column, int(row))
    except FileNotFoundError:
        raise
    except Exception as e:  # pyarrow: an unknown column, a damaged row group, ...
        raise FileNotFoundError(f"cannot read {column!r} row {row} of {fpath.name} "
                                f"({str(e)[:120]})") from None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise FileNotFoundError(f"row {row} of {fpath.name} holds no image bytes"
                                    + (f" (only a path: {value.get('path')})"
                                       if value.get("path") else ""))
        return bytes(data)
    if value is None:
        raise FileNotFoundError(f"row {row} of {fpath.name} holds no image bytes")
    return bytes(value)

