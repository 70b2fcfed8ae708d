"""The audit result: everything ``audit.json`` holds and the rules and report read.

Plain frozen dataclasses, converted to and from JSON by ``to_dict``/``from_dict``.
This is the contract between the audit (producer), the rule engine and the
report (consumers): change a field here and bump ``SCHEMA_VERSIONS["audit"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["pass", "warn", "fail"]
FindingKind = Literal["shortcut", "forbidden-concept"]
RelianceSource = Literal["column", "components", "text"]


@dataclass(frozen=True)
class FindingConfig:
    """Thresholds that make a component a finding (they come from the rule file)."""

    share_min: float = 0.10
    """rho_min: smallest relevance share of a class's evidence worth a finding, carried by
    one component or by the candidates that share its concept label together."""
    member_share_min: float = 0.02
    """Smallest share a component needs to count towards its concept's share."""
    calibrated_alignment_max: float = 0.5
    """A component whose calibrated alignment with its class (``clipaudit.describe.calibration``:
    0 = no more aligned with the class than with the other classes, 1 = as aligned as the
    class's own images) is at least this is not a shortcut."""
    reliance_min: float = 0.05
    """A forbidden concept is relied on when putting it on the other classes' images costs the
    head at least this accuracy on them (``clipaudit.findings.reliance``)."""
    clarity_min: float = 0.30
    """A component less coherent than this is not described well enough to be a finding."""
    forbidden: dict[str, list[str]] = field(default_factory=dict)
    """Class name (or ``*`` for all classes) -> concepts that must not carry its evidence."""
    expected: dict[str, list[str]] = field(default_factory=dict)
    """Class name (or ``*``) -> concepts that legitimately carry its evidence (never findings)."""


@dataclass(frozen=True)
class SliceEffect:
    """Ablation effect on the instances of one metadata slice (e.g. has_ruler=True)."""

    column: str
    value: str
    n: int
    score_delta: float
    accuracy_before: float | None
    accuracy_after: float | None
    flipped: int


@dataclass(frozen=True)
class AblationEffect:
    """Setting the component to zero (SAE error held fixed) on the audited data."""

    component: int
    class_name: str
    score_delta: float
    """Mean change of the class score over the class's instances."""
    accuracy_before: float | None
    accuracy_after: float | None
    flipped: int
    """Instances whose predicted class changed."""
    slices: list[SliceEffect] = field(default_factory=list)


@dataclass(frozen=True)
class Finding:
    """A component that carries a class's evidence while meaning something else."""

    id: str
    """Stable id ``<head>:<class>:<component>``."""
    head: str
    class_name: str
    component: int
    kind: FindingKind
    rank: int
    """1 = the first of this class's findings: by concept share, then by share."""
    share: float
    concept_share: float
    """Summed share of this class's candidates with the same concept label (this one
    included): an SAE may split one shortcut over several components."""
    alignment: float
    """Raw alignment with the class (DESIGN.md); its scale differs from one CLIP to the next."""
    clarity: float
    concept: str
    concept_score: float
    top_instances: list[int] = field(default_factory=list)
    """Instance ids (keys of ``AuditResult.instances``), most activating first."""
    metadata_auc: dict[str, float] = field(default_factory=dict)
    """ROC AUC of the component's activation against each binary metadata column."""
    ablation: AblationEffect | None = None
    share_ci: list[float] | None = None
    """[low, high]: bootstrap interval of ``share`` over the class's instances (None: not
    computed, as in audits made before intervals existed)."""
    concept_share_ci: list[float] | None = None
    """[low, high]: bootstrap interval of ``concept_share``."""
    chance_share: float | None = None
    """The concept share the same components carry of the class's evidence over the data
    at large (a random sample of it): what a random set of instances gives on average."""
    p_value: float | None = None
    """Chance of the class's mean attribution of these components in a random set of the
    class's size (a Chernoff bound; None: not computed)."""
    backed: bool = True
    """The data back the finding: it survives the Benjamini-Hochberg procedure over the
    audit's findings (``clipaudit.findings.statistics``). Unbacked findings are reported
    but fail and warn nothing. True where no statistics were computed."""
    calibrated_alignment: float | None = None
    """Alignment on the model's own scale (0: no more aligned with the class than with the
    other classes; 1: as aligned as the class's own images); what findings are decided on.
    None where the class could not be calibrated."""
    reliance: float | None = None
    """For a forbidden-concept finding: the accuracy the head loses on the other classes'
    images when the concept is put on them (``ConceptReliance.reliance``); None where not
    measurable."""
    reliance_low: float | None = None
    """Its one-sided 95% lower bound, which decides."""
    reliance_source: str | None = None
    """Where the concept's direction came from: ``column has_ruler``, ``components 3, 17``."""

    @property
    def concept_split(self) -> bool:
        """Whether other findings of this class share its concept label (and share)."""
        return self.concept_share - self.share >= 5e-4

    @property
    def gate_share(self) -> float:
        """What the gate judges: the lower end of the concept share's interval (the concept
        share itself where no interval was computed)."""
        return self.concept_share_ci[0] if self.concept_share_ci else self.concept_share


