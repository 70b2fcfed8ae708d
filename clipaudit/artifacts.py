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
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipaudit._version import __version__
from clipaudit.errors import ArtifactError, MismatchError

SCHEMA_VERSIONS: dict[str, int] = {
    "activation-cache": 1,
    "cache-shard": 1,
    "cache-index": 1,
    "cache-plan": 1,
    "sae": 1,
    "probe": 1,
    "prompt-set": 1,
    "attributions": 1,
    "audit": 2,
    "synthetic-dataset": 3,
    "tiny-clip": 2,
    "component-descriptions": 1,
    "column-roles": 1,
}

READABLE_OLDER_VERSIONS: dict[str, tuple[int, ...]] = {
    "synthetic-dataset": (1, 2),  # 1 had no artifact masks, 2 no mask filters; both still load
    "tiny-clip": (1,),  # 1 did not name the model and its world
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
    """Yield a temporary path beside ``fpath``; rename it into place on success."""
    fpath = Path(fpath)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{fpath.name}.", suffix=".tmp", dir=fpath.parent)
    os.close(fd)
    tmp_fpath = Path(tmp)
    try:
        yield tmp_fpath
        os.chmod(tmp_fpath, 0o666 & ~_UMASK)  # mkstemp makes 0600; files get the usual mode
        os.replace(tmp_fpath, fpath)
    finally:
        if tmp_fpath.exists():
            tmp_fpath.unlink()


def sha256_file(fpath: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(fpath, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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


def read_parquet(fpath: Path | str, kind: str) -> tuple[Any, dict[str, Any]]:
    """Return (pandas DataFrame, header)."""
    import pyarrow.parquet as pq

    fpath = Path(fpath)
    if not fpath.is_file():
        raise ArtifactError(f"{fpath}: file not found")
    try:
        table = pq.read_table(str(fpath))
    except Exception as e:  # pyarrow's error types vary by version
        raise ArtifactError(f"{fpath}: not a readable Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY.encode())
    if raw is None:
        raise ArtifactError(f"{fpath}: Parquet file without a clipaudit header")
    meta = json.loads(raw)
    check_header(meta, kind, fpath)
    return table.to_pandas(), meta
