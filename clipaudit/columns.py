"""Metadata columns: their roles, the concepts they mark, and their binary keys.

A metadata column of the audited data is an **artifact** (an acquisition artifact such
as ``has_ruler``), a **protected** attribute (``skin_tone``, ``sex``), or **ignored**
(``lesion_size``: a cause of the label, or just bookkeeping). Every metadata-based check
(``metadata-confirmed``, ``sae-coverage``, ``concept-reliance``) reads the same roles,
declared once, and resolved per column with this precedence:

1. the command line: ``--column-role has_tag=artifact`` (exact column names);
2. the rule file: ``metadata.artifact_columns`` / ``protected_columns`` /
   ``ignored_columns`` (globs, case-insensitive);
3. the data set: ``columns.yaml`` beside its manifest (``DATASET_ROLES_FNAME``:
   ``{artifact: [...], protected: [...], ignore: [...]}``, a clipaudit header optional),
   which ``clipaudit synthetic make-dataset`` writes and a user may write for their data.

Within one source protected wins over artifact, and artifact over ignore. A column no
source names has no role; when it is binary the gate warns that no rule reads it.

Checks work on column **keys**: a binary column is one key (``has_ruler``, its positive
value ``True``/``1``/``yes``); a categorical column with at most ``MAX_CATEGORIES``
values is one key per value (``skin_tone=dark``). Each key marks a concept, named in the
rule file (``metadata.column_concepts``) or derived from the name: ``has_band_aid`` ->
``band aid``, ``skin_tone=dark`` -> ``dark skin tone``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from clipaudit.errors import InputError

Role = Literal["artifact", "protected", "ignore"]
ROLES: tuple[str, ...] = ("artifact", "protected", "ignore")
DATASET_ROLES_FNAME = "columns.yaml"
"""The file beside a manifest that declares its columns' roles."""
MAX_CATEGORIES = 12
"""A categorical column with more values than this is not split into keys."""
_POSITIVE = (True, 1, "True", "true", "yes", "1")
_HEADER_KEYS = ("kind", "schema_version", "clipaudit_version", "created", "provenance")
_PREFIXES = ("has_", "is_", "with_", "contains_")


# ------------------------------------------------------------------ keys


@dataclass(frozen=True)
class ColumnKey:
    """One binary question about an instance: ``has_ruler``, ``skin_tone=dark``."""

    key: str
    column: str
    value: Any
    """The value that means "present"."""
    concept: str
    """The concept the key marks (declared, else derived from the names)."""


def column_kind(values: pd.Series) -> tuple[str, list[Any]]:
    """(``binary`` | ``categorical`` | ``other``, distinct values sorted as text)."""
    distinct = sorted(values.dropna().unique().tolist(), key=str)
    if len(distinct) == 2:
        return "binary", distinct
    if 2 < len(distinct) <= MAX_CATEGORIES and not _is_continuous(values):
        return "categorical", distinct
    return "other", distinct if len(distinct) <= MAX_CATEGORIES else []


def _is_continuous(values: pd.Series) -> bool:
    return pd.api.types.is_float_dtype(values) and not all(float(v).is_integer()
                                                           for v in values.dropna())


def positive_value(distinct: Sequence[Any]) -> Any:
    """The value of a binary column that means "present" (True, 1, yes; else the last)."""
    for candidate in _POSITIVE:
        for value in distinct:
            if type(value) is type(candidate) and value == candidate:
                return value
    return sorted(distinct, key=str)[-1]


def derived_concept(column: str, value: Any = None) -> str:
    """``has_band_aid`` -> ``band aid``; (``skin_tone``, ``dark``) -> ``dark skin tone``."""
    name = column
    if value is None:
        for prefix in _PREFIXES:
            if name.lower().startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix):]
                break
    words = " ".join(name.replace("_", " ").replace("-", " ").split())
    return words if value is None else f"{value} {words}"


def column_keys(metadata: pd.DataFrame, concepts: Mapping[str, str] | None = None,
                skip: Iterable[str] = ()) -> list[ColumnKey]:
    """The keys of every binary or categorical column of ``metadata`` (not in ``skip``).

    ``concepts`` maps a column (or a key) to the concept it marks."""
    concepts = dict(concepts or {})
    skipped = set(skip)
    keys = []
    for column in metadata.columns:
        name = str(column)
        if name in skipped:
            continue
        kind, distinct = column_kind(metadata[column])
        if kind == "binary":
            keys.append(ColumnKey(name, name, positive_value(distinct),
                                  concepts.get(name) or derived_concept(name)))
        elif kind == "categorical":
            for value in distinct:
                key = f"{name}={value}"
                keys.append(ColumnKey(key, name, value,
                                      concepts.get(key) or derived_concept(name, value)))
    return keys


