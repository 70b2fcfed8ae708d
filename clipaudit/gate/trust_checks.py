"""Checks that keep a PASS honest on any CLIP: reliance on annotated and forbidden
concepts without the SAE (``concept-reliance``), whether the SAE can see what the rules
care about (``sae-coverage``), metadata no rule reads (``column-roles``), and classes
whose alignment cannot be calibrated (``alignment-calibration``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from clipaudit.findings.coverage import coverage_status
from clipaudit.gate.columns import judged_keys, key_views, text_terms, unread_binary_columns
from clipaudit.gate.model import CheckSpec, Share
from clipaudit.gate.registry import CheckOutcome, Scope, Violation, register_check
from clipaudit.results import ColumnCoverage, ConceptReliance

Auc = Annotated[float, Field(ge=0.5, le=1.0)]

# ------------------------------------------------------------------ concept-reliance


class ConceptRelianceParams(CheckSpec):
    """Fails when a class relies on an artifact or protected column, or on a forbidden
    concept, measured in embedding space without the SAE."""

    sources: list[Literal["column", "text"]] = ["column", "text"]
    """Which concepts to judge: metadata ``column`` keys (artifact and protected columns,
    and columns marking a forbidden concept) and/or forbidden concepts no column marks,
    read through the reference CLIP's ``text``."""
    reliance_min: Share | None = None
    """Accuracy drop that counts as reliance (default: ``thresholds.reliance_min``)."""
    bound: Literal["lower", "estimate"] = "lower"
    """Judge the one-sided 95% ``lower`` bound of the reliance (fail only on what is
    established) or the ``estimate`` itself (e.g. for a warning on borderline cases)."""


_INDEXED: list[tuple[list[ConceptReliance], dict[str, dict[tuple[str, str], ConceptReliance]]]] = []
"""The last head's reliance records grouped by class (a head of 1,000 classes holds
records for every class and concept; scanning them all for each class is quadratic)."""


def _reliance_index(scope: Scope) -> dict[tuple[str, str], ConceptReliance]:
    assert scope.head is not None and scope.class_name is not None
    records = scope.head.concept_reliance
    if not _INDEXED or _INDEXED[0][0] is not records:
        by_class: dict[str, dict[tuple[str, str], ConceptReliance]] = {}
        for r in records:
            by_class.setdefault(r.class_name, {})[(r.source, r.concept)] = r
        _INDEXED[:] = [(records, by_class)]
    return dict(_INDEXED[0][1].get(scope.class_name, {}))


def _reliance_message(what: str, r: ConceptReliance, limit: float) -> str:
    flips = "" if r.flip_rate is None else f", {r.flip_rate:.0%} of the other classes' images flip"
    low = "" if r.reliance_low is None else f" (at least {r.reliance_low:.3f})"
    return (f"relies on {what}: putting it on the other classes' images costs {r.reliance:.3f} "
            f"accuracy{low}{flips} (limit {limit:g})")


@register_check("concept-reliance", params=ConceptRelianceParams)
def concept_reliance(spec: ConceptRelianceParams, scope: Scope) -> CheckOutcome:
    """A class relies on an annotated artifact or protected attribute, or on a forbidden
    concept (its direction in embedding space; no SAE involved)."""
    assert scope.class_name is not None
    limit = spec.reliance_min if spec.reliance_min is not None else scope.ruleset.thresholds.reliance_min
    index = _reliance_index(scope)
    views = key_views(scope.result.columns, scope.ruleset)
    targets: list[tuple[str, str, str]] = []  # (source, concept, how to name it)
    if "column" in spec.sources:
        targets += [("column", v.key, f"`{v.key}` ({v.role or 'forbidden'})")
                    for v in judged_keys(views, scope.ruleset, scope.class_name)]
    if "text" in spec.sources:
        targets += [("text", t, f"{t!r} (text-defined)")
                    for t in text_terms(views, scope.ruleset, scope.class_name)]
    violations, measured, largest = [], [], 0.0
    for source, concept, name in targets:
        r = index.get((source, concept))
        if r is None:
            violations.append(Violation(f"{name} was not measured by this audit; rerun "
                                        "`clipaudit audit` with this rule file"))
        elif r.status == "confounded":
            violations.append(Violation(f"{name}: {r.detail}"))
        elif r.status == "measured" and r.reliance is not None:
            value = r.reliance_low if spec.bound == "lower" and r.reliance_low is not None \
                else r.reliance
            measured.append({"concept": concept, "source": source, "reliance": r.reliance,
                             "reliance_low": r.reliance_low, "flip_rate": r.flip_rate,
                             "separation_ratio": r.separation_ratio})
            largest = max(largest, value)
            if value >= limit:
                violations.append(Violation(_reliance_message(name, r, limit), None, value, limit))
    if not targets:
        return CheckOutcome([], "no artifact, protected or forbidden concept to judge",
                            skipped=True)
    judged = "lower bound" if spec.bound == "lower" else "estimate"
    summary = (f"{len(measured)} concept(s) measured; largest reliance ({judged}) {largest:.3f} "
               f"(limit {limit:g})")
    unmeasured = len(targets) - len(measured)
    if unmeasured:
        summary += f"; {unmeasured} not measurable (too few instances, see details)"
    return CheckOutcome(violations, summary, {"reliance_min": limit, "measured": measured,
                                              "targets": [t[1] for t in targets]})


