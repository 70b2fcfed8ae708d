"""The rule-file model: what a rule file may say, validated strictly by pydantic.

Every model forbids unknown keys and coerces nothing (a quoted ``"0.15"`` is not a
number). Field docstrings become the descriptions of the shipped JSON Schema
(``rules/schema.json``), so an editor shows them. Check entries are validated
against the parameters of their registered check (see ``registry``); this module
only holds what every rule file shares.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from clipaudit.columns import RoleSources
from clipaudit.gate.matching import ConceptMatcher
from clipaudit.results import FindingConfig

ALL_CLASSES = "*"
"""Key of ``concepts.forbidden``/``expected`` that applies to every class."""

RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

REFUSED_ALIGNMENT_MAX = (
    "alignment_max is no longer read: raw alignment has a different scale on every CLIP, so "
    "a fixed limit on it passes shortcuts on models it was not tuned on. Write "
    "calibrated_alignment_max instead (0 = no more aligned with the class than with the other "
    "classes, 1 = as aligned as the class's own images; default 0.5)")


def _require_date(value: Any) -> Any:
    # YAML gives a date for an unquoted 2027-01-31; accept an ISO string as well, but not
    # a datetime or a number (pydantic's lax date would read 0 as 1970-01-01).
    if isinstance(value, dt.datetime):
        raise ValueError(f"expected a date like 2027-01-31, got a date and time ({value})")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ValueError(f"expected a date like 2027-01-31, got {value!r}")


def _require_path(value: Any) -> Any:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise ValueError(f"expected a path (a non-empty string), got {value!r}")


IsoDate = Annotated[dt.date, BeforeValidator(_require_date)]
FilePath = Annotated[Path, BeforeValidator(_require_path)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]
Term = Annotated[str, Field(min_length=1)]
RuleId = Annotated[str, Field(pattern=RULE_ID_PATTERN)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, populate_by_name=False)


class Thresholds(StrictModel):
    """Which components become findings (DESIGN.md section 2, Findings)."""

    share_min: Share = 0.10
    """A component carrying at least this share of a class's evidence is a candidate, as
    are components with one concept label that carry it together."""
    member_share_min: Share = 0.02
    """Smallest share a component needs to count towards its concept label's share."""
    calibrated_alignment_max: Annotated[float, Field(ge=-10.0, le=10.0)] = 0.5
    """A component whose calibrated alignment with its class is at least this is not a
    shortcut. The scale is the model's own: 0 = no more aligned with the class than with
    the other classes, 1 = as aligned as the class's own reference images (README, "The
    method"), so one value serves every CLIP."""
    reliance_min: Share = 0.05
    """A forbidden concept is relied on (and its components are findings, whatever their
    alignment; the concept-reliance check fails) when putting it on the other classes'
    images costs the head at least this accuracy on them."""
    clarity_min: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.30
    """A component less coherent than this is not described well enough to be a finding."""
    min_instances: Annotated[int, Field(ge=1)] = 20
    """Audited instances a class needs before any rule can judge it (by label; by
    prediction for unlabelled data). A class with fewer is not evaluated: no rule passes
    it. A head of which no class has this many is an input error (exit code 2)."""
    too_few_instances: Literal["warn", "fail"] = "warn"
    """What a class below ``min_instances`` does to each rule's verdict for it: ``warn``
    (shown as not evaluated; the gate still passes the other classes) or ``fail``."""

    @model_validator(mode="before")
    @classmethod
    def _no_raw_alignment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "alignment_max" in data:
            raise ValueError(REFUSED_ALIGNMENT_MAX)
        return data


class Concepts(StrictModel):
    """Concept lists per class name (``"*"``: every class); matched case-insensitively
    on whole words, so ``ruler`` also matches ``measuring ruler``."""

    forbidden: dict[str, list[Term]] = {}
    """Concepts that must never carry a class's evidence."""
    expected: dict[str, list[Term]] = {}
    """Concepts that legitimately carry a class's evidence (never findings)."""
    synonyms: dict[Term, list[Term]] = {}
    """Concept -> other phrasings that mean the same (``ruler: [scale bar]``)."""


