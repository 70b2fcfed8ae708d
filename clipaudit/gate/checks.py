"""The built-in checks. Each fails exactly when its threshold is crossed:
``max_*`` limits are inclusive (a value equal to the limit passes), ``*_min``
triggers are inclusive (a value equal to the trigger counts)."""

from __future__ import annotations

import fnmatch
import math
from typing import Annotated, Any

from pydantic import Field, model_validator

from clipaudit.gate.model import REFUSED_ALIGNMENT_MAX, CheckSpec, Share, Term
from clipaudit.gate.registry import CheckOutcome, Scope, Violation, register_check
from clipaudit.results import ConceptReliance, Finding


def _label(f: Finding) -> str:
    return f"component {f.component} ({f.concept})"


def _relied(f: Finding) -> str:
    if f.reliance is None:
        return (f"reliance not measurable, so alignment decided ({_alignment_text(f)})")
    low = "" if f.reliance_low is None else f", at least {f.reliance_low:.3f}"
    return (f"the head relies on it: putting it on the other classes' images costs "
            f"{f.reliance:.3f} accuracy{low} ({f.reliance_source or 'concept direction'})")


def _together(f: Finding) -> str:
    if not f.concept_split:
        return ""
    return (f", {f.concept_share:.3f}{_interval(f.concept_share_ci)} with the class's other "
            f"{f.concept!r} findings")


