"""Matching findings against a baseline audit, so CI can fail only on new shortcuts.

A finding is known when the baseline has a finding for the same head and class on
the same component. With the same SAE (same sha256) that is the same component id;
after the SAE changed, component ids mean nothing, so components match when their
decoder directions have cosine similarity >= ``min_cosine``. Directions live in the
residual stream of one backbone at one hook point: a baseline of another backbone or
hook point cannot be compared and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from clipaudit.errors import MismatchError
from clipaudit.results import AuditResult, Finding

MatchMethod = Literal["component-id", "direction"]


def _sae_sha(result: AuditResult) -> str | None:
    sae = result.provenance.get("sae")
    return sae.get("sha256") if isinstance(sae, dict) else None


def _get(result: AuditResult, section: str, key: str | None = None) -> Any:
    value = result.provenance.get(section)
    if key is None:
        return value
    return value.get(key) if isinstance(value, dict) else None


@dataclass(frozen=True)
class BaselineMatch:
    baseline_finding: str | None
    """Id of the matching baseline finding; None for a new finding."""
    method: MatchMethod
    cosine: float | None = None
    """Decoder-direction cosine of the match (``direction`` method)."""

    @property
    def matched(self) -> bool:
        return self.baseline_finding is not None

    def to_dict(self) -> dict[str, Any]:
        return {"matched": self.matched, "baseline_finding": self.baseline_finding,
                "method": self.method, "cosine": self.cosine}


class BaselineIndex:
    """The baseline's findings by head and class, ready to match the current ones."""

    def __init__(self, current: AuditResult, baseline: AuditResult, min_cosine: float = 0.9):
        _require_comparable(current, baseline)
        self.baseline_id = baseline.audit_id
        self.min_cosine = min_cosine
        sha = _sae_sha(current)
        self.method: MatchMethod = ("component-id" if sha is not None and sha == _sae_sha(baseline)
                                    else "direction")
        self._by_class: dict[tuple[str, str], list[Finding]] = {}
        for head in baseline.heads:
            for f in head.findings:
                self._by_class.setdefault((head.name, f.class_name), []).append(f)
        if self.method == "direction":
            self._current = _unit_directions(current, "this audit", _finding_components(current))
            self._baseline = _unit_directions(baseline, f"baseline audit {baseline.audit_id}",
                                              _finding_components(baseline))
            _require_same_width(self._current, self._baseline, baseline.audit_id)

    def match(self, finding: Finding) -> BaselineMatch:
        candidates = self._by_class.get((finding.head, finding.class_name), [])
        if self.method == "component-id":
            for b in candidates:
                if b.component == finding.component:
                    return BaselineMatch(b.id, self.method)
            return BaselineMatch(None, self.method)
        best, best_cos = None, -np.inf
        direction = self._current[finding.component]
        for b in candidates:
            cos = float(direction @ self._baseline[b.component])
            if cos > best_cos:
                best, best_cos = b, cos
        if best is not None and best_cos >= self.min_cosine:
            return BaselineMatch(best.id, self.method, best_cos)
        return BaselineMatch(None, self.method, None if best is None else best_cos)


def _finding_components(result: AuditResult) -> set[int]:
    return {f.component for h in result.heads for f in h.findings}


def _unit_directions(result: AuditResult, what: str, needed: set[int]) -> dict[int, np.ndarray]:
    stored = {c.component: c.direction for c in result.components if c.direction}
    missing = sorted(needed - set(stored))
    if missing:
        raise MismatchError(
            f"{what}: the SAE differs from the other audit's, and there is no decoder "
            f"direction for component(s) {missing[:5]} to match findings by; re-run the audit "
            "with this clipaudit version (it stores directions)")
    out = {}
    for component, values in stored.items():
        vec = np.asarray(values, dtype=np.float64)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0.0:
            raise MismatchError(f"{what}: decoder direction of component {component} is "
                                "zero or not finite")
        out[component] = vec / norm
    return out


def _require_same_width(current: dict[int, np.ndarray], baseline: dict[int, np.ndarray],
                        baseline_id: str) -> None:
    widths = {v.shape[0] for v in current.values()}, {v.shape[0] for v in baseline.values()}
    if len(widths[0] | widths[1]) > 1:
        raise MismatchError(f"baseline audit {baseline_id}: decoder directions of width "
                            f"{sorted(widths[1])}, this audit's {sorted(widths[0])}; "
                            "they come from different models or hook points")


def _require_comparable(current: AuditResult, baseline: AuditResult) -> None:
    for section, key, what in (("backbone", "id", "backbone"), ("hook", None, "hook point")):
        ours, theirs = _get(current, section, key), _get(baseline, section, key)
        if ours is not None and theirs is not None and ours != theirs:
            raise MismatchError(f"baseline audit {baseline.audit_id} is for {what} {theirs!r}, "
                                f"this audit for {ours!r}; findings cannot be compared")