@dataclass(frozen=True)
class ComponentPoint:
    """One point of a class's relevance-vs-alignment scatter."""

    component: int
    share: float
    alignment: float
    clarity: float
    concept: str


@dataclass(frozen=True)
class ClassAudit:
    class_name: str
    n_instances: int
    accuracy: float | None
    spurious_share: float
    """Summed share of this class's findings."""
    unexplained_share: float
    """|A_err| / (sum_j |R_j| + |A_err| + |A_bias|) over the class's instances."""
    components: list[ComponentPoint] = field(default_factory=list)


@dataclass(frozen=True)
class SliceAccuracy:
    """The head's accuracy on one slice: instances of a class with or without a concept."""

    class_name: str
    present: bool
    n: int
    accuracy: float | None


@dataclass(frozen=True)
class ConceptReliance:
    """How much one class of a head depends on one concept's direction in embedding space
    (``clipaudit.findings.reliance``), with the SAE out of the loop."""

    concept: str
    """A metadata column key (``has_ruler``, ``skin_tone=dark``) or a concept term."""
    source: RelianceSource
    """Where the concept's presence came from: a metadata ``column``, the SAE
    ``components`` labelled with it, or the reference CLIP's ``text`` for the term."""
    class_name: str
    status: Literal["measured", "confounded", "too-few", "absent"]
    """``measured``; ``confounded`` when the concept fills the classes it is common in
    (its direction cannot be told from theirs); ``too-few`` instances (in all, or in any
    one class);
    ``absent``: a text-defined concept the reference set does not show."""
    reliance: float | None = None
    """The head's accuracy on the other classes' images without the concept minus its
    accuracy on the same images with it, the concept acting as its mean shift in the
    head's input space: the embedding-space twin of the benchmark's causal test."""
    reliance_low: float | None = None
    """One-sided 95% lower bound of ``reliance`` (bootstrap over the instances that gave the
    direction and the audited ones): what the gate judges."""
    flip_rate: float | None = None
    """Share of the other classes' images (without the concept) that the head would call
    this class once the concept is added."""
    score_shift: float | None = None
    """Change of the class's margin over the other classes when the concept is added
    (exact for linear heads, normalisation held fixed)."""
    separation_ratio: float | None = None
    """``score_shift`` over the distance between the class's and the other classes' mean
    margins: how far the concept moves an image towards the class."""
    n_present: int = 0
    """Instances with the concept that estimated its direction."""
    n_absent: int = 0
    detail: str = ""
    """Where the presence came from (``components 3, 17``), or why it is not measured."""
    slices: list[SliceAccuracy] = field(default_factory=list)
    """Accuracy per class x presence on the audited data (by column: observed presence)."""


@dataclass(frozen=True)
class ColumnCoverage:
    """Whether the SAE can see a metadata column: decodable from the activations, and
    isolated by a component (``clipaudit.findings.coverage``)."""

    column: str
    """Column key: ``has_ruler`` or ``skin_tone=dark``."""
    n: int
    n_positive: int
    status: Literal["measured", "too-few"]
    decodable_auc: float | None = None
    """ROC AUC of a cross-validated linear probe on the activations."""
    best_component: int | None = None
    best_component_auc: float | None = None
    best_concept: str | None = None
    """Concept label whose components, summed, separate the column best."""
    best_concept_auc: float | None = None
    best_concept_components: list[int] = field(default_factory=list)

    @property
    def isolated_auc(self) -> float | None:
        """How well the SAE isolates the column: its best component, or the components of
        one concept label together (an SAE may split a concept), whichever is higher."""
        values = [v for v in (self.best_component_auc, self.best_concept_auc) if v is not None]
        return max(values) if values else None