class MetadataRules(StrictModel):
    """Roles of the audited data's metadata columns, read by every metadata-based check
    (metadata-confirmed, sae-coverage, concept-reliance). They add to, and override, the
    roles the data set declares in ``columns.yaml`` beside its manifest; ``--column-role
    COLUMN=ROLE`` on the command line overrides both."""

    artifact_columns: list[Term] = []
    """Columns marking acquisition artifacts (``has_ruler``); globs, case-insensitive."""
    protected_columns: list[Term] = []
    """Columns of protected attributes (``skin_tone``, ``sex``); globs. Categorical columns
    are judged value by value (``skin_tone=dark``)."""
    ignored_columns: list[Term] = []
    """Columns no check reads and the gate does not warn about (``lesion_size``); globs."""
    column_concepts: dict[Term, Term] = {}
    """Column (or ``column=value``) -> the concept it marks, where its name does not say
    (``has_tag: hospital tag``); matched against the forbidden concepts."""
    auc_min: Annotated[float, Field(ge=0.5, le=1.0)] = 0.9
    """A finding whose activation predicts such a column with ROC AUC >= this is confirmed."""


class BaselineOptions(StrictModel):
    """How findings are compared with the baseline audit."""

    min_cosine: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    """Where the SAE changed, components match when their decoder directions have at
    least this cosine similarity (same SAE: components match by id)."""
    waive_known: bool = True
    """Findings already in the baseline do not fail other checks (CI fails only on new ones)."""


class Waiver(StrictModel):
    """A documented exception: failures it matches pass, with its reason, until it expires."""

    reason: Annotated[str, Field(min_length=3)]
    """Why this is acceptable (shown in every report and summary)."""
    component: Annotated[int, Field(ge=0)] | None = None
    """SAE component id the waiver covers."""
    concept: Term | None = None
    """Concept label the waiver covers (synonyms apply)."""
    rule: RuleId | None = None
    """Rule id the waiver covers (alone: the whole rule, e.g. a known SAE-quality issue)."""
    head: Term | None = None
    """Only for this head (``probe``, ``zero-shot``)."""
    class_name: Term | None = Field(default=None, alias="class")
    """Only for this class."""
    expires: IsoDate | None = None
    """Last day the waiver applies (inclusive); afterwards the failure is back."""

    @model_validator(mode="after")
    def _says_what_it_covers(self) -> Waiver:
        if self.component is None and self.concept is None and self.rule is None:
            raise ValueError("a waiver needs at least one of 'component', 'concept' or 'rule'")
        return self

    def is_active(self, today: dt.date) -> bool:
        return self.expires is None or today <= self.expires


class CheckSpec(StrictModel):
    """One rule: a registered check with its parameters. Each check adds its own."""

    id: RuleId
    """Rule id, unique in the rule set (``no-shortcuts``); names the JUnit test case."""
    check: str
    """Registered check name (``clipaudit rules list``)."""
    severity: Literal["fail", "warn"] = "fail"
    """What a violation does: ``fail`` fails the gate (exit code 1), ``warn`` only reports."""
    description: str | None = None
    """Shown next to the verdict."""
    heads: list[Term] | None = None
    """Only these heads (default: every head)."""
    classes: list[Term] | None = None
    """Only these classes (default: every class)."""


