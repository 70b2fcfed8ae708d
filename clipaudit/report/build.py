"""AuditResult -> ReportData: every number formatted, every chart drawn, every image inlined.

This is the only place the report computes anything; templates lay out what it returns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from markupsafe import Markup

from clipaudit._version import __version__
from clipaudit.report import rollup
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
    NotEvaluatedRow,
    Num,
    ReportConfig,
    ReportData,
    RuleCount,
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

_STATUS_ORDER = rollup.STATUS_ORDER
RELIED_ROWS = 20
"""Components listed in each head's "relied on by many classes" table."""
STRONG_AUC = 0.8
"""An AUC this far from chance (>= 0.8 or <= 0.2) is highlighted as confirming metadata."""
# Provenance keys shown first, in this order; the rest follow alphabetically.
_SAFE_URI = re.compile(r"data:image/(png|jpeg|webp);base64,[A-Za-z0-9+/=]+")
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
    from clipaudit.gate.engine import is_not_evaluated

    rows = [VerdictRow(status=v.status, rule=v.rule, check=v.check, head=v.head or "",
                       class_name=v.class_name or "", message=v.message, waived=v.waived,
                       not_evaluated=is_not_evaluated(v))
            for v in result.verdicts]
    rows.sort(key=lambda r: (r.waived is not None, _STATUS_ORDER[r.status], r.rule, r.head,
                             r.class_name))
    return tuple(rows)


def _reasons(rows: tuple[VerdictRow, ...],
             config: ReportConfig) -> tuple[tuple[VerdictRow, ...], tuple[RuleCount, ...]]:
    """The reasons listed under the verdict (rows in their order, at most
    ``max_reasons_per_rule`` of a rule, ``max_reasons`` in all) and, per rule, how many
    of its rows are not listed."""
    shown: list[VerdictRow] = []
    per_rule: dict[str, list[int]] = {}  # rule -> [listed, total]
    worst: dict[str, Status] = {}
    for r in rows:
        counts = per_rule.setdefault(r.rule, [0, 0])
        counts[1] += 1
        worst.setdefault(r.rule, r.status)  # rows come worst first
        if counts[0] < config.max_reasons_per_rule and len(shown) < config.max_reasons:
            counts[0] += 1
            shown.append(r)
    more = tuple(RuleCount(worst[rule], rule, total - listed)
                 for rule, (listed, total) in per_rule.items() if total > listed)
    return tuple(shown), more


def _not_evaluated_rows(result: AuditResult) -> tuple[NotEvaluatedRow, ...]:
    from clipaudit.gate.engine import not_evaluated_classes

    return tuple(NotEvaluatedRow(status=c.status, head=c.head, class_name=c.class_name,  # type: ignore[arg-type]
                                 n_instances=c.n_instances, min_instances=c.min_instances)
                 for c in not_evaluated_classes(result.verdicts))


def _class_status(rows: Iterable[VerdictRow], head: str, class_name: str) -> Status:
    return rollup.class_status(list(rows), head, class_name)


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


def _finding_row(finding: Finding, anchor: str | None) -> FindingRow:
    column, auc = _best_auc(finding)
    return FindingRow(
        anchor=anchor, head=finding.head, class_name=finding.class_name, rank=finding.rank,
        component=finding.component, kind=finding.kind, concept=finding.concept,
        concept_score=num(finding.concept_score), share=pct(finding.share),
        alignment=_alignment(finding), clarity=num(finding.clarity, ".2f"),
        best_auc_column=column, best_auc=auc,
        score_delta=num(finding.ablation.score_delta if finding.ablation else None, "+.3f"),
        interval=_interval_text(finding), chance=pct(finding.chance_share), backed=finding.backed,
    )