@dataclass(frozen=True)
class ColumnInfo:
    """A metadata column of the audited data and what the data set declares about it."""

    name: str
    kind: Literal["binary", "categorical", "other"]
    values: list[str] = field(default_factory=list)
    """Distinct values (binary and categorical columns)."""
    declared_role: str | None = None
    """``artifact``, ``protected`` or ``ignore`` as the data set declares it (columns.yaml)."""
    concepts: dict[str, str] = field(default_factory=dict)
    """Key (``has_ruler``, ``skin_tone=dark``) -> the concept its name says it marks (the
    rule file's ``metadata.column_concepts`` can name another)."""


@dataclass(frozen=True)
class ClassCalibration:
    """The two anchors of a class's calibrated alignment (``clipaudit.describe.calibration``)."""

    class_name: str
    margin: float | None
    """Alignment contrast of the class's own images: the value that calibrates to 1."""
    source: str
    """``labels`` (reference images of the class) or ``zero-shot`` (images the reference
    CLIP assigns to it), or why the class is uncalibrated."""
    n: int = 0
    zero_shot_recall: float | None = None
    """Share of those images whose contrast favours the class (chance: 1 / classes)."""


@dataclass(frozen=True)
class FaithfulnessCurve:
    method: str
    """``act_x_grad``, ``logit_lens``, ``act_x_logit_lens``, ``activation`` or ``random``."""
    steps: list[int]
    scores: list[float]
    """Mean class score after removing the top ``steps[i]`` components."""
    auc: float
    """Area under the normalised curve (lower: the ranking removes evidence faster)."""


@dataclass(frozen=True)
class HeadAudit:
    name: str
    """``probe`` or ``zero-shot`` (or a user-given name)."""
    kind: str
    """Registered head type (``clipaudit.heads.list_heads()``)."""
    class_names: list[str]
    accuracy: float | None
    classes: list[ClassAudit] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    faithfulness: list[FaithfulnessCurve] = field(default_factory=list)
    relied_on: list[ComponentReliance] = field(default_factory=list)
    """Components carrying a large share of several classes' evidence, most classes first."""
    concept_reliance: list[ConceptReliance] = field(default_factory=list)
    """Per class, the head's reliance on each annotated or forbidden concept."""


@dataclass(frozen=True)
class ComponentReliance:
    """A component that carries a large share of the evidence of several classes."""

    component: int
    concept: str
    n_classes: int
    """Classes whose evidence it carries at least ``share_min`` of."""
    n_findings: int
    """Classes for which it is a finding."""
    classes: list[str] = field(default_factory=list)
    """The classes it carries the largest shares of (a few)."""
    max_share: float = 0.0


@dataclass(frozen=True)
class PermutationControl:
    """The audit again with each head's labels shuffled within the data (same model, same
    SAE, same descriptions): the findings and failures chance alone produces."""

    seed: int
    n_findings: int
    n_backed: int
    """Findings backed by the data (those the gate judges)."""
    n_failing: int
    """Failing verdicts that name a finding (rules about the SAE or the unexplained share
    do not depend on what the labels mean and are left out)."""
    n_warnings: int
    failing: list[str] = field(default_factory=list)
    """``head / class`` of the failing verdicts (at most 20)."""


@dataclass(frozen=True)
class ComponentHeatmap:
    """Where a component's activation comes from in one of its top images."""

    instance: int
    """Instance id (a key of ``AuditResult.instances``)."""
    overlay: str
    """PNG relative to the audit folder: the model's view of the image, the map over it."""
    map: str
    """PNG relative to the audit folder: the map alone (red adds to the activation, blue
    takes away), at patch resolution."""
    peak: list[int]
    """[row, col] of the map's maximum on the patch grid."""
    activation: float
    """The component's activation on this image."""


@dataclass(frozen=True)
class HeatmapsInfo:
    """How the audit's heatmaps were made, or why there are none."""

    method: str | None
    """``clipaudit.attribution.list_heatmap_methods()`` name; None when none were made."""
    grid: list[int] = field(default_factory=list)
    """[rows, cols] of the patch grid."""
    file: str | None = None
    """safetensors file (relative to the audit folder) with every map's values."""
    note: str = ""
    """What the maps show, or why the audit has none (a tower without patch tokens)."""


