"""pydantic validation errors as one-line messages: ``file: path: problem``."""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

MAX_PROBLEMS = 20
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_EXPECTED = {
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "date_type": "a date like 2027-01-31",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def format_validation_error(error: ValidationError, fpath: Path | str,
                            model: type[BaseModel]) -> list[str]:
    """One ``file: path: problem`` line per problem (at most ``MAX_PROBLEMS``)."""
    lines = []
    for item in error.errors(include_url=False)[:MAX_PROBLEMS]:
        path, parent = _walk(model, tuple(item["loc"]))
        if item["type"] == "union_tag_invalid":
            path += ".check"
        lines.append(f"{fpath}: {path + ': ' if path else ''}{_problem(item, parent)}")
    hidden = error.error_count() - MAX_PROBLEMS
    if hidden > 0:
        lines.append(f"{fpath}: ... and {hidden} more problems")
    return lines


def show(value: Any) -> str:
    """A value as a YAML user would recognise it, kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _problem(item: Any, parent: Any) -> str:
    kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(item["loc"][-1], parent)
    if kind == "union_tag_invalid":
        from clipaudit.gate.registry import list_checks

        return f"unknown check {ctx.get('tag')!r}. Available: {', '.join(list_checks())}"
    if kind == "union_tag_not_found":
        from clipaudit.gate.registry import list_checks

        return f"missing key 'check' (available checks: {', '.join(list_checks())})"
    if kind in _EXPECTED:
        hint = ""
        if kind == "string_type" and isinstance(value, (int, float, bool, dt.date)):
            hint = f" (quote it: '{show(value)}')"
        return f"expected {_EXPECTED[kind]}, got {show(value)}{hint}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}, got {show(value)}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"must be {op} {ctx.get(key)}, got {show(value)}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters, got {show(value)}"
    if kind == "string_pattern_mismatch":
        return ("must start with a letter or digit and hold only letters, digits, "
                f"'_', '.' and '-', got {show(value)}")
    if kind == "recursion_loop":
        return "refers to itself (a recursive YAML anchor)"
    if kind in ("value_error", "assertion_error"):
        return str(item["msg"]).split(", ", 1)[-1]
    return str(item["msg"])


def _unknown_key(key: Any, parent: Any) -> str:
    allowed = _keys_of(parent)
    if not allowed:
        return f"unknown key {show(key)}"
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {show(key)} ({hint}allowed: {', '.join(allowed)})"


def _keys_of(tp: Any) -> list[str]:
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or name for name, f in tp.model_fields.items()]
    return []


# ------------------------------------------------------------------ locations


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The path as a rule-file author writes it, and the type holding its last key.

    Drops the discriminator tag pydantic puts into the location of a check entry
    (``checks.0.shortcut-share.max_share`` -> ``checks[0].max_share``)."""
    parts: list[str] = []
    current: Any = model
    parent: Any = model
    for i, element in enumerate(loc):
        current = _unwrap(current)
        if _is_model_union(current):
            current = _variant(current, element)
            continue
        if element == "[key]":
            parts.append(" (key)")
            continue
        parent = current
        parts.append(_segment(element, first=not parts))
        if i < len(loc) - 1:
            current = _child_type(current, element)
    return "".join(parts), parent


def _segment(element: Any, first: bool) -> str:
    if isinstance(element, int):
        return f"[{element}]"
    text = str(element)
    if _IDENT_RE.match(text):
        return text if first else f".{text}"
    return f"[{json.dumps(text, ensure_ascii=False)}]"


def _child_type(tp: Any, element: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if element in (name, f.alias):
                return f.annotation
        return None
    if origin is list and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _unwrap(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model_union(tp: Any) -> bool:
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    return all(isinstance(a, type) and issubclass(a, BaseModel) for a in typing.get_args(tp))


def _variant(union: Any, tag: Any) -> Any:
    for member in typing.get_args(union):
        check = member.model_fields.get("check")
        if check is not None and tag in typing.get_args(_unwrap(check.annotation)):
            return member
    return None