def _interval_text(finding: Finding) -> str:
    """The share's interval (and the concept share's, when split), in percent."""
    def text(ci: list[float] | None) -> str:
        return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]%" if ci else ""

    share = text(finding.share_ci)
    if finding.concept_split and finding.concept_share_ci:
        return f"{share} (together {text(finding.concept_share_ci)})".strip()
    return share


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
    """Inlines each image once, however many cards show it: each instance's thumbnail
    and each (component, instance) heatmap overlay the audit wrote are read once, and
    identical images (a component that is a finding of two heads shows the same
    overlays on both cards) share one CSS class."""

    def __init__(self, result: AuditResult, audit_dpath: Path, px: int, for_print: bool):
        self._instances: Mapping[int, InstanceInfo] = {i.id: i for i in result.instances}
        self._overlays = {(c.component, h.instance): h.overlay
                          for c in result.components for h in c.heatmaps}
        self._audit_dpath, self._px, self._for_print = audit_dpath, px, for_print
        self._cache: dict[int, Thumbnail] = {}
        self._overlay_cache: dict[tuple[int, int], str | None] = {}
        self._keys: dict[str, str] = {}  # data: URI -> CSS class

    def _uri(self, rel_path: str) -> str | None:
        return thumbnail_data_uri(self._audit_dpath, rel_path, self._px, for_print=self._for_print)

    def _key(self, uri: str | None) -> str:
        return "" if uri is None else self._keys.setdefault(uri, f"im-{len(self._keys)}")

    def __call__(self, instance_id: int, component: int | None = None) -> Thumbnail:
        if instance_id not in self._cache:
            info = self._instances.get(instance_id)
            if info is None:
                thumb = Thumbnail(src=None, key="", caption=f"#{instance_id}", title="unknown instance")
            else:
                src = self._uri(info.thumbnail) if info.thumbnail else None
                thumb = Thumbnail(src=src, key=self._key(src), caption=info.label or f"#{info.id}",
                                  title=info.path)
            self._cache[instance_id] = thumb
        thumb = self._cache[instance_id]
        pair = (component, instance_id) if component is not None else None
        if pair is None or pair not in self._overlays:
            return thumb
        if pair not in self._overlay_cache:
            self._overlay_cache[pair] = self._uri(self._overlays[pair])
        overlay = self._overlay_cache[pair]
        if overlay is None:
            return thumb
        return dataclasses.replace(thumb, overlay=overlay, overlay_key=self._key(overlay))

    def css(self) -> Markup:
        """One rule per image shown: ``.im-N{background-image:url(data:...)}``. The URIs
        are built here from base64 (``[A-Za-z0-9+/=]``), so they cannot close the rule."""
        rules = [f".{key}{{background-image:url({uri})}}" for uri, key in self._keys.items()
                 if _SAFE_URI.fullmatch(uri)]
        return Markup("\n".join(rules))


def _finding_card(finding: Finding, anchor: str, thumbs: _Thumbnails,
                  config: ReportConfig) -> FindingCard:
    aucs = sorted(finding.metadata_auc.items(), key=lambda kv: -abs(kv[1] - 0.5))
    shown = tuple(thumbs(i, finding.component)
                  for i in finding.top_instances[:config.thumbnails_per_finding])
    return FindingCard(
        anchor=anchor, id=finding.id, head=finding.head, class_name=finding.class_name,
        component=finding.component, kind=finding.kind, rank=finding.rank,
        concept=finding.concept, concept_score=num(finding.concept_score),
        share=pct(finding.share),
        concept_share=pct(finding.concept_share) if finding.concept_split else None,
        alignment=_alignment(finding), clarity=num(finding.clarity, ".2f"),
        interval=_interval_text(finding), chance=pct(finding.chance_share),
        p_value="n/a" if finding.p_value is None else f"{finding.p_value:.2g}", backed=finding.backed,
        thumbnails=shown, has_heatmaps=any(t.overlay for t in shown),
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
                   thumbs: _Thumbnails, config: ReportConfig, max_points: int,
                   carded: set[str] | None = None) -> ClassSection:
    """``carded``: the ids of the findings that get a card (None: every one)."""
    findings = sorted((f for f in head.findings if f.class_name == cls.class_name),
                      key=lambda f: f.rank)
    points, total = _scatter_points(cls, findings, max_points)
    shown = [f for f in findings if carded is None or f.id in carded]
    return ClassSection(
        anchor=rollup.class_anchor(head.name, cls.class_name), class_name=cls.class_name,
        status=_class_status(verdicts, head.name, cls.class_name),
        n_instances=cls.n_instances, accuracy=_accuracy(cls.accuracy),
        spurious_share=pct(cls.spurious_share), unexplained_share=pct(cls.unexplained_share),
        n_components=total, n_points_shown=len(points),
        scatter_svg=scatter_svg(points, cls.class_name),
        cards=tuple(_finding_card(f, card_anchor(f), thumbs, config) for f in shown),
        n_cards_left_out=len(findings) - len(shown),
    )


def _pdf_cards(head: HeadAudit, detailed: list[ClassAudit], budget: int) -> set[str]:
    """The findings of the detail sections that get a card in the PDF: backed ones first,
    then the rest, each in the sections' order and by rank."""
    order = {c.class_name: i for i, c in enumerate(detailed)}
    findings = sorted((f for f in head.findings if f.class_name in order),
                      key=lambda f: (not f.backed, order[f.class_name], f.rank))
    return {f.id for f in findings[:budget]}