@dataclass(frozen=True)
class ComponentInfo:
    """What a component means (shared by every head)."""

    component: int
    concept: str
    concept_score: float
    clarity: float
    top_instances: list[int] = field(default_factory=list)
    direction: list[float] = field(default_factory=list)
    """Unit decoder direction, so a baseline audit with another SAE can be matched."""
    heatmaps: list[ComponentHeatmap] = field(default_factory=list)
    """One per top image the audit could read, most activating first."""


@dataclass(frozen=True)
class InstanceInfo:
    id: int
    path: str
    label: str | None
    thumbnail: str | None
    """Path of a small PNG relative to the audit folder."""


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    """Rule id from the rule file (e.g. ``no-shortcuts``)."""
    check: str
    """Registered check name."""
    status: Status
    message: str
    head: str | None = None
    class_name: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    waived: str | None = None
    """The waiver's reason when a failure was waived."""


@dataclass(frozen=True)
class AuditResult:
    audit_id: str
    provenance: dict[str, Any]
    """backbone, hook, sae (sha256 + id), probe sha256, prompt set, data hash, seed, date."""
    sae_metrics: dict[str, float]
    heads: list[HeadAudit]
    components: list[ComponentInfo] = field(default_factory=list)
    instances: list[InstanceInfo] = field(default_factory=list)
    verdicts: list[RuleVerdict] = field(default_factory=list)
    rules_file: str | None = None
    heatmaps: HeatmapsInfo | None = None
    """How the findings' heatmaps were made; None for audits without them."""
    permutation: PermutationControl | None = None
    """What the same audit finds with shuffled labels (None: not run)."""
    columns: list[ColumnInfo] = field(default_factory=list)
    """The audited data's metadata columns and their declared roles."""
    coverage: list[ColumnCoverage] = field(default_factory=list)
    """How well the SAE sees each artifact, protected or forbidden column."""
    calibration: list[ClassCalibration] = field(default_factory=list)

    @property
    def verdict(self) -> Status:
        statuses = {v.status for v in self.verdicts if v.waived is None}
        return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "pass"

    def head(self, name: str) -> HeadAudit:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)


# ------------------------------------------------------------------ (de)serialisation


def to_dict(obj: Any) -> Any:
    """A dataclass tree as JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def from_dict(cls: type, data: Any) -> Any:
    """Rebuild a dataclass tree written by ``to_dict`` (unknown keys are errors)."""
    return _convert(cls, data)


@functools.cache
def _fields_of(tp: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's field types and names (resolved once: an audit of 1,000 classes
    holds tens of thousands of records)."""
    return typing.get_type_hints(tp), frozenset(f.name for f in dataclasses.fields(tp))


def _convert(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"expected an object for {tp.__name__}, got {type(data).__name__}")
        hints, names = _fields_of(tp)
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown keys for {tp.__name__}: {sorted(unknown)}")
        return tp(**{k: _convert(hints[k], v) for k, v in data.items()})
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(args[0], data)
    if origin is list:
        (arg,) = typing.get_args(tp)
        return [_convert(arg, v) for v in data]
    if origin is dict:
        _, arg = typing.get_args(tp)
        return {k: _convert(arg, v) for k, v in data.items()}
    return data


# ------------------------------------------------------------------ audit folder

AUDIT_FNAME = "audit.json"
THUMBNAILS_DNAME = "thumbnails"


def save_audit(result: AuditResult, audit_dpath: Path | str) -> Path:
    """Write ``<audit_dpath>/audit.json`` (versioned; provenance in the header)."""
    from clipaudit.artifacts import write_json

    fpath = Path(audit_dpath) / AUDIT_FNAME
    return write_json(fpath, "audit", {"result": to_dict(result)}, provenance=result.provenance)


def load_audit(audit_dpath: Path | str) -> AuditResult:
    """Read an audit folder (or its audit.json) written by ``save_audit``."""
    from clipaudit.artifacts import read_json
    from clipaudit.errors import ArtifactError

    path = Path(audit_dpath)
    fpath = path / AUDIT_FNAME if path.is_dir() else path
    doc = read_json(fpath, "audit")
    try:
        return from_dict(AuditResult, doc["result"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{fpath}: malformed audit result ({e})") from None