def _interval(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _chance(f: Finding) -> str:
    return f"; {f.chance_share:.3f} over all data" if f.chance_share is not None else ""


# ------------------------------------------------------------------ shortcut-share


class ShortcutShareParams(CheckSpec):
    """Fails when a finding, together with the class's other findings of its concept
    label, carries more than ``max_share`` of a class's evidence: the lower end of the
    concept share's bootstrap interval is what is compared (``Finding.gate_share``)."""

    max_share: Share
    """Largest relevance share one concept's findings may carry (equal passes)."""
    calibrated_alignment_max: Annotated[float, Field(ge=-10.0, le=10.0)] | None = None
    """Only findings whose calibrated alignment with their class is below this count
    (default: every finding; ``thresholds`` already decided which components are findings)."""

    @model_validator(mode="before")
    @classmethod
    def _no_raw_alignment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alignment_max" in data:
            raise ValueError(REFUSED_ALIGNMENT_MAX)
        return data


def _alignment_text(f: Finding) -> str:
    calibrated = "n/a" if f.calibrated_alignment is None else f"{f.calibrated_alignment:.2f}"
    return f"calibrated alignment {calibrated}, raw {f.alignment:+.3f}"


@register_check("shortcut-share", params=ShortcutShareParams)
def shortcut_share(spec: ShortcutShareParams, scope: Scope) -> CheckOutcome:
    """Poorly aligned components of one concept carry too large a share of a class's
    evidence (a shortcut split over several components counts whole)."""
    findings = [f for f in scope.findings()
                if spec.calibrated_alignment_max is None or f.kind == "forbidden-concept"
                or (f.calibrated_alignment is not None
                    and f.calibrated_alignment < spec.calibrated_alignment_max)]
    violations = [
        Violation(f"{_label(f)} carries {f.share:.3f}{_interval(f.share_ci)} of the evidence"
                  f"{_together(f)} ({_alignment_text(f)}{_chance(f)}; limit {spec.max_share:g}"
                  f"{' on the lower bound' if f.concept_share_ci else ''})",
                  f, f.gate_share, spec.max_share)
        for f in findings if f.gate_share > spec.max_share
    ]
    largest = max((f.gate_share for f in findings), default=0.0)
    return CheckOutcome(
        violations,
        f"{len(findings)} finding(s); largest share {largest:.3f} (limit {spec.max_share:g})",
        {"n_findings": len(findings), "largest_share": largest, "max_share": spec.max_share},
    )


# ------------------------------------------------------------------ forbidden-concept


class ForbiddenConceptParams(CheckSpec):
    """Fails when a finding's concept is forbidden for its class (``concepts.forbidden``)."""

    min_share: Share = 0.0
    """Only forbidden findings carrying at least this share count."""


@register_check("forbidden-concept", params=ForbiddenConceptParams)
def forbidden_concept(spec: ForbiddenConceptParams, scope: Scope) -> CheckOutcome:
    """A finding encodes a concept the rule set forbids for the class."""
    assert scope.class_name is not None
    violations = []
    for f in scope.findings():
        term = scope.ruleset.forbidden_match(scope.class_name, f.concept)
        if term is not None and f.gate_share >= spec.min_share:
            violations.append(Violation(
                f"{_label(f)} is forbidden ({term!r}) and carries {f.share:.3f} of the evidence"
                f"{_together(f)}; {_relied(f)}", f, f.share, spec.min_share))
    forbidden = scope.ruleset.concepts_for(scope.ruleset.concepts.forbidden, scope.class_name)
    return CheckOutcome(
        violations, f"no finding encodes a forbidden concept ({len(forbidden)} listed)",
        {"forbidden": forbidden, "min_share": spec.min_share},
    )


# ------------------------------------------------------------------ unexplained-share


class UnexplainedShareParams(CheckSpec):
    """Fails when the SAE leaves too much of a class's evidence unexplained."""

    max_share: Share
    """Largest unexplained share (error term) allowed (a share equal to it passes)."""


@register_check("unexplained-share", params=UnexplainedShareParams)
def unexplained_share(spec: UnexplainedShareParams, scope: Scope) -> CheckOutcome:
    """The SAE's error term carries too much of a class's evidence to trust the audit."""
    assert scope.class_audit is not None
    value = scope.class_audit.unexplained_share
    violations = [] if value <= spec.max_share else [Violation(
        f"the SAE leaves {value:.3f} of the evidence unexplained (limit {spec.max_share:g})",
        None, value, spec.max_share)]
    return CheckOutcome(violations, f"unexplained share {value:.3f} (limit {spec.max_share:g})",
                        {"unexplained_share": value, "max_share": spec.max_share})


# ------------------------------------------------------------------ sae-quality


class SaeQualityParams(CheckSpec):
    """Fails when the SAE reconstructs the activations too poorly to audit with."""

    max_fvu: Annotated[float, Field(ge=0.0)] | None = None
    """Largest fraction of variance unexplained allowed (``sae_metrics.fvu``)."""
    max_dead_fraction: Share | None = None
    """Largest fraction of components that never fire (``sae_metrics.dead_fraction``)."""

    @model_validator(mode="after")
    def _has_a_limit(self) -> SaeQualityParams:
        if self.max_fvu is None and self.max_dead_fraction is None:
            raise ValueError("set max_fvu, max_dead_fraction or both")
        return self


@register_check("sae-quality", params=SaeQualityParams, scope="audit")
def sae_quality(spec: SaeQualityParams, scope: Scope) -> CheckOutcome:
    """The SAE's reconstruction quality is below the rule set's minimum."""
    metrics = scope.result.sae_metrics
    limits = {"fvu": spec.max_fvu, "dead_fraction": spec.max_dead_fraction}
    violations, seen = [], {}
    for metric, limit in limits.items():
        if limit is None:
            continue
        value = metrics.get(metric)
        seen[metric] = value
        if value is None:
            violations.append(Violation(f"the audit reports no SAE {metric}", None, None, limit))
        elif value > limit:
            violations.append(Violation(f"SAE {metric} {value:.3f} (limit {limit:g})",
                                        None, value, limit))
    summary = ", ".join(f"{m} {v:.3f} (limit {limits[m]:g})" for m, v in seen.items()
                        if v is not None)
    return CheckOutcome(violations, summary or "no SAE metrics",
                        {"metrics": seen, "limits": {k: v for k, v in limits.items() if v is not None}})


# ------------------------------------------------------------------ metadata-confirmed


class MetadataConfirmedParams(CheckSpec):
    """Fails when a finding's activation predicts an artifact or protected metadata column."""

    auc_min: Annotated[float, Field(ge=0.5, le=1.0)] | None = None
    """ROC AUC at which a column counts as predicted (default: ``metadata.auc_min``)."""
    columns: list[Term] | None = None
    """Columns (globs) to look at (default: the artifact and protected columns, whatever
    declared them, and columns marking a forbidden concept)."""
    symmetric: bool = True
    """Also count an AUC of 1 - auc_min or less (the component fires on the absence)."""


def _column_matcher(patterns: list[str]) -> Any:
    lowered = [p.casefold() for p in patterns]
    return lambda column: any(fnmatch.fnmatchcase(column.casefold(), p) for p in lowered)


@register_check("metadata-confirmed", params=MetadataConfirmedParams)
def metadata_confirmed(spec: MetadataConfirmedParams, scope: Scope) -> CheckOutcome:
    """A finding's activation predicts a metadata column marked as artifact or protected."""
    rules = scope.ruleset.metadata
    auc_min = spec.auc_min if spec.auc_min is not None else rules.auc_min
    if spec.columns is not None:
        patterns = spec.columns
    else:  # the resolved roles (command line > rule file > data set) and forbidden concepts
        from clipaudit.gate.columns import judged_keys, key_views

        views = judged_keys(key_views(scope.result.columns, scope.ruleset), scope.ruleset,
                            scope.class_name)
        patterns = sorted({v.key for v in views} | {v.column for v in views if v.binary}
                          | {*rules.artifact_columns, *rules.protected_columns})
    if not patterns:
        return CheckOutcome([], "no artifact or protected columns declared", skipped=True)
    listed = _column_matcher(patterns)
    reliance_min = scope.ruleset.thresholds.reliance_min
    measured = _column_reliance(scope)
    violations, not_relied = [], []
    looked_at: set[str] = set()
    for f in scope.findings():
        scored = [(c, auc, max(auc, 1.0 - auc) if spec.symmetric else auc)
                  for c, auc in f.metadata_auc.items() if listed(c) and math.isfinite(auc)]
        looked_at.update(c for c, _, _ in scored)
        hits = sorted((s for s in scored if s[2] >= auc_min), key=lambda s: -s[2])
        if not hits:
            continue
        column, auc, strength = hits[0]
        what = f"{_label(f)} predicts {column} (AUC {auc:.3f}; trigger {auc_min:g})"
        r = measured.get(column)
        if r is not None and r.reliance is not None and r.reliance_low is not None \
                and r.reliance_low < reliance_min:
            # the causal test of the same column says the head does not measurably rely on
            # it: the component carries evidence, but moving the column does not move
            # predictions (the finding stays, and shortcut-share judges its share)
            not_relied.append(f"{what}, but putting {column} on the other classes' images "
                              f"costs the head {r.reliance:.3f} accuracy (at least "
                              f"{r.reliance_low:.3f}; limit {reliance_min:g})")
            continue
        violations.append(Violation(what, f, strength, auc_min))
    summary = (f"no finding predicts {', '.join(sorted(looked_at))} with AUC >= {auc_min:g}"
               if looked_at else f"no finding has a score for the listed columns "
               f"({', '.join(patterns)})")
    if not_relied and not violations:
        summary = "; ".join(not_relied)
    return CheckOutcome(violations, summary, {"auc_min": auc_min, "columns": patterns,
                                              "columns_scored": sorted(looked_at),
                                              "not_relied_on": not_relied})


def _column_reliance(scope: Scope) -> dict[str, ConceptReliance]:
    """This head's and class's measured reliance on each metadata column key."""
    from clipaudit.gate.trust_checks import _reliance_index

    if scope.head is None or scope.class_name is None:
        return {}
    return {concept: r for (source, concept), r in _reliance_index(scope).items()
            if source == "column" and r.status == "measured"}


# ------------------------------------------------------------------ baseline-regression


class BaselineRegressionParams(CheckSpec):
    """Fails when a finding is absent from the baseline audit (a new shortcut)."""

    min_share: Share = 0.0
    """Only new findings carrying at least this share count."""
    require_baseline: bool = False
    """Without a baseline: fail (true) or pass as skipped (false)."""


@register_check("baseline-regression", params=BaselineRegressionParams)
def baseline_regression(spec: BaselineRegressionParams, scope: Scope) -> CheckOutcome:
    """A finding is new: no component of the baseline audit matches it."""
    if scope.baseline is None:
        if spec.require_baseline:
            return CheckOutcome([Violation("no baseline audit given (require_baseline)")],
                                "no baseline audit")
        return CheckOutcome([], "no baseline audit given", skipped=True)
    violations, matches = [], []
    for f in scope.findings():
        match = scope.baseline.match(f)
        matches.append({"finding": f.id, **match.to_dict()})
        if not match.matched and f.gate_share >= spec.min_share:
            violations.append(Violation(
                f"new: {_label(f)} carries {f.share:.3f} and is not in baseline "
                f"{scope.baseline.baseline_id}", f, f.share, spec.min_share))
    n_known = sum(m["matched"] for m in matches)
    return CheckOutcome(
        violations, f"{n_known} of {len(matches)} finding(s) known in baseline "
        f"{scope.baseline.baseline_id} (matched by {scope.baseline.method})",
        {"baseline": scope.baseline.baseline_id, "method": scope.baseline.method,
         "matches": matches, "min_share": spec.min_share},
    )


# ------------------------------------------------------------------ permutation-control


class PermutationControlParams(CheckSpec):
    """Fails when the rules fail because of findings even with labels shuffled within the
    data: then chance alone fails classes with this model and data, and the audit's own
    failures are not evidence of a shortcut."""

    max_failing: Annotated[int, Field(ge=0)] = 0
    """Failing verdicts (about findings) the shuffled-label audit may have."""


@register_check("permutation-control", params=PermutationControlParams, scope="audit")
def permutation_control(spec: PermutationControlParams, scope: Scope) -> CheckOutcome:
    """With labels shuffled within the data, the rules would still fail on findings."""
    control = scope.result.permutation
    if control is None:
        return CheckOutcome([], "no permutation control was run", skipped=True)
    summary = (f"with shuffled labels: {control.n_findings} finding(s), {control.n_backed} backed "
               f"by the data, {control.n_failing} failing verdict(s) (limit {spec.max_failing})")
    violations = [] if control.n_failing <= spec.max_failing else [Violation(
        f"with labels shuffled within the data the rules still fail {control.n_failing} time(s) "
        f"({', '.join(control.failing[:3])}{', ...' if len(control.failing) > 3 else ''}): "
        "chance alone produces failures with this model and data", None,
        float(control.n_failing), float(spec.max_failing))]
    return CheckOutcome(violations, summary, {"n_findings": control.n_findings,
                                              "n_backed": control.n_backed,
                                              "n_failing": control.n_failing,
                                              "n_warnings": control.n_warnings,
                                              "max_failing": spec.max_failing})


from clipaudit.gate import check_vocabulary as _check_vocabulary  # noqa: E402,F401  (registers vocabulary-fit)