def _head_section(head: HeadAudit, head_index: int, verdicts: tuple[VerdictRow, ...],
                  thumbs: _Thumbnails, config: ReportConfig, print_mode: bool) -> HeadSection:
    curves = head.faithfulness
    svg = None
    if curves:
        svg = line_chart_svg(
            [Series(c.method, [float(s) for s in c.steps], c.scores) for c in curves],
            x_label="components removed", y_label="mean class score",
            title=f"Faithfulness deletion curves for head {head.name}")
    statuses = rollup.class_statuses(verdicts, head.name)
    detailed, left_out = rollup.detail_classes(head, statuses, config, print_mode)
    max_points = max(40, min(config.max_scatter_points,
                             config.scatter_points_total // max(1, len(detailed))))
    rows = rollup.class_rows(head, statuses, {c.class_name for c in detailed}, pct, _accuracy_num)
    carded = _pdf_cards(head, detailed, config.pdf_max_cards) if print_mode else None
    return HeadSection(
        anchor=f"head-{head_index}", name=head.name, kind=head.kind,
        accuracy=_accuracy(head.accuracy), n_findings=len(head.findings),
        n_backed=sum(f.backed for f in head.findings),
        classes=tuple(_class_section(head, c, verdicts, thumbs, config, max_points, carded)
                      for c in detailed),
        class_rows=rows[:config.pdf_max_rows] if print_mode else rows, n_classes=len(head.classes),
        n_details_left_out=left_out,
        relied_rows=rollup.relied_rows(head, pct, RELIED_ROWS),
        faithfulness_svg=svg,
        faithfulness_rows=tuple(CurveRow(method=c.method, auc=num(c.auc),
                                         final_score=num(c.scores[-1] if c.scores else None))
                                for c in curves),
    )


def _accuracy_num(value: float | None) -> Num:
    return pct(value)


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


def _heatmap_note(result: AuditResult) -> str:
    info = result.heatmaps
    if info is None:
        return ""
    if info.method is None:
        return f"No heatmaps: {info.note}"
    return f"Heatmaps show where each finding's component fires in its top images ({info.note})."


def build_report_data(result: AuditResult, audit_dpath: Path | str,
                      config: ReportConfig | None = None, *, print_mode: bool = False) -> ReportData:
    """Everything the report shows, computed from a finished audit and its thumbnails.
    ``print_mode``: for the PDF, long tables cut to ``config.pdf_max_rows`` and fewer
    detail sections (the HTML report and audit.json keep everything)."""
    config = config or ReportConfig()
    thumbs = _Thumbnails(result, Path(audit_dpath), config.thumbnail_px, print_mode)
    verdicts = _verdict_rows(result)
    heads = tuple(_head_section(h, i, verdicts, thumbs, config, print_mode)
                  for i, h in enumerate(result.heads))
    carded = {c.anchor for h in heads for cls in h.classes for c in cls.cards}
    findings = sorted((f for head in result.heads for f in head.findings),
                      key=lambda f: (not f.backed, -f.gate_share, f.class_name, f.rank))
    if not print_mode and len(findings) <= config.all_details_up_to * 4:
        findings.sort(key=lambda f: (result.heads.index(result.head(f.head)), f.class_name, f.rank))
    finding_rows = tuple(_finding_row(f, card_anchor(f) if card_anchor(f) in carded else None)
                         for f in findings)
    reasons = tuple(r for r in verdicts if r.waived is None and r.status != "pass" and not r.not_evaluated)
    shown, more = _reasons(reasons, config)
    listed = verdicts if len(verdicts) <= config.max_verdict_rows else tuple(
        r for r in verdicts if r.status != "pass" or r.waived is not None)
    comparison_heads, comparison_rows = _comparison(result)
    cut = config.pdf_max_rows if print_mode else None
    finding_cut = config.pdf_max_rows if print_mode else config.max_finding_rows
    if print_mode:
        comparison_rows = tuple(sorted(comparison_rows, key=lambda r: -max(
            (c.spurious_share.value or 0.0) for c in r.cells if c is not None)
            if any(c is not None for c in r.cells) else 0.0))
    return ReportData(
        audit_id=result.audit_id, verdict=result.verdict,
        reasons=shown, n_reasons=len(reasons), reasons_more=more,
        not_evaluated=_not_evaluated_rows(result),
        verdict_rows=listed[:cut], n_verdicts=len(verdicts),
        rule_summary=rollup.rule_summary(result), statistics=rollup.statistics_view(result),
        finding_rows=finding_rows[:finding_cut], n_findings=len(findings),
        class_names=_class_names(result) if len(_class_names(result)) <= 300 else (),
        heads=heads,
        comparison_heads=comparison_heads, comparison_rows=comparison_rows[:cut],
        n_comparison_rows=len(comparison_rows), thumbnail_css=thumbs.css(), print_mode=print_mode,
        sae_metrics=tuple(KeyValue(k, _plain(v)) for k, v in sorted(result.sae_metrics.items())),
        provenance=provenance_rows(result.provenance),
        rules_file=result.rules_file, heatmap_note=_heatmap_note(result),
        any_heatmaps=any(card.has_heatmaps for h in heads for cls in h.classes for card in cls.cards),
        clipaudit_version=__version__,
    )
