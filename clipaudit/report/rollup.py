"""The report's roll-up for audits of many classes: what to show first, what in detail.

- per rule, how many heads and classes it failed, warned about and passed;
- per head, every class ranked by spurious share (status, findings, backed ones);
- the components that carry a large share of several classes' evidence;
- which classes get a detail section: all of a small head, else those with failing or
  warning verdicts, worst first, up to a limit (the PDF's is small);
- the statistics behind the verdict: bootstrap settings and the permutation control.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from clipaudit.report.model import (
    ClassRow,
    Num,
    ReliedRow,
    ReportConfig,
    RuleSummaryRow,
    StatisticsView,
    VerdictRow,
)
from clipaudit.results import AuditResult, ClassAudit, HeadAudit, Status

STATUS_ORDER: dict[str, int] = {"fail": 0, "warn": 1, "pass": 2}


def class_anchor(head: str, class_name: str) -> str:
    """An HTML id derived from (not made of) user text."""
    return "class-" + hashlib.sha256(f"{head}\0{class_name}".encode()).hexdigest()[:12]


def class_status(rows: Sequence[VerdictRow], head: str, class_name: str) -> Status:
    statuses = [r.status for r in rows
                if r.waived is None and r.head in ("", head) and r.class_name == class_name]
    return min(statuses, key=STATUS_ORDER.__getitem__, default="pass")


def class_statuses(rows: Sequence[VerdictRow], head: str) -> dict[str, Status]:
    """Worst unwaived status per class of ``head`` (classes without verdicts: absent)."""
    out: dict[str, Status] = {}
    for r in rows:
        if r.waived is None and r.head in ("", head) and r.class_name:
            known = out.get(r.class_name, "pass")
            out[r.class_name] = min(known, r.status, key=STATUS_ORDER.__getitem__)
    return out


def rule_summary(result: AuditResult) -> tuple[RuleSummaryRow, ...]:
    counts: dict[tuple[str, str], list[int]] = {}
    for v in result.verdicts:
        c = counts.setdefault((v.rule, v.check), [0, 0, 0, 0])
        if v.waived is not None:
            c[3] += 1
        else:
            c[STATUS_ORDER[v.status]] += 1
    return tuple(RuleSummaryRow(rule, check, *c) for (rule, check), c in counts.items())


def detail_classes(head: HeadAudit, statuses: dict[str, Status], config: ReportConfig,
                   print_mode: bool) -> tuple[list[ClassAudit], int]:
    """The classes shown in detail, and how many failing or warning ones are left out."""
    if len(head.classes) <= config.all_details_up_to:
        return list(head.classes), 0
    flagged = [c for c in head.classes if statuses.get(c.class_name, "pass") != "pass"]
    flagged.sort(key=lambda c: (STATUS_ORDER[statuses[c.class_name]], -c.spurious_share, c.class_name))
    limit = config.pdf_max_detail_classes if print_mode else config.max_detail_classes
    return flagged[:limit], max(0, len(flagged) - limit)


def class_rows(head: HeadAudit, statuses: dict[str, Status], detailed: set[str],
               pct: Any, accuracy: Any) -> tuple[ClassRow, ...]:
    """Every class, by spurious share (largest first), then status, then name."""
    found: dict[str, list[Any]] = {}
    for f in head.findings:
        found.setdefault(f.class_name, []).append(f)
    rows = [ClassRow(
        class_name=c.class_name, status=statuses.get(c.class_name, "pass"),
        n_instances=c.n_instances, accuracy=accuracy(c.accuracy),
        spurious_share=pct(c.spurious_share), unexplained_share=pct(c.unexplained_share),
        n_findings=len(found.get(c.class_name, [])),
        n_backed=sum(f.backed for f in found.get(c.class_name, [])),
        anchor=class_anchor(head.name, c.class_name) if c.class_name in detailed else None)
        for c in head.classes]
    rows.sort(key=lambda r: (-(r.spurious_share.value or 0.0), STATUS_ORDER[r.status], r.class_name))
    return tuple(rows)


def relied_rows(head: HeadAudit, pct: Any, limit: int) -> tuple[ReliedRow, ...]:
    return tuple(ReliedRow(component=r.component, concept=r.concept, n_classes=r.n_classes,
                           n_findings=r.n_findings, classes=", ".join(r.classes),
                           max_share=pct(r.max_share))
                 for r in head.relied_on[:limit])


def statistics_view(result: AuditResult) -> StatisticsView:
    findings = [f for h in result.heads for f in h.findings]
    stats = result.provenance.get("statistics") if isinstance(result.provenance, dict) else None
    stats = stats if isinstance(stats, dict) else {}
    control = result.permutation
    sentence = None
    if control is not None:
        sentence = (f"With labels shuffled within the data, the same audit finds "
                    f"{control.n_findings} finding(s), {control.n_backed} of them backed by the "
                    f"data, and {control.n_failing} failing verdict(s) on findings: what chance "
                    "alone produces with this model and data.")
    return StatisticsView(
        n_findings=len(findings), n_backed=sum(f.backed for f in findings),
        resamples=str(stats.get("resamples", "—")),
        level=f"{100 * float(stats['level']):g}%" if "level" in stats else "—",
        fdr=f"{100 * float(stats['fdr']):g}%" if "fdr" in stats else "5%",
        permutation=sentence,
        permutation_failing=control.n_failing if control is not None else None)


def no_value() -> Num:
    return Num("—", None)
