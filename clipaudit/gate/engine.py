"""Evaluating a rule set on an audit: checks -> violations -> waivers -> verdicts.

One verdict per rule and, for class checks, per head and class. A violation is
set aside when a waiver covers it (until the waiver expires) or, with
``baseline_options.waive_known``, when the baseline audit already had the finding.
A verdict fails (or warns, by the rule's severity) while any violation is left.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from clipaudit.errors import ArtifactError, InputError, MismatchError
from clipaudit.gate.baseline import BaselineIndex
from clipaudit.gate.model import CheckSpec, RuleSet, Waiver
from clipaudit.gate.registry import CheckOutcome, Scope, Violation, get_check
from clipaudit.results import AuditResult, ClassAudit, RuleVerdict

log = logging.getLogger(__name__)

MAX_LISTED = 3


def evaluate(result: AuditResult, ruleset: RuleSet, *, baseline: AuditResult | None = None,
             today: dt.date | None = None) -> list[RuleVerdict]:
    """The verdicts of every rule of ``ruleset`` on ``result``.

    Raises MismatchError/ArtifactError (exit code 2) when the audit, or the baseline,
    cannot be trusted: an SAE trained for another backbone, non-finite numbers, a
    baseline of another backbone or hook point.
    """
    check_audit_trust(result)
    require_evaluable(result, ruleset)
    index = None
    if baseline is not None:
        check_audit_trust(baseline, what="baseline audit")
        index = BaselineIndex(result, baseline, ruleset.baseline_options.min_cosine)
    today = today or dt.date.today()
    verdicts: list[RuleVerdict] = []
    for spec in ruleset.checks:
        registered = get_check(spec.check)
        if registered.scope == "audit":
            scopes: Iterator[Scope] = iter([Scope(result, ruleset, baseline=index)])
        else:
            verdicts.extend(_unknown_targets(spec, result))
            scopes = _class_scopes(result, ruleset, spec, index)
        for scope in scopes:
            if too_few_instances(scope.class_audit, ruleset):
                verdicts.append(_not_evaluated(spec, scope, ruleset, today))
            else:
                verdicts.append(_judge(spec, scope, registered.fn(spec, scope), ruleset, today))
    return verdicts


# ------------------------------------------------------------------ classes too small to judge


def too_few_instances(class_audit: ClassAudit | None, ruleset: RuleSet) -> bool:
    """Whether a class has fewer audited instances than the rule set's ``min_instances``."""
    return class_audit is not None and class_audit.n_instances < ruleset.thresholds.min_instances


def is_not_evaluated(verdict: RuleVerdict) -> bool:
    """A class rule's verdict on a class with too few instances to judge."""
    return bool(verdict.details.get("not_evaluated"))


@dataclass(frozen=True)
class NotEvaluated:
    """A head's class that no rule judged: too few audited instances."""

    head: str
    class_name: str
    n_instances: int
    min_instances: int
    status: str
    """The worst status its verdicts got (``warn``, ``fail``; ``pass`` when waived)."""


def not_evaluated_classes(verdicts: list[RuleVerdict]) -> list[NotEvaluated]:
    """One entry per head and class whose rules were not evaluated, in verdict order."""
    rank = {"pass": 0, "warn": 1, "fail": 2}
    out: dict[tuple[str, str], NotEvaluated] = {}
    for v in verdicts:
        if not is_not_evaluated(v) or v.head is None or v.class_name is None:
            continue
        status = "pass" if v.waived is not None else v.status
        key = (v.head, v.class_name)
        known = out.get(key)
        if known is None or rank[status] > rank[known.status]:
            out[key] = NotEvaluated(v.head, v.class_name, int(v.details["n_instances"]),
                                    int(v.details["min_instances"]), status)
    return list(out.values())


def require_evaluable(result: AuditResult, ruleset: RuleSet) -> None:
    """Refuse (InputError, exit code 2) an audit in which some head has no class the rule
    set can judge: its every verdict would be 'not evaluated'."""
    minimum = ruleset.thresholds.min_instances
    for head in result.heads:
        if head.classes and all(too_few_instances(c, ruleset) for c in head.classes):
            sizes = ", ".join(f"{c.class_name} {c.n_instances}"
                              for c in sorted(head.classes, key=lambda c: -c.n_instances)[:3])
            raise InputError(f"audit {result.audit_id}: no class of head {head.name!r} has the "
                             f"{minimum} audited instances a verdict needs ({sizes}); audit more "
                             "images or lower thresholds.min_instances in the rule file")


