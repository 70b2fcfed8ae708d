"""Column roles a data set declares beside its manifest (``columns.yaml``).

A manifest's metadata columns mean different things: ``has_ruler`` marks an
acquisition artifact (a classifier must not rely on it), ``skin_tone`` a protected
attribute, ``caption`` free text that no check should read. A data set says which is
which in a small YAML file next to ``manifest.csv``, so no check has to guess from a
column's name::

    artifact: [has_ruler, has_band_aid]   # binary columns marking artifacts
    protected: [skin_tone]                # attributes a classifier must not use
    ignore: [caption]                     # not metadata for any check (text, ids)

Every key is optional; a column has at most one role; columns left out are plain
metadata (reported as evidence, checked by no role-based rule). Files clipaudit
writes also carry its usual header (``kind: column-roles``, ``schema_version``,
``clipaudit_version``, ``created``, ``provenance``); files written by hand need none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipaudit.artifacts import atomic_path, check_header, make_header
from clipaudit.errors import InputError

COLUMN_ROLES_NAME = "columns.yaml"
"""File name of the column roles, beside the manifest."""
ROLES = ("artifact", "protected", "ignore")
_HEADER_KEYS = ("kind", "schema_version", "clipaudit_version", "created", "provenance")
_KIND = "column-roles"


@dataclass(frozen=True)
class ColumnRoles:
    """Which manifest columns are artifacts, protected attributes or to be ignored."""

    artifact: tuple[str, ...] = ()
    """Binary columns that mark an acquisition artifact or another spurious feature."""
    protected: tuple[str, ...] = ()
    """Attributes a classifier must not rely on (skin tone, sex, site)."""
    ignore: tuple[str, ...] = ()
    """Columns no check reads (captions, ids, pairing columns)."""

    def role_of(self, column: str) -> str | None:
        """``artifact``, ``protected``, ``ignore`` or None (plain metadata)."""
        return next((role for role in ROLES if column in getattr(self, role)), None)

    def to_dict(self) -> dict[str, list[str]]:
        return {role: list(getattr(self, role)) for role in ROLES}


def column_roles_fpath(manifest_fpath: Path | str) -> Path:
    """Where the roles of the manifest ``manifest_fpath`` live."""
    return Path(manifest_fpath).parent / COLUMN_ROLES_NAME


def find_column_roles(manifest_fpath: Path | str,
                      columns: Iterable[str] | None = None) -> ColumnRoles | None:
    """The roles declared beside ``manifest_fpath``, or None when it declares none."""
    fpath = column_roles_fpath(manifest_fpath)
    return load_column_roles(fpath, columns) if fpath.is_file() else None


def load_column_roles(fpath: Path | str, columns: Iterable[str] | None = None) -> ColumnRoles:
    """Read and validate a ``columns.yaml``; with ``columns`` (the manifest's), every
    column it names must exist. Errors name the file, the key and the problem."""
    import yaml

    fpath = Path(fpath)
    try:
        doc = yaml.safe_load(fpath.read_text())
    except FileNotFoundError:
        raise InputError(f"{fpath}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{fpath}: not valid YAML ({' '.join(str(e).split())})") from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise InputError(f"{fpath}: expected a mapping of roles ({', '.join(ROLES)}) to "
                         f"lists of column names, got {type(doc).__name__}")
    if "kind" in doc or "schema_version" in doc:
        check_header(doc, _KIND, fpath)
    unknown = [str(k) for k in doc if k not in (*ROLES, *_HEADER_KEYS)]
    if unknown:
        raise InputError(f"{fpath}: unknown key(s) {', '.join(map(repr, unknown))}. "
                         f"Available: {', '.join(ROLES)}")
    roles = {role: _column_list(fpath, role, doc.get(role)) for role in ROLES}
    _check_roles(fpath, roles, None if columns is None else list(columns))
    return ColumnRoles(**roles)


def _column_list(fpath: Path, role: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InputError(f"{fpath}: {role}: expected a list of column names, got {value!r}")
    return tuple(value)


def _check_roles(fpath: Path, roles: Mapping[str, tuple[str, ...]],
                 columns: list[str] | None) -> None:
    seen: dict[str, str] = {}
    for role, names in roles.items():
        for name in names:
            if name in ("path", "label"):
                raise InputError(f"{fpath}: {role}: {name!r} is the manifest's {name} column "
                                 "and cannot take a role")
            if name in seen:
                raise InputError(f"{fpath}: column {name!r} is listed under both "
                                 f"{seen[name]} and {role}; give it one role")
            seen[name] = role
            if columns is not None and name not in columns:
                raise InputError(f"{fpath}: {role}: no column {name!r} in the manifest "
                                 f"(columns: {', '.join(columns)})")


def write_column_roles(fpath: Path | str, roles: ColumnRoles,
                       provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``roles`` (with clipaudit's header) to ``fpath``, atomically."""
    import yaml

    doc = {**make_header(_KIND, provenance), **roles.to_dict()}
    with atomic_path(fpath) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return Path(fpath)
