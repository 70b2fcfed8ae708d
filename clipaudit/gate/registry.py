"""Registered checks: the plug-in interface of the gate.

A check is a function ``(spec, scope) -> CheckOutcome``, registered under a name with
the pydantic model of its parameters (a subclass of ``CheckSpec``)::

    class MaxFindings(CheckSpec):
        max_findings: int = 3
        \"\"\"Most findings a class may have.\"\"\"

    @register_check("max-findings", params=MaxFindings)
    def max_findings(spec: MaxFindings, scope: Scope) -> CheckOutcome:
        found = scope.findings()
        ...

A ``class`` check runs once per head and class, an ``audit`` check once per audit.
The check reports violations (with the finding behind each, so waivers and the
baseline can apply) and the numbers it looked at; the engine turns them into a
verdict with the rule's severity. Rule files are validated against the parameter
models of every registered check; an unknown check name lists those available.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, create_model

from clipaudit.gate.model import CheckSpec, RuleSet
from clipaudit.results import AuditResult, ClassAudit, Finding, HeadAudit

if TYPE_CHECKING:
    from clipaudit.gate.baseline import BaselineIndex

CheckScope = Literal["class", "audit"]
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class Violation:
    """One thing that breaks a rule, with the numbers behind it."""

    message: str
    finding: Finding | None = None
    """The finding responsible (waivers by component or concept match it)."""
    value: float | None = None
    limit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "value": self.value, "limit": self.limit}
        if self.finding is not None:
            f = self.finding
            out |= {"finding": f.id, "component": f.component, "concept": f.concept}
        return out


@dataclass(frozen=True)
class CheckOutcome:
    """What a check found in one scope: violations (empty: the rule holds) and numbers."""

    violations: list[Violation]
    summary: str
    """One line on what was measured, e.g. ``largest shortcut share 0.08 (limit 0.15)``."""
    details: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    """The check had nothing to judge (e.g. no baseline given); it passes."""


@dataclass(frozen=True)
class Scope:
    """What a check looks at: the audit, and for ``class`` checks one head and class."""

    result: AuditResult
    ruleset: RuleSet
    head: HeadAudit | None = None
    class_audit: ClassAudit | None = None
    baseline: BaselineIndex | None = None

    @property
    def class_name(self) -> str | None:
        return self.class_audit.class_name if self.class_audit is not None else None

    def findings(self) -> list[Finding]:
        """This head's and class's findings that the rule set's thresholds keep (``rules
        apply`` may use other thresholds than the audit did; it can drop findings, never
        add them): a forbidden concept the head relies on whatever its alignment (where
        reliance was not measured, alignment decides), else a poorly aligned component
        whose concept is not expected for the class and whose share the data back
        (``Finding.backed``: the share's interval lies above what random sets of the
        class's size give, so a class too small for its interval to exclude chance fails
        nothing on alignment alone)."""
        if self.head is None or self.class_audit is None:
            return []
        t, cls = self.ruleset.thresholds, self.class_audit.class_name
        kept = []
        for f in self.head.findings:
            if f.class_name != cls or f.clarity < t.clarity_min:
                continue
            if not (f.share >= t.share_min
                    or (f.concept_share >= t.share_min and f.share >= t.member_share_min)):
                continue
            status = self.ruleset.concept_status(cls, f.concept)
            # None: an audit made before calibration, whose selection already found the
            # component poorly aligned (a new audit never keeps an uncalibrated candidate)
            poorly_aligned = (f.calibrated_alignment is None
                              or f.calibrated_alignment < t.calibrated_alignment_max)
            decisive = f.reliance_low if f.reliance_low is not None else f.reliance
            if status == "forbidden" and decisive is not None:
                relied = decisive >= t.reliance_min
            else:
                relied = poorly_aligned and status != "expected" and f.backed
            if relied:
                kept.append(f)
        return kept


CheckFn = Callable[[Any, Scope], CheckOutcome]


@dataclass(frozen=True)
class RegisteredCheck:
    name: str
    fn: CheckFn
    params: type[CheckSpec]
    """The rule-entry model for this check (``check`` fixed to ``name``)."""
    scope: CheckScope
    description: str


_REGISTRY: dict[str, RegisteredCheck] = {}
_MODEL_CACHE: dict[tuple[str, ...], type[RuleSet]] = {}


def register_check(name: str, *, params: type[CheckSpec] = CheckSpec,
                   scope: CheckScope = "class") -> Callable[[CheckFn], CheckFn]:
    """Register a check under ``name`` (lower-case words joined by ``-``)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"check name {name!r} must be lower-case words joined by '-'")
    if not (isinstance(params, type) and issubclass(params, CheckSpec)):
        raise TypeError(f"params of check {name!r} must subclass CheckSpec")

    def decorator(fn: CheckFn) -> CheckFn:
        known = _REGISTRY.get(name)
        if known is not None and known.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"check {name!r} is already registered by {known.fn.__module__}")
        title = "".join(part.capitalize() for part in name.split("-")) + "Rule"
        # the parameters' field descriptions come from their class's attribute docstrings,
        # read once; this subclass only adds ``check`` (described here), and reading its
        # source again would scan every loaded module (0.5 s of every command's start)
        model = create_model(title, __base__=_no_docstring_reading(params), __doc__=params.__doc__,
                             check=(Literal[name], Field(description="Registered check name.")))  # type: ignore[arg-type]
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RegisteredCheck(name, fn, model, scope, doc[0] if doc else "")
        _MODEL_CACHE.clear()
        return fn

    return decorator


@functools.cache
def _no_docstring_reading(params: type[CheckSpec]) -> type[CheckSpec]:
    """``params`` with ``use_attribute_docstrings`` off for classes derived from it (its own
    fields keep the descriptions read from its docstrings)."""

    class Derived(params):  # type: ignore[valid-type,misc]
        model_config = ConfigDict(use_attribute_docstrings=False)

    return Derived


def _ensure_builtins() -> None:
    from clipaudit.gate import checks, trust_checks  # noqa: F401  (register the built-in checks)


def list_checks() -> list[str]:
    """Names of the registered checks, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_check(name: str) -> RegisteredCheck:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown check {name!r}. Available: {', '.join(list_checks())}") from None


def ruleset_model() -> type[RuleSet]:
    """``RuleSet`` with ``checks`` typed as the union of the registered checks' models."""
    names = tuple(list_checks())
    if names not in _MODEL_CACHE:
        variants = tuple(_REGISTRY[n].params for n in names)
        item: Any = (Annotated[Union[variants], Field(discriminator="check")]  # noqa: UP007
                     if len(variants) > 1 else variants[0])
        _MODEL_CACHE[names] = create_model(
            "RuleSet", __base__=RuleSet, __doc__=RuleSet.__doc__,
            checks=(list[item], Field(default=[], description="The rules to evaluate.")))
    return _MODEL_CACHE[names]


def ruleset_json_schema() -> dict[str, Any]:
    """JSON Schema of a rule file (as shipped in ``rules/schema.json``)."""
    schema = ruleset_model().model_json_schema(by_alias=True)
    schema["title"] = "clipaudit rule file"
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}