def _not_evaluated(spec: CheckSpec, scope: Scope, ruleset: RuleSet,
                   today: dt.date) -> RuleVerdict:
    """The verdict of a class rule on a class too small to judge: never a pass (unless a
    waiver covers it); ``thresholds.too_few_instances`` says warn or fail."""
    assert scope.class_audit is not None and scope.head is not None
    n, minimum = scope.class_audit.n_instances, ruleset.thresholds.min_instances
    violation = Violation(f"not evaluated: {n} audited instance(s), fewer than min_instances "
                          f"{minimum}", None, float(n), float(minimum))
    waiver, lapsed = _waiver_for(violation, spec, scope, ruleset, today)
    details = {"not_evaluated": True, "n_instances": n, "min_instances": minimum,
               "violations": [] if waiver else [violation.to_dict()],
               "waived": [{**violation.to_dict(), "waiver": _waiver_dict(waiver)}] if waiver else [],
               "known_in_baseline": [], "expired_waivers": [_waiver_dict(w) for w in lapsed]}
    status: Literal["pass", "warn", "fail"]
    if waiver is not None:
        status, reason = "pass", waiver.reason
    else:
        failing = ruleset.thresholds.too_few_instances == "fail" and spec.severity == "fail"
        status, reason = ("fail" if failing else "warn"), None
    return RuleVerdict(rule=spec.id, check=spec.check, status=status, message=violation.message,
                       head=scope.head.name, class_name=scope.class_name, details=details,
                       waived=reason)


def exit_code(verdicts: list[RuleVerdict]) -> int:
    """0 when no verdict fails (warnings and waived failures pass), else 1."""
    return 1 if any(v.status == "fail" and v.waived is None for v in verdicts) else 0


def check_audit_trust(result: AuditResult, what: str = "audit") -> None:
    """Refuse an audit whose numbers cannot be trusted (raises a ClipAuditError)."""
    sae, backbone = result.provenance.get("sae"), result.provenance.get("backbone")
    sae = sae if isinstance(sae, dict) else {}
    backbone = backbone if isinstance(backbone, dict) else {}
    # (The hook point is checked when the SAE is loaded; provenance spells it per stage.)
    ours, theirs = sae.get("backbone_id"), backbone.get("id")
    if ours is not None and theirs is not None and ours != theirs:
        raise MismatchError(f"{what} {result.audit_id}: the SAE was trained for backbone "
                            f"{ours!r}, the audit ran backbone {theirs!r}; its findings "
                            "cannot be trusted")
    names = [h.name for h in result.heads]
    if len(set(names)) != len(names):
        raise ArtifactError(f"{what} {result.audit_id}: head names repeat ({names})")
    for metric in ("fvu", "dead_fraction"):
        _require_finite(result.sae_metrics.get(metric), f"sae_metrics.{metric}", result, what)
    for head in result.heads:
        classes = {c.class_name for c in head.classes}
        for c in head.classes:
            _require_finite(c.unexplained_share, f"{head.name}/{c.class_name} unexplained_share",
                            result, what)
        for f in head.findings:
            if f.class_name not in classes or f.head != head.name:
                raise ArtifactError(f"{what} {result.audit_id}: finding {f.id} names head "
                                    f"{f.head!r} and class {f.class_name!r}, which head "
                                    f"{head.name!r} does not audit")
            for key in ("share", "alignment", "clarity"):
                _require_finite(getattr(f, key), f"finding {f.id} {key}", result, what)


