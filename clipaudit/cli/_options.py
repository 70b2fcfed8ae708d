"""CLI options whose default and help come from the library's config dataclasses.

The library owns every default: ``option(AuditConfig, "seed")`` is a typer option
whose default is ``AuditConfig.seed`` and whose help is the docstring written under
that field. A command never repeats a number the library also holds.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

import typer


def default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` (a path through nested configs: ``describe.top_m``)."""
    owner, field = _resolve(cls, name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise KeyError(f"{owner.__name__}.{field.name} has no default")


def doc(cls: type, name: str) -> str:
    """The docstring written under dataclass field ``name`` (its first paragraph)."""
    owner, field = _resolve(cls, name)
    text = _field_docs(owner).get(field.name, "")
    return " ".join(text.split("\n\n")[0].split())


def option(cls: type, name: str, *flags: str, help: str | None = None, **kwargs: Any) -> Any:
    """``typer.Option`` with the field's default and (unless given) its docstring as help."""
    return typer.Option(default(cls, name), *flags, help=help or doc(cls, name), **kwargs)


def _resolve(cls: type, dotted: str) -> tuple[type, dataclasses.Field[Any]]:
    owner = cls
    *path, last = dotted.split(".")
    for part in path:
        owner = type(default(owner, part))
    fields = {f.name: f for f in dataclasses.fields(owner)}
    if last not in fields:
        raise KeyError(f"{owner.__name__} has no field {last!r}")
    return owner, fields[last]


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after its annotation in the class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, after in zip(body.body, body.body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def argument_default(fn: Any, name: str) -> Any:
    """The default of keyword ``name`` of library function ``fn``."""
    value = inspect.signature(fn).parameters[name].default
    if value is inspect.Parameter.empty:
        raise KeyError(f"{fn.__name__}() has no default for {name!r}")
    return value
