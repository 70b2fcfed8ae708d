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
    scatter_points_total: int = 8000
    """Scatter points shared by all class sections (each draws at least 40)."""
    all_details_up_to: int = 12
    """A head with at most this many classes gets a detail section for every class; one
    with more, only for the classes with failing or warning verdicts."""
    max_detail_classes: int = 100
    """Detail sections per head in the HTML report (worst verdicts first)."""
    pdf_max_detail_classes: int = 15
    """Detail sections per head in the PDF (the HTML report and audit.json hold the rest)."""
    pdf_max_cards: int = 20
    """Finding cards per head in the PDF, over its detail sections: backed findings first,
    then the others in the sections' order (a card with its metadata slices fills a page;
    the findings table and report.html list every finding)."""
    pdf_max_rows: int = 40
    """Rows of each long table (classes, findings, verdicts, comparison) in the PDF."""
    max_reasons: int = 20
    """Failing and warning verdicts listed under the verdict."""
    max_reasons_per_rule: int = 3
    """Of those, at most this many per rule (a rule that warns on 900 classes gets a line
    with its count instead of filling the list)."""
    max_finding_rows: int = 1000
    """Findings listed in the HTML report: backed ones first, then by the lower bound of
    their share (audit.json holds every one)."""
    max_verdict_rows: int = 300
    """Up to this many verdicts the HTML lists every one; beyond, only the failing,
    warning and waived ones (each class's status is in the class table)."""


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
class RuleCount:
    status: Status
    rule: str
    n: int


@dataclass(frozen=True)
class NotEvaluatedRow:
    """A head's class that no rule judged (fewer audited instances than the minimum)."""

    status: Status
    head: str
    class_name: str
    n_instances: int
    min_instances: int


@dataclass(frozen=True)
class RuleSummaryRow:
    """How one rule fared over every head and class it judged."""

    rule: str
    check: str
    n_fail: int
    n_warn: int
    n_pass: int
    n_waived: int


@dataclass(frozen=True)
class ClassRow:
    """One class in a head's roll-up table."""

    class_name: str
    status: Status
    n_instances: int
    accuracy: Num
    spurious_share: Num
    unexplained_share: Num
    n_findings: int
    n_backed: int
    """Findings backed by the data (``Finding.backed``)."""
    anchor: str | None
    """HTML id of the class's detail section (None: no detail section)."""


@dataclass(frozen=True)
class ReliedRow:
    """A component that carries a large share of several classes' evidence."""

    component: int
    concept: str
    n_classes: int
    n_findings: int
    classes: str
    """The classes it carries most of, comma-separated (user text)."""
    max_share: Num


@dataclass(frozen=True)
class StatisticsView:
    """The statistics behind the verdict: intervals and the permutation control."""

    n_findings: int
    n_backed: int
    resamples: str
    level: str
    fdr: str
    permutation: str | None
    """One sentence on the shuffled-label control (None: not run)."""
    permutation_failing: int | None


@dataclass(frozen=True)
class FindingRow:
    """One line of the findings summary table."""

    anchor: str | None
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
    interval: str
    """``[low, high]`` of the share (concept share for split concepts), or empty."""
    chance: Num
    backed: bool


@dataclass(frozen=True)
class Thumbnail:
    src: str | None
    """A ``data:`` URI, or None when the image file is missing or unreadable."""
    key: str
    """CSS class that shows this image (``ReportData.thumbnail_css``): each image is
    inlined once however many cards show it ("" without an image)."""
    caption: str
    """The instance's label (or its id when unlabelled)."""
    title: str
    """The instance's path."""
    overlay: str | None = None
    """A ``data:`` URI of the finding component's heatmap over the image, or None."""
    overlay_key: str | None = None
    """CSS class that shows ``overlay`` (inlined once, like ``key``), or None."""


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
    interval: str
    """Bootstrap interval of the share (and of the concept share when split), or empty."""
    chance: Num
    """The concept share over all data (a random sample of it)."""
    p_value: str
    backed: bool
    thumbnails: tuple[Thumbnail, ...]
    has_heatmaps: bool
    """At least one thumbnail carries a heatmap overlay."""
    metadata_aucs: tuple[AucRow, ...]
    ablation: AblationView | None


@dataclass(frozen=True)
class ClassSection:
    anchor: str
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
    n_cards_left_out: int = 0
    """Findings of this class without a card here (the PDF's card budget)."""


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
    n_backed: int
    classes: tuple[ClassSection, ...]
    """Detail sections: every class of a small head, else the classes that fail or warn."""
    class_rows: tuple[ClassRow, ...]
    """Every class (the PDF: the first ``pdf_max_rows``), by spurious share."""
    n_classes: int
    n_details_left_out: int
    """Classes that fail or warn without a detail section here (see the HTML, audit.json)."""
    relied_rows: tuple[ReliedRow, ...]
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
    """The unwaived fail and warn rows: why the verdict is what it is (the first few;
    classes not evaluated are listed in ``not_evaluated`` instead, once per class)."""
    n_reasons: int
    """All unwaived fail and warn rows."""
    reasons_more: tuple[RuleCount, ...]
    """Per rule with rows beyond ``reasons``: how many more (worst status first)."""
    verdict_rows: tuple[VerdictRow, ...]
    """The verdicts listed: all of them in a small audit, else the ones not passing."""
    n_verdicts: int
    rule_summary: tuple[RuleSummaryRow, ...]
    statistics: StatisticsView
    finding_rows: tuple[FindingRow, ...]
    n_findings: int
    """Findings in the audit (``finding_rows`` may list fewer in the PDF)."""
    class_names: tuple[str, ...]
    """Every class of every head, in first-seen order (the filter's options)."""
    heads: tuple[HeadSection, ...]
    comparison_heads: tuple[str, ...]
    """Empty unless at least two heads were audited."""
    comparison_rows: tuple[ComparisonRow, ...]
    n_comparison_rows: int
    thumbnail_css: Markup
    """One CSS rule per inlined image (``Thumbnail.key``, ``Thumbnail.overlay_key``);
    base64 only, no user text."""
    print_mode: bool
    """Built for the PDF: long tables cut to ``pdf_max_rows``."""
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