def _require_finite(value: float | None, label: str, result: AuditResult, what: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ArtifactError(f"{what} {result.audit_id}: {label} is {value!r}; the audit "
                            "cannot be trusted (did SAE training diverge?)")


# ------------------------------------------------------------------ scopes


def _class_scopes(result: AuditResult, ruleset: RuleSet, spec: CheckSpec,
                  index: BaselineIndex | None) -> Iterator[Scope]:
    for head in result.heads:
        if spec.heads is not None and head.name not in spec.heads:
            continue
        for class_audit in head.classes:
            if spec.classes is None or class_audit.class_name in spec.classes:
                yield Scope(result, ruleset, head, class_audit, index)


def _unknown_targets(spec: CheckSpec, result: AuditResult) -> list[RuleVerdict]:
    """A rule limited to a head or class the audit lacks would check nothing: say so."""
    heads = {h.name for h in result.heads}
    classes = {c.class_name for h in result.heads for c in h.classes}
    out = []
    for kind, wanted, known in (("head", spec.heads, heads), ("class", spec.classes, classes)):
        for name in wanted or []:
            if name not in known:
                out.append(RuleVerdict(
                    spec.id, spec.check, "warn",
                    f"rule names {kind} {name!r}, which this audit does not have "
                    f"({', '.join(sorted(known)) or 'none'}); nothing was checked for it",
                    head=name if kind == "head" else None,
                    class_name=name if kind == "class" else None))
    return out


# ------------------------------------------------------------------ verdicts


def _judge(spec: CheckSpec, scope: Scope, outcome: CheckOutcome, ruleset: RuleSet,
           today: dt.date) -> RuleVerdict:
    active: list[Violation] = []
    waived: list[tuple[Violation, Waiver]] = []
    known: list[dict[str, Any]] = []
    lapsed: list[Waiver] = []
    for v in outcome.violations:
        if (v.finding is not None and scope.baseline is not None
                and ruleset.baseline_options.waive_known):
            match = scope.baseline.match(v.finding)
            if match.matched:
                known.append({**v.to_dict(), **match.to_dict()})
                continue
        waiver, expired = _waiver_for(v, spec, scope, ruleset, today)
        lapsed.extend(w for w in expired if w not in lapsed)
        if waiver is None:
            active.append(v)
        else:
            waived.append((v, waiver))
    details = {
        **outcome.details,
        "violations": [v.to_dict() for v in active],
        "waived": [{**v.to_dict(), "waiver": _waiver_dict(w)} for v, w in waived],
        "known_in_baseline": known,
        "expired_waivers": [_waiver_dict(w) for w in lapsed],
    }
    if spec.description:
        details["description"] = spec.description
    status, message, reason = _status(spec, outcome, active, waived, known, lapsed, scope)
    return RuleVerdict(rule=spec.id, check=spec.check, status=status, message=message,
                       head=scope.head.name if scope.head is not None else None,
                       class_name=scope.class_name, details=details, waived=reason)


def _status(spec: CheckSpec, outcome: CheckOutcome, active: list[Violation],
            waived: list[tuple[Violation, Waiver]], known: list[dict[str, Any]],
            lapsed: list[Waiver], scope: Scope) -> tuple[Any, str, str | None]:
    expired_note = "".join(f"; waiver expired on {w.expires} ({w.reason})" for w in lapsed)
    if active:
        listed = "; ".join(v.message for v in active[:MAX_LISTED])
        more = f"; and {len(active) - MAX_LISTED} more" if len(active) > MAX_LISTED else ""
        return spec.severity, listed + more + expired_note, None
    if waived or known:
        reasons = list(dict.fromkeys(w.reason for _, w in waived))
        if known:
            assert scope.baseline is not None
            reasons.append(f"known in baseline audit {scope.baseline.baseline_id}")
        n = len(waived) + len(known)
        return "pass", f"{n} violation(s) waived: {'; '.join(reasons)}", "; ".join(reasons)
    prefix = "skipped: " if outcome.skipped else ""
    return "pass", prefix + outcome.summary + expired_note, None


def _waiver_for(v: Violation, spec: CheckSpec, scope: Scope, ruleset: RuleSet,
                today: dt.date) -> tuple[Waiver | None, list[Waiver]]:
    """The first active waiver covering ``v``, and the expired ones that would have."""
    expired: list[Waiver] = []
    for waiver in ruleset.waivers:
        if not _covers(waiver, v, spec, scope, ruleset):
            continue
        if waiver.is_active(today):
            return waiver, expired
        expired.append(waiver)
    return None, expired


def _covers(w: Waiver, v: Violation, spec: CheckSpec, scope: Scope, ruleset: RuleSet) -> bool:
    if w.rule is not None and w.rule != spec.id:
        return False
    if w.head is not None and (scope.head is None or w.head != scope.head.name):
        return False
    if w.class_name is not None and w.class_name != scope.class_name:
        return False
    if w.component is not None and (v.finding is None or v.finding.component != w.component):
        return False
    if w.concept is not None and (v.finding is None
                                  or not ruleset.matcher.matches(v.finding.concept, [w.concept])):
        return False
    return True


def _waiver_dict(w: Waiver) -> dict[str, Any]:
    return w.model_dump(mode="json", by_alias=True, exclude_none=True)
