"""Versioned, provenance-carrying files, written atomically and checked on load.

Every file clipaudit writes has a header ``{"kind", "schema_version",
"clipaudit_version", "created", "provenance", ...}``:

- JSON files hold it at the top level;
- safetensors files hold it (as JSON) in the ``"clipaudit"`` metadata entry;
- Parquet files hold it (as JSON) in the ``b"clipaudit"`` schema metadata.

Nothing is ever pickled. Writes go to a temporary file in the same folder and are
renamed into place, so a killed run never leaves a partial file that looks complete.
Bump a kind's entry in ``SCHEMA_VERSIONS`` on every format change.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipaudit._version import __version__
from clipaudit.errors import ArtifactError, ClipAuditError, MismatchError, OutputError

SCHEMA_VERSIONS: dict[str, int] = {
    "activation-cache": 2,  # 2: pooled hook point, tower family, no created_with
    "cache-shard": 1,
    "cache-index": 1,
    "cache-plan": 1,
    "sae": 2,  # 2: activation (topk | threshold), threshold tensor, per-row input_norm
    "sae-checkpoint": 1,
    "probe": 1,
    "prompt-set": 1,
    "attributions": 2,
    "audit": 4,
    "synthetic-dataset": 3,
    "tiny-clip": 2,
    "component-descriptions": 3,  # 3: semantic embeddings float16, top ids int32
    "column-roles": 1,
    "heatmaps": 1,
    "text-embeddings": 1,
}

READABLE_OLDER_VERSIONS: dict[str, tuple[int, ...]] = {
    "synthetic-dataset": (1, 2),  # 1 had no artifact masks, 2 no mask filters; both still load
    "tiny-clip": (1,),  # 1 did not name the model and its world
    "activation-cache": (1,),  # earlier caches (last block, cls) still open and audit
    "sae": (1,),  # TopK SAE files without the fields schema 2 added
    "audit": (2, 3),  # 2: no heatmaps, no intervals or permutation control (optional fields)
    "component-descriptions": (2,),  # 2: float32 semantic embeddings, int64 top ids
}
"""Older schema versions a kind's loader still reads (it handles what they lack)."""

_META_KEY = "clipaudit"
_UMASK = os.umask(0)
os.umask(_UMASK)