# ------------------------------------------------------------------ sae-coverage


class SaeCoverageParams(CheckSpec):
    """Fails when an artifact, protected or forbidden column is decodable from the
    activations but no SAE component (or concept group) isolates it."""

    decodable_min: Auc = 0.9
    """A column a cross-validated linear probe predicts with ROC AUC >= this is decodable."""
    isolated_min: Auc = 0.9
    """A column the best component (or the components of one concept label, summed)
    separates with ROC AUC >= this is isolated: findings can name it."""


def _blind_message(c: ColumnCoverage, sae: dict) -> str:
    best = (f"best component {c.best_component_auc:.2f} (#{c.best_component})"
            if c.best_component_auc is not None else "no component")
    group = (f", best concept group {c.best_concept_auc:.2f} ({c.best_concept!r})"
             if c.best_concept_auc is not None else "")
    settings = ""
    if sae.get("n_latents") is not None:
        settings = f" (this SAE: {sae.get('n_latents')} latents, k {sae.get('k')})"
    return (f"the SAE cannot see `{c.column}`: decodable at AUC {c.decodable_auc:.2f}, {best}"
            f"{group}; findings about it are blind. Train another SAE{settings}: more or fewer "
            "latents, a smaller k, more training rows or steps, or rows where it occurs more "
            "often")


@register_check("sae-coverage", params=SaeCoverageParams, scope="audit")
def sae_coverage(spec: SaeCoverageParams, scope: Scope) -> CheckOutcome:
    """The SAE cannot isolate an artifact, protected or forbidden column that the
    activations encode: findings about it would be blind."""
    views = judged_keys(key_views(scope.result.columns, scope.ruleset), scope.ruleset, None)
    if not views:
        return CheckOutcome([], "no artifact, protected or forbidden column to cover", skipped=True)
    coverage = {c.column: c for c in scope.result.coverage}
    sae = scope.result.provenance.get("sae") or {}
    violations, table = [], []
    for view in views:
        c = coverage.get(view.key)
        if c is None:
            violations.append(Violation(f"`{view.key}` was not measured by this audit; rerun "
                                        "`clipaudit audit` with this rule file"))
            continue
        status = coverage_status(c, spec.decodable_min, spec.isolated_min)
        table.append({"column": c.column, "status": status, "decodable_auc": c.decodable_auc,
                      "best_component_auc": c.best_component_auc,
                      "best_concept_auc": c.best_concept_auc})
        if status == "blind":
            violations.append(Violation(_blind_message(c, sae), None, c.isolated_auc,
                                        spec.isolated_min))
    seen = ", ".join(f"{row['column']} {row['status']}" for row in table)
    return CheckOutcome(violations, seen or "nothing measured", {"columns": table})


# ------------------------------------------------------------------ column-roles


@register_check("column-roles", params=CheckSpec, scope="audit")
def column_roles(spec: CheckSpec, scope: Scope) -> CheckOutcome:
    """A binary metadata column has no role and marks no forbidden concept: no rule reads it."""
    views = key_views(scope.result.columns, scope.ruleset)
    unread = unread_binary_columns(views, scope.ruleset)
    roles = {v.column: f"{v.role} ({v.role_source})" for v in views if v.role}
    violations = [Violation(
        f"binary column `{column}` has no role, so no rule reads it: declare it an artifact, "
        "a protected attribute or ignored (metadata.*_columns in the rule file, "
        "--column-role, or columns.yaml beside the manifest)") for column in unread]
    summary = (f"roles: {', '.join(f'{c} {r}' for c, r in sorted(roles.items()))}" if roles
               else "no column has a role")
    return CheckOutcome(violations, summary, {"roles": roles, "unread": unread})


# ------------------------------------------------------------------ alignment-calibration


@register_check("alignment-calibration", params=CheckSpec)
def alignment_calibration(spec: CheckSpec, scope: Scope) -> CheckOutcome:
    """A class's alignment cannot be calibrated on this model, so no shortcut finding can
    be decided for it by alignment (forbidden concepts and concept reliance still can)."""
    assert scope.class_name is not None
    found = {c.class_name: c for c in scope.result.calibration}.get(scope.class_name)
    if found is None:
        return CheckOutcome([Violation("the audit holds no calibration for this class")],
                            "not calibrated")
    if found.margin is None or found.margin <= 0 or found.source.startswith("uncalibrated"):
        return CheckOutcome([Violation(f"alignment cannot be calibrated for this class: "
                                       f"{found.source}")], "not calibrated")
    recall = "" if found.zero_shot_recall is None else \
        f", the reference CLIP favours the class for {found.zero_shot_recall:.0%} of its images"
    return CheckOutcome([], f"anchored on {found.n} images ({found.source}), contrast "
                        f"{found.margin:.4f}{recall}",
                        {"margin": found.margin, "source": found.source, "n": found.n})