class RuleSet(StrictModel):
    """A rule file after ``extends`` is resolved. Build with ``load_ruleset``/``parse_ruleset``."""

    version: Literal[1]
    """Rule-file format version."""
    extends: str | None = None
    """Rule set this one builds on: a shipped name (``default``) or a path relative to this
    file. Mappings merge, lists of concepts, columns and waivers add up, and a check with
    an id the parent uses replaces the parent's."""
    description: str | None = None
    """What this rule set is for."""
    disable: list[RuleId] = []
    """Ids of checks of the extended rule set to drop."""
    thresholds: Thresholds = Thresholds()
    concepts: Concepts = Concepts()
    metadata: MetadataRules = MetadataRules()
    checks: list[CheckSpec] = []
    """The rules to evaluate."""
    waivers: list[Waiver] = []
    """Documented exceptions."""
    baseline: FilePath | None = None
    """Audit folder (or audit.json) to compare with, relative to this rule file."""
    baseline_options: BaselineOptions = BaselineOptions()

    _sources: tuple[Path, ...] = PrivateAttr(default=())
    _name: str = PrivateAttr(default="<rules>")
    _role_overrides: dict[str, str] = PrivateAttr(default_factory=dict)
    _matcher: ConceptMatcher | None = PrivateAttr(default=None)
    _memo: dict[tuple[str, str, str], Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_ids(self) -> RuleSet:
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.checks):
            if spec.id in seen:
                raise ValueError(f"duplicate rule id {spec.id!r} (checks[{seen[spec.id]}] "
                                 f"and checks[{i}])")
            seen[spec.id] = i
        return self

    # ---------------------------------------------------------------- provenance

    @property
    def name(self) -> str:
        """Shipped name (``dermatology``) or the rule file's path as given."""
        return self._name

    @property
    def sources(self) -> tuple[Path, ...]:
        """The files this rule set was read from, the file given first, then its parents."""
        return self._sources

    # ---------------------------------------------------------------- concepts

    @property
    def matcher(self) -> ConceptMatcher:
        """Concept matching with this rule set's synonyms."""
        if self._matcher is None:
            self._matcher = ConceptMatcher(self.concepts.synonyms)
        return self._matcher

    def concepts_for(self, lists: dict[str, list[str]], class_name: str) -> list[str]:
        return [*lists.get(ALL_CLASSES, []), *lists.get(class_name, [])]

    def forbidden_match(self, class_name: str, concept: str) -> str | None:
        """The forbidden term ``concept`` matches for ``class_name``, if any."""
        return self._first_match("forbidden", class_name, concept)

    def concept_status(self, class_name: str,
                       concept: str) -> Literal["forbidden", "expected"] | None:
        """``forbidden`` wins over ``expected``; None when the concept is on neither list."""
        if self._first_match("forbidden", class_name, concept) is not None:
            return "forbidden"
        return "expected" if self._first_match("expected", class_name, concept) else None

    def _first_match(self, kind: str, class_name: str, concept: str) -> str | None:
        # Memoised: an audit asks about the same (class, concept) once per rule.
        key = (kind, class_name, concept)
        if key not in self._memo:
            lists = self.concepts.forbidden if kind == "forbidden" else self.concepts.expected
            self._memo[key] = self.matcher.first_match(concept,
                                                       self.concepts_for(lists, class_name))
        return self._memo[key]

    # ---------------------------------------------------------------- column roles

    def with_column_roles(self, overrides: Mapping[str, str]) -> RuleSet:
        """This rule set with ``--column-role`` overrides (column -> role), which win
        over the rule file and the data set."""
        copy = self.model_copy()
        copy._role_overrides = {**self._role_overrides, **overrides}
        copy._memo = {}
        return copy

    @property
    def role_overrides(self) -> dict[str, str]:
        return dict(self._role_overrides)

    def role_sources(self, declared: Mapping[str, str]) -> RoleSources:
        """How this rule set (and its overrides) resolves roles, over the data set's."""
        m = self.metadata
        return RoleSources(self._role_overrides, m.artifact_columns, m.protected_columns,
                           m.ignored_columns, declared)

    def forbidden_terms(self) -> list[str]:
        """Every forbidden term, of every class, once."""
        return list(dict.fromkeys(t for terms in self.concepts.forbidden.values() for t in terms))

    def finding_config(self) -> FindingConfig:
        """Thresholds and concept lists for the audit. Lists are lower-case and include
        every synonym; ``concept_status`` is the matching the rules use (whole words)."""
        t = self.thresholds
        return FindingConfig(
            share_min=t.share_min, member_share_min=t.member_share_min,
            calibrated_alignment_max=t.calibrated_alignment_max, reliance_min=t.reliance_min,
            clarity_min=t.clarity_min,
            forbidden=self._expanded(self.concepts.forbidden),
            expected=self._expanded(self.concepts.expected),
        )

    def _expanded(self, lists: dict[str, list[str]]) -> dict[str, list[str]]:
        matcher = self.matcher
        return {cls: sorted(matcher.spellings(terms)) for cls, terms in lists.items()}

    def iter_checks(self, check: str | None = None) -> Iterator[CheckSpec]:
        return (s for s in self.checks if check is None or s.check == check)
