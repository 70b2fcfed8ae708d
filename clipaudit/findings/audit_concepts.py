"""What the audit measures about concepts, once per audit: the metadata columns and their
declared roles, SAE coverage of the judged columns, and, per head, the reliance on
every column key and forbidden concept (``clipaudit.findings.evidence``).

``run_audit`` calls ``audit_concepts`` after describing the components and reads the
result through ``AuditConcepts``; the rule engine judges what it recorded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipaudit.columns import find_declared_roles
from clipaudit.describe.components import concept_embeddings
from clipaudit.describe.concepts import load_vocabularies
from clipaudit.findings.concept_evidence import (
    ConceptInputs,
    ConceptPresence,
    InstanceSet,
    columns_of,
    concept_presences,
    coverage_for_audit,
    forbidden_reliance,
    head_reliance,
)
from clipaudit.findings.select import ForbiddenReliance
from clipaudit.gate.columns import KeyView, judged_keys, key_for_term, key_views, text_terms
from clipaudit.gate.model import RuleSet
from clipaudit.heads.base import Head
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.results import ColumnCoverage, ColumnInfo, ConceptReliance

log = logging.getLogger(__name__)


@dataclass
class AuditConcepts:
    """The audit's concept evidence; reliance is measured per head on first request."""

    columns: list[ColumnInfo]
    coverage: list[ColumnCoverage]
    inputs: ConceptInputs
    ruleset: RuleSet
    views: list[KeyView]
    clarity_min: float
    label_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per head, its classes of the data's labels (``--label-map``)."""
    _reliance: dict[str, list[ConceptReliance]] = field(default_factory=dict)
    _presences: list[ConceptPresence] | None = None

    def reliance_of(self, head: Head) -> list[ConceptReliance]:
        """The head's reliance on every column key (of a column not ignored), text-defined
        forbidden term and component-defined forbidden term."""
        if self._presences is None:
            keys = [(v.key, v.concept) for v in self.views if v.role != "ignore"]
            texts = [(t, sorted(self.ruleset.matcher.spellings([t])), self._is(t))
                     for t in text_terms(self.views, self.ruleset, None)]
            self._presences = concept_presences(self.inputs, keys, texts, self.component_terms())
        if head.name not in self._reliance:
            self._reliance[head.name] = head_reliance(head, self.inputs, self._presences,
                                                      self.label_maps.get(head.name))
        return self._reliance[head.name]

    def _is(self, term: str) -> Callable[[str], bool]:
        return lambda label: self.ruleset.matcher.matches(label, [term])

    def component_terms(self) -> list[tuple[str, list[int]]]:
        """Each forbidden term with the live, coherent components labelled with it."""
        d = self.inputs.descriptions
        matcher, clarity = self.ruleset.matcher, d.clarity.tolist()
        out = []
        for term in self.ruleset.forbidden_terms():
            members = [j for j, label in enumerate(d.concept)
                       if label and clarity[j] >= self.clarity_min
                       and matcher.matches(label, [term])]
            if members:
                out.append((term, members))
        return out

    def forbidden_reliance(self, head: Head, reliance: Sequence[ConceptReliance],
                           labels: Sequence[str]) -> ForbiddenReliance:
        def key_of_term(term: str) -> str | None:
            view = key_for_term(self.views, self.ruleset, term)
            return view.key if view is not None else None

        return forbidden_reliance(reliance, head.class_names, labels,
                                  self.ruleset.forbidden_match, key_of_term)


def audit_concepts(cache: Any, audited: InstanceSet, reference: InstanceSet, described: Any,
                   sae: Any, ruleset: RuleSet, reporter: Reporter = NULL_REPORTER,
                   seed: int = 0,
                   label_maps: dict[str, dict[str, str]] | None = None) -> AuditConcepts:
    """Columns, coverage and the inputs of reliance for one audit.

    ``cache``: the audited cache (where its data set's declared column roles are found);
    ``audited``/``reference``: samples of the audited data and of the reference set
    (``audit.sample_instances``; the same object when the audited data is the reference
    set); ``described``: ``audit.Described`` (descriptions, the reference set's image
    embeddings by id and the text encoder of their model); ``label_maps``: per head, its
    classes of the data's labels (``HeadLabels.label_to_class``)."""
    source_root = (cache.manifest.get("source") or {}).get("root")
    declared = find_declared_roles(Path(source_root) if source_root else None)
    if declared.source:
        log.info("column roles declared by the data set: %s", declared.source)
    columns = columns_of(audited.metadata, declared)
    views = key_views(columns, ruleset)
    if reference is not audited:  # the reference set's metadata columns the audited data has
        reference = dataclasses.replace(reference, metadata=reference.metadata[
            [c for c in audited.metadata.columns if c in reference.metadata.columns]])
    vocabulary = load_vocabularies(described.descriptions.provenance.get("vocabularies") or [])
    templates = described.descriptions.provenance.get("templates") or ["{}"]
    dim = described.descriptions.semantic.shape[1]
    vocabulary_embeds = concept_embeddings(vocabulary, described.text_encoder, templates, dim)
    inputs = ConceptInputs(reference, audited, described.descriptions, described.semantic_embeds,
                           described.text_encoder, list(vocabulary.concepts), vocabulary_embeds)
    judged = judged_keys(views, ruleset, None)
    with reporter.task("SAE coverage", total=len(judged)) as task:
        coverage = coverage_for_audit(inputs, [(v.key, v.concept) for v in judged], sae.n_latents,
                                      seed=seed)
        task.advance(len(judged))
    return AuditConcepts(columns, coverage, inputs, ruleset, views,
                         ruleset.thresholds.clarity_min, label_maps or {})