def key_presence(metadata: pd.DataFrame, key: ColumnKey) -> np.ndarray:
    """int8 per row: 1 the key holds, 0 it does not, -1 the value is missing."""
    values = metadata[key.column]
    out = np.where(values.to_numpy() == key.value, 1, 0).astype(np.int8)
    out[values.isna().to_numpy()] = -1
    return out


# ------------------------------------------------------------------ roles


@dataclass(frozen=True)
class DeclaredRoles:
    """Column roles a data set declares beside its manifest (``columns.yaml``)."""

    roles: dict[str, str] = field(default_factory=dict)
    """Column -> ``artifact`` | ``protected`` | ``ignore``."""
    source: str | None = None
    """The file they were read from."""


def load_declared_roles(fpath: Path | str) -> DeclaredRoles:
    """Read a ``columns.yaml``: ``{artifact: [...], protected: [...], ignore: [...]}``
    (every key optional; a clipaudit file header is allowed)."""
    import yaml

    fpath = Path(fpath)
    try:
        data = yaml.safe_load(fpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{fpath}: cannot read the column roles ({str(e).splitlines()[0]})") from None
    if data is None:
        return DeclaredRoles(source=str(fpath))
    if not isinstance(data, dict):
        raise InputError(f"{fpath}: expected a mapping of roles ({', '.join(ROLES)}) to "
                         f"lists of column names, got {type(data).__name__}")
    unknown = set(data) - {*ROLES, *_HEADER_KEYS}
    if unknown:
        raise InputError(f"{fpath}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                         f"(expected: {', '.join(ROLES)})")
    roles: dict[str, str] = {}
    for role in ("ignore", "artifact", "protected"):  # protected is read last, so it wins
        columns = data.get(role) or []
        if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
            raise InputError(f"{fpath}: {role}: expected a list of column names")
        roles |= {c: role for c in columns}
    return DeclaredRoles(roles, str(fpath))


def find_declared_roles(dpath: Path | str | None) -> DeclaredRoles:
    """The roles declared in ``<dpath>/columns.yaml``; none when there is no such file."""
    if dpath is None:
        return DeclaredRoles()
    fpath = Path(dpath) / DATASET_ROLES_FNAME
    return load_declared_roles(fpath) if fpath.is_file() else DeclaredRoles()


def write_declared_roles(dpath: Path | str, *, artifact: Sequence[str] = (),
                         protected: Sequence[str] = (), ignore: Sequence[str] = ()) -> Path:
    """Write ``<dpath>/columns.yaml`` (what a data set generator calls)."""
    import yaml

    from clipaudit.artifacts import atomic_path

    doc = {"artifact": list(artifact), "protected": list(protected), "ignore": list(ignore)}
    header = ("# Roles of this data set's metadata columns, read by clipaudit audit\n"
              "# (artifact | protected | ignore; see clipaudit.columns).\n")
    fpath = Path(dpath) / DATASET_ROLES_FNAME
    with atomic_path(fpath) as tmp:
        tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return fpath


def parse_role_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["has_tag=artifact", "age=ignore"]`` -> ``{"has_tag": "artifact", "age": "ignore"}``."""
    out: dict[str, str] = {}
    for item in items:
        column, sep, role = item.partition("=")
        column, role = column.strip(), role.strip().lower()
        if not sep or not column or role not in ROLES:
            raise InputError(f"--column-role {item!r}: expected COLUMN=ROLE with ROLE one of "
                             f"{', '.join(ROLES)}")
        out[column] = role
    return out


@dataclass(frozen=True)
class RoleSources:
    """Everything that can give a column a role, highest precedence first."""

    overrides: Mapping[str, str] = field(default_factory=dict)
    """Exact column -> role, from the command line."""
    artifact_globs: Sequence[str] = ()
    protected_globs: Sequence[str] = ()
    ignored_globs: Sequence[str] = ()
    declared: Mapping[str, str] = field(default_factory=dict)
    """Column -> role, from the data set's columns.yaml."""

    def role(self, column: str) -> tuple[str | None, str]:
        """(role or None, where it came from: ``command line``, ``rule file``, ``data set``)."""
        if column in self.overrides:
            return self.overrides[column], "command line"
        for role, globs in (("protected", self.protected_globs), ("artifact", self.artifact_globs),
                            ("ignore", self.ignored_globs)):
            if any(fnmatch.fnmatchcase(column.casefold(), g.casefold()) for g in globs):
                return role, "rule file"
        if column in self.declared:
            return self.declared[column], "data set"
        return None, ""
