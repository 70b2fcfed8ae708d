"""AuditResult -> ReportData: every number formatted, every chart drawn, every image inlined.

This is the only place the report computes anything; templates lay out what it returns.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from clipaudit._version import __version__
from clipaudit.report.images import thumbnail_data_uri
from clipaudit.report.model import (
    AblationView,
    AucRow,
    ClassSection,
    ComparisonCell,
    ComparisonRow,
    CurveRow,
    FindingCard,
    FindingRow,
    HeadSection,
    KeyValue,
    Num,
    ReportConfig,
    ReportData,
    SliceRow,
    Thumbnail,
    VerdictRow,
)
from clipaudit.report.svg import ScatterPoint, Series, line_chart_svg, scatter_svg
from clipaudit.results import (
    AblationEffect,
    AuditResult,
    ClassAudit,
    Finding,
    HeadAudit,
    InstanceInfo,
    Status,
)

_STATUS_ORDER: dict[str, int] = {"fail": 0, "warn": 1, "pass": 2}
STRONG_AUC = 0.8
"""An AUC this far from chance (>= 0.8 or <= 0.2) is highlighted as confirming metadata."""
# Provenance keys shown first, in this order; the rest follow alphabetically.
_PROVENANCE_ORDER = ("backbone", "hook", "sae", "heads", "probe", "prompt_set", "data_sha256",
                     "data_hash", "cache", "reference", "vocabularies", "rules", "seed", "date",
                     "clipaudit_version")


# ------------------------------------------------------------------ formatting

def num(value: float | None, spec: str = ".3f") -> Num:
    if value is None:
        return Num("n/a", None)
    if not math.isfinite(value):
        return Num(str(value), None)
    return Num(format(value, spec), float(value))


def pct(value: float | None) -> Num:
    if value is None or not math.isfinite(value):
        return num(value)
    return Num(f"{100 * value:.1f}%", float(value))


def _accuracy(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _before_after(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{_accuracy(before)} → {_accuracy(after)}"


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


# ------------------------------------------------------------------ verdicts

def _verdict_rows(result: AuditResult) -> tuple[VerdictRow, ...]:
    rows = [VerdictRow(status=v.status, rule=v.rule, check=v.check, head=v.head or "",
                       class_name=v.class_name or "", message=v.message, waived=v.waived)
            for v in result.verdicts]
    rows.sort(key=lambda r: (r.waived is not None, _STATUS_ORDER[r.status], r.rule, r.head,
                             r.class_name))
    return tuple(rows)


def _class_status(rows: Iterable[VerdictRow], head: str, class_name: str) -> Status:
    statuses = [r.status for r in rows
                if r.waived is None and r.head in ("", head) and r.class_name == class_name]
    return min(statuses, key=_STATUS_ORDER.__getitem__, default="pass")


# ------------------------------------------------------------------ findings

def card_anchor(finding: Finding) -> str:
    """An HTML id derived from (not made of) the finding id: user text never becomes an id."""
    return "finding-" + hashlib.sha256(finding.id.encode()).hexdigest()[:12]


def _best_auc(finding: Finding) -> tuple[str, Num]:
    if not finding.metadata_auc:
        return "", Num("n/a", None)
    column, auc = max(finding.metadata_auc.items(), key=lambda kv: abs(kv[1] - 0.5))
    return column, num(auc, ".2f")


def _alignment(finding: Finding) -> Num:
    """The raw alignment (the paper's), with the calibrated one findings are decided on."""
    raw = num(finding.alignment, "+.3f")
    if finding.calibrated_alignment is None or raw.value is None:
        return raw
    return Num(f"{raw.text} (calibrated {finding.calibrated_alignment:.2f})", raw.value)


def _finding_row(finding: Finding, anchor: str) -> FindingRow:
    column, auc = _best_auc(finding)
    return FindingRow(
        anchor=anchor, head=finding.head, class_name=finding.class_name, rank=finding.rank,
        component=finding.component, kind=finding.kind, concept=finding.concept,
        concept_score=num(finding.concept_score), share=pct(finding.share),
        alignment=_alignment(finding), clarity=num(finding.clarity, ".2f"),
        best_auc_column=column, best_auc=auc,
        score_delta=num(finding.ablation.score_delta if finding.ablation else None, "+.3f"),
    )


def _ablation_view(effect: AblationEffect | None) -> AblationView | None:
    if effect is None:
        return None
    slices = tuple(
        SliceRow(slice=f"{s.column}={s.value}", n=s.n, score_delta=num(s.score_delta, "+.3f"),
                 accuracy=_before_after(s.accuracy_before, s.accuracy_after), flipped=s.flipped)
        for s in effect.slices)
    return AblationView(score_delta=num(effect.score_delta, "+.3f"),
                        accuracy=_before_after(effect.accuracy_before, effect.accuracy_after),
                        flipped=effect.flipped, slices=slices)


class _Thumbnails:
    """Inlines each instance's thumbnail once, however many cards show it."""

    def __init__(self, result: AuditResult, audit_dpath: Path, px: int):
        self._instances: Mapping[int, InstanceInfo] = {i.id: i for i in result.instances}
        self._audit_dpath, self._px = audit_dpath, px
        self._cache: dict[int, Thumbnail] = {}

    def __call__(self, instance_id: int) -> Thumbnail:
        if instance_id not in self._cache:
            info = self._instances.get(instance_id)
            if info is None:
                thumb = Thumbnail(src=None, caption=f"#{instance_id}", title="unknown instance")
            else:
                src = (thumbnail_data_uri(self._audit_dpath, info.thumbnail, self._px)
                       if info.thumbnail else None)
                thumb = Thumbnail(src=src, caption=info.label or f"#{info.id}", title=info.path)
            self._cache[instance_id] = thumb
        return self._cache[instance_id]


def _finding_card(finding: Finding, anchor: str, thumbs: _Thumbnails,
                  config: ReportConfig) -> FindingCard:
    aucs = sorted(finding.metadata_auc.items(), key=lambda kv: -abs(kv[1] - 0.5))
    return FindingCard(
        anchor=anchor, id=finding.id, head=finding.head, class_name=finding.class_name,
        component=finding.component, kind=finding.kind, rank=finding.rank,
        concept=finding.concept, concept_score=num(finding.concept_score),
        share=pct(finding.share),
        concept_share=pct(finding.concept_share) if finding.concept_split else None,
        alignment=_alignment(finding), clarity=num(finding.clarity, ".2f"),
        thumbnails=tuple(thumbs(i) for i in finding.top_instances[:config.thumbnails_per_finding]),
        metadata_aucs=tuple(AucRow(column=c, auc=num(a, ".2f"),
                                   strong=a >= STRONG_AUC or a <= 1 - STRONG_AUC)
                            for c, a in aucs),
        ablation=_ablation_view(finding.ablation),
    )


# ------------------------------------------------------------------ per head and class

def _scatter_points(cls: ClassAudit, findings: list[Finding],
                    max_points: int) -> tuple[list[ScatterPoint], int]:
    # A finding is drawn from its own numbers (they are what the rules judged), and
    # drawn even when the audit recorded only some of the class's components.
    points = [ScatterPoint(f.component, f.share, f.alignment, f.clarity, f.concept, True)
              for f in findings]
    flagged = {f.component for f in findings}
    points += [ScatterPoint(p.component, p.share, p.alignment, p.clarity, p.concept, False)
               for p in cls.components if p.component not in flagged]
    total = len(points)
    if total > max_points:
        points.sort(key=lambda p: (not p.is_finding, -abs(p.share) if math.isfinite(p.share)
                                   else 0.0))
        points = points[:max(max_points, len(flagged))]
    return points, total


def _class_section(head: HeadAudit, cls: ClassAudit, verdicts: tuple[VerdictRow, ...],
                   thumbs: _Thumbnails, config: ReportConfig) -> ClassSection:
    findings = sorted((f for f in head.findings if f.class_name == cls.class_name),
                      key=lambda f: f.rank)
    points, total = _scatter_points(cls, findings, config.max_scatter_points)
    return ClassSection(
        class_name=cls.class_name, status=_class_status(verdicts, head.name, cls.class_name),
        n_instances=cls.n_instances, accuracy=_accuracy(cls.accuracy),
        spurious_share=pct(cls.spurious_share), unexplained_share=pct(cls.unexplained_share),
        n_components=total, n_points_shown=len(points),
        scatter_svg=scatter_svg(points, cls.class_name),
        cards=tuple(_finding_card(f, card_anchor(f), thumbs, config) for f in findings),
    )


def _head_section(head: HeadAudit, head_index: int, verdicts: tuple[VerdictRow, ...],
                  thumbs: _Thumbnails, config: ReportConfig) -> HeadSection:
    curves = head.faithfulness
    svg = None
    if curves:
        svg = line_chart_svg(
            [Series(c.method, [float(s) for s in c.steps], c.scores) for c in curves],
            x_label="components removed", y_label="mean class score",
            title=f"Faithfulness deletion curves for head {head.name}")
    return HeadSection(
        anchor=f"head-{head_index}", name=head.name, kind=head.kind,
        accuracy=_accuracy(head.accuracy), n_findings=len(head.findings),
        classes=tuple(_class_section(head, c, verdicts, thumbs, config) for c in head.classes),
        faithfulness_svg=svg,
        faithfulness_rows=tuple(CurveRow(method=c.method, auc=num(c.auc),
                                         final_score=num(c.scores[-1] if c.scores else None))
                                for c in curves),
    )


def _comparison(result: AuditResult) -> tuple[tuple[str, ...], tuple[ComparisonRow, ...]]:
    if len(result.heads) < 2:
        return (), ()
    names = _class_names(result)
    rows = []
    for name in names:
        cells: list[ComparisonCell | None] = []
        for head in result.heads:
            cls = next((c for c in head.classes if c.class_name == name), None)
            n = sum(f.class_name == name for f in head.findings)
            cells.append(None if cls is None else ComparisonCell(pct(cls.spurious_share), n))
        rows.append(ComparisonRow(class_name=name, cells=tuple(cells)))
    return tuple(h.name for h in result.heads), tuple(rows)


def _class_names(result: AuditResult) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for head in result.heads:
        for name in [*head.class_names, *(c.class_name for c in head.classes)]:
            seen.setdefault(name, None)
    return tuple(seen)


def _flatten(prefix: str, value: Any) -> list[KeyValue]:
    if isinstance(value, Mapping) and value:
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}", v)]
    if isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
        return [kv for i, v in enumerate(value) for kv in _flatten(f"{prefix}[{i}]", v)]
    return [KeyValue(prefix, _plain(value))]


