"""What a report shows: typed, frozen and precomputed, so templates only lay it out.

Every number is formatted here (``Num.text``) and kept raw for sorting
(``Num.value``). Text fields are plain user data: the templates escape them.
The only markup fields are the SVG charts, built from escaped text in ``svg.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup

from clipaudit.results import Status


@dataclass(frozen=True)
class ReportConfig:
    """How much of an audit goes into a report (a knob for the report's size)."""

    thumbnail_px: int = 128
    """Longest side of an inlined thumbnail (and heatmap overlay), in pixels."""
    thumbnails_per_finding: int = 6
    """Top images shown on each finding card."""
    max_scatter_points: int = 400
    """Components drawn per class scatter: every finding plus the largest |share| ones."""


@dataclass(frozen=True)
class Num:
    """A number as shown (``text``) and as sorted (``value``; None sorts last)."""

    text: str
    value: float | None


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str


@dataclass(frozen=True)
class VerdictRow:
    status: Status
    rule: str
    check: str
    head: str
    """Empty when the rule is not about one head."""
    class_name: str
    """Empty when the rule is not about one class."""
    message: str
    waived: str | None
    """The waiver's reason: a waived row does not count towards the verdict."""
    not_evaluated: bool = False
    """The class had too few audited instances for the rule to judge it."""


@dataclass(frozen=True)
class NotEvaluatedRow:
    """A head's class that no rule judged (fewer audited instances than the minimum)."""

    status: Status
    head: str
    class_name: str
    n_instances: int
    min_instances: int


@dataclass(frozen=True)
class FindingRow:
    """One line of the findings summary table."""

    anchor: str
    """HTML id of the finding's card."""
    head: str
    class_name: str
    rank: int
    component: int
    kind: str
    concept: str
    concept_score: Num
    share: Num
    alignment: Num
    clarity: Num
    best_auc_column: str
    best_auc: Num
    score_delta: Num


@dataclass(frozen=True)
class Thumbnail:
    src: str | None
    """A ``data:`` URI, or None when the image file is missing or unreadable."""
    caption: str
    """The instance's label (or its id when unlabelled)."""
    title: str
    """The instance's path."""
    overlay: str | None = None
    """A ``data:`` URI of the finding component's heatmap over the image, or None."""


@dataclass(frozen=True)
class AucRow:
    column: str
    auc: Num
    strong: bool
    """The activation separates the column's values well (AUC far from 0.5)."""


@dataclass(frozen=True)
class SliceRow:
    slice: str
    n: int
    score_delta: Num
    accuracy: str
    flipped: int


@dataclass(frozen=True)
class AblationView:
    score_delta: Num
    accuracy: str
    """``before → after``, or n/a without labels."""
    flipped: int
    slices: tuple[SliceRow, ...]


@dataclass(frozen=True)
class FindingCard:
    anchor: str
    id: str
    head: str
    class_name: str
    component: int
    kind: str
    rank: int
    concept: str
    concept_score: Num
    share: Num
    concept_share: Num | None
    """Share of the class's findings with this concept label together; None when this
    finding is the only one."""
    alignment: Num
    clarity: Num
    thumbnails: tuple[Thumbnail, ...]
    has_heatmaps: bool
    """At least one thumbnail carries a heatmap overlay."""
    metadata_aucs: tuple[AucRow, ...]
    ablation: AblationView | None


@dataclass(frozen=True)
class ClassSection:
    class_name: str
    status: Status
    """Worst unwaived verdict about this head and class (pass when none)."""
    n_instances: int
    accuracy: str
    spurious_share: Num
    unexplained_share: Num
    n_components: int
    n_points_shown: int
    scatter_svg: Markup
    cards: tuple[FindingCard, ...]


@dataclass(frozen=True)
class CurveRow:
    method: str
    auc: Num
    final_score: Num


@dataclass(frozen=True)
class HeadSection:
    anchor: str
    name: str
    kind: str
    accuracy: str
    n_findings: int
    classes: tuple[ClassSection, ...]
    faithfulness_svg: Markup | None
    faithfulness_rows: tuple[CurveRow, ...]


@dataclass(frozen=True)
class ComparisonCell:
    spurious_share: Num
    n_findings: int


@dataclass(frozen=True)
class ComparisonRow:
    class_name: str
    cells: tuple[ComparisonCell | None, ...]
    """One per ``ReportData.comparison_heads``; None where that head lacks the class."""


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, computed once from an ``AuditResult``."""

    audit_id: str
    verdict: Status
    reasons: tuple[VerdictRow, ...]
    """The unwaived fail and warn rows: why the verdict is what it is (classes not
    evaluated are listed in ``not_evaluated`` instead, once per class)."""
    verdict_rows: tuple[VerdictRow, ...]
    finding_rows: tuple[FindingRow, ...]
    class_names: tuple[str, ...]
    """Every class of every head, in first-seen order (the filter's options)."""
    heads: tuple[HeadSection, ...]
    comparison_heads: tuple[str, ...]
    """Empty unless at least two heads were audited."""
    comparison_rows: tuple[ComparisonRow, ...]
    sae_metrics: tuple[KeyValue, ...]
    provenance: tuple[KeyValue, ...]
    rules_file: str | None
    heatmap_note: str
    any_heatmaps: bool
    """Some finding card shows heatmap overlays."""
    """How the findings' heatmaps were made, or why there are none (empty: the audit
    predates heatmaps or had them turned off)."""
    clipaudit_version: str
    """The version that rendered the report (the audit's own is in ``provenance``)."""
    not_evaluated: tuple[NotEvaluatedRow, ...] = ()
    """Classes no rule judged, shown beside the verdict."""

    @property
    def not_evaluated_status(self) -> Status:
        """The worst status among ``not_evaluated`` (pass when all were waived)."""
        statuses = {c.status for c in self.not_evaluated}
        return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"