def make_header(kind: str, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The header every clipaudit file starts with."""
    if kind not in SCHEMA_VERSIONS:
        raise KeyError(f"unknown artifact kind {kind!r}")
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSIONS[kind],
        "clipaudit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": dict(provenance or {}),
    }


def check_header(meta: Mapping[str, Any], kind: str, fpath: Path | str) -> None:
    """Refuse a file of another kind or of a schema this version cannot read."""
    got_kind = meta.get("kind")
    if got_kind != kind:
        raise ArtifactError(f"{fpath}: expected a clipaudit '{kind}' file, found {got_kind!r}")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSIONS[kind] and version not in READABLE_OLDER_VERSIONS.get(kind, ()):
        raise ArtifactError(
            f"{fpath}: '{kind}' schema version {version!r} is not supported "
            f"(this clipaudit {__version__} reads version {SCHEMA_VERSIONS[kind]}); "
            "re-create the file with this version"
        )


def require_match(what: str, expected: Any, got: Any, fpath: Path | str) -> None:
    """Raise a MismatchError that names both values."""
    if expected != got:
        raise MismatchError(f"{fpath}: {what} mismatch: expected {expected!r}, file has {got!r}")


@contextlib.contextmanager
def atomic_path(fpath: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``fpath``; rename it into place on success.

    A write that fails for want of space or permission raises ``OutputError`` naming
    ``fpath`` (exit code 2), and the temporary file is removed."""
    fpath = Path(fpath)
    with output_error(fpath):
        fpath.parent.mkdir(parents=True, exist_ok=True)
        tmp_fpath = _make_tmp(fpath)
    try:
        with output_error(fpath):
            yield tmp_fpath
            os.chmod(tmp_fpath, 0o666 & ~_UMASK)  # writers that replace the file make it 0600
            os.replace(tmp_fpath, fpath)
    finally:
        if tmp_fpath.exists() or tmp_fpath.is_symlink():
            tmp_fpath.unlink()


def _make_tmp(fpath: Path) -> Path:
    """A new empty file beside ``fpath`` with the usual mode (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{fpath.name}.", suffix=".tmp", dir=fpath.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return Path(tmp)


_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]", re.IGNORECASE)
# Errors of the machine, not of clipaudit: the output cannot be written where asked.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                            errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
                            errno.EEXIST, errno.ENOTEMPTY, errno.ELOOP})


def write_errno(e: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or the one that a library's own
    error type quotes (safetensors: ``(os error 28)``; pyarrow: ``[errno 28]``)."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    match = _OS_ERROR_CODE.search(str(e))
    if match:
        return int(match.group(1) or match.group(2))
    return None


@contextlib.contextmanager
def output_error(path: Path | str) -> Iterator[None]:
    """Turn a failure to write ``path`` (disk full, read-only, permission, a file in
    the way) into an ``OutputError`` that names it; other errors pass unchanged."""
    try:
        yield
    except ClipAuditError:
        raise
    except Exception as e:
        code = write_errno(e)
        if code not in _OUTPUT_ERRNOS:
            raise
        raise OutputError(f"{path}: cannot write: {os.strerror(code)}") from e


def sha256_file(fpath: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def require_finite(tensors: Mapping[str, Any], fpath: Path | str, what: str) -> None:
    """Refuse weights holding NaN or infinite values, naming the file and the tensor: such
    a file would make every score NaN and every share meaningless, silently."""
    import torch

    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
                continue  # the common case, without a mask the size of the tensor
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise ArtifactError(f"{fpath}: {what} tensor '{name}' holds {bad} NaN or infinite "
                                    f"value(s) of {tensor.numel()}; refusing to use it "
                                    "(re-export or retrain it)")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_reason(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words for the user.

    torch's own message advises loading with ``weights_only=False``, which runs whatever
    code the file carries; clipaudit never repeats that advice."""
    text = _ANSI.sub("", str(e))
    if "weights only" in text.lower() or type(e).__name__ == "UnpicklingError":
        found = _PICKLED_GLOBAL.search(text)
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects"
        return (f"it holds {what}, and clipaudit loads tensors only: unpickling runs code "
                "from the file. Save only the tensors (a state_dict of tensors, ideally as "
                "safetensors) and use that file")
    if isinstance(e, EOFError) or "central directory" in text or "PytorchStreamReader" in text:
        return "the file is truncated or corrupt (not a complete torch file)"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
    if "weights_only" in first:
        return "torch cannot read it as plain tensors"
    return first


# ---------------------------------------------------------------- JSON


def write_json(fpath: Path | str, kind: str, payload: Mapping[str, Any],
               provenance: Mapping[str, Any] | None = None) -> Path:
    doc = {**make_header(kind, provenance), **payload}
    with atomic_path(fpath) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n")
    return Path(fpath)


def read_json(fpath: Path | str, kind: str) -> dict[str, Any]:
    fpath = Path(fpath)
    if not fpath.is_file():
        raise ArtifactError(f"{fpath}: file not found")
    try:
        doc = json.loads(fpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{fpath}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{fpath}: expected a JSON object")
    check_header(doc, kind, fpath)
    return doc


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorFile:
    """Tensors of a safetensors file and its clipaudit header."""

    tensors: dict[str, Any]
    meta: dict[str, Any]


def save_tensors(fpath: Path | str, kind: str, tensors: Mapping[str, Any],
                 meta: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> Path:
    """Write torch tensors with the header (plus ``meta``) in the safetensors metadata."""
    from safetensors.torch import save_file

    header = {**make_header(kind, provenance), **meta}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(fpath) as tmp:
        save_file(contiguous, str(tmp),
                  metadata={_META_KEY: json.dumps(header, default=_json_default)})
    return Path(fpath)


def read_tensor_meta(fpath: Path | str) -> dict[str, Any] | None:
    """The clipaudit header of a safetensors file, or None when it has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(fpath), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{fpath}: not a readable safetensors file ({e})") from None
    return json.loads(raw) if raw else None


def load_tensors(fpath: Path | str, kind: str, device: str = "cpu") -> TensorFile:
    from safetensors.torch import load_file

    fpath = Path(fpath)
    if not fpath.is_file():
        raise ArtifactError(f"{fpath}: file not found")
    meta = read_tensor_meta(fpath)
    if meta is None:
        raise ArtifactError(f"{fpath}: safetensors file without a clipaudit header")
    check_header(meta, kind, fpath)
    return TensorFile(tensors=load_file(str(fpath), device=device), meta=meta)


# ---------------------------------------------------------------- Parquet


def write_parquet(fpath: Path | str, kind: str, table: Any,
                  meta: Mapping[str, Any] | None = None,
                  provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a pandas DataFrame or pyarrow Table with the header in its schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    header = {**make_header(kind, provenance), **(meta or {})}
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata(
        {**existing, _META_KEY.encode(): json.dumps(header, default=_json_default).encode()}
    )
    with atomic_path(fpath) as tmp:
        pq.write_table(table, str(tmp))
    return Path(fpath)


def read_parquet(fpath: Path | str, kind: str, *, skip_columns: tuple[str, ...] = (),
                 strings_as_categories: bool = False) -> tuple[Any, dict[str, Any]]:
    """Return (pandas DataFrame, header). ``skip_columns`` are not read;
    ``strings_as_categories`` reads string columns dictionary-encoded (pandas categoricals)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fpath = Path(fpath)
    if not fpath.is_file():
        raise ArtifactError(f"{fpath}: file not found")
    try:
        columns = read_dictionary = None
        if skip_columns or strings_as_categories:
            schema = pq.read_schema(str(fpath))
            columns = [n for n in schema.names if n not in skip_columns]
            if strings_as_categories:
                read_dictionary = [f.name for f in schema if f.name in columns
                                   and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
        table = pq.read_table(str(fpath), columns=columns, read_dictionary=read_dictionary)
    except Exception as e:  # pyarrow's error types vary by version
        raise ArtifactError(f"{fpath}: not a readable Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY.encode())
    if raw is None:
        raise ArtifactError(f"{fpath}: Parquet file without a clipaudit header")
    meta = json.loads(raw)
    check_header(meta, kind, fpath)
    return table.to_pandas(), meta