def provenance_rows(provenance: Mapping[str, Any]) -> tuple[KeyValue, ...]:
    """Nested provenance as ``a.b.c = value`` rows, the well-known keys first."""
    order = {k: i for i, k in enumerate(_PROVENANCE_ORDER)}
    keys = sorted(provenance, key=lambda k: (order.get(k, len(order)), k))
    return tuple(kv for k in keys for kv in _flatten(str(k), provenance[k]))


def build_report_data(result: AuditResult, audit_dpath: Path | str,
                      config: ReportConfig | None = None) -> ReportData:
    """Everything the report shows, computed from a finished audit and its thumbnails."""
    config = config or ReportConfig()
    thumbs = _Thumbnails(result, Path(audit_dpath), config.thumbnail_px)
    verdicts = _verdict_rows(result)
    finding_rows = tuple(_finding_row(f, card_anchor(f))
                         for head in result.heads
                         for f in sorted(head.findings, key=lambda f: (f.class_name, f.rank)))
    comparison_heads, comparison_rows = _comparison(result)
    return ReportData(
        audit_id=result.audit_id, verdict=result.verdict,
        reasons=tuple(r for r in verdicts if r.waived is None and r.status != "pass"),
        verdict_rows=verdicts, finding_rows=finding_rows, class_names=_class_names(result),
        heads=tuple(_head_section(h, i, verdicts, thumbs, config)
                    for i, h in enumerate(result.heads)),
        comparison_heads=comparison_heads, comparison_rows=comparison_rows,
        sae_metrics=tuple(KeyValue(k, _plain(v)) for k, v in sorted(result.sae_metrics.items())),
        provenance=provenance_rows(result.provenance),
        rules_file=result.rules_file, clipaudit_version=__version__,
    )
