"""The audit's concept evidence: metadata columns, SAE coverage and concept reliance.

What ``clipaudit.audit`` calls, once per audit (columns, coverage) and once per head
(reliance), on the reference set (where concept directions and coverage are measured)
and the audited data (where the head's reliance is measured). The computations
themselves live in ``coverage`` and ``reliance``; this module decides which concepts to
measure (``clipaudit.gate.columns``) and where each one's presence comes from:

- a metadata column key (``has_ruler``, ``skin_tone=dark``), on the reference set when
  it has the column, else on the audited data;
- the SAE components whose concept label is a forbidden term (what a forbidden-concept
  finding's reliance is measured on when no column marks the term);
- the reference CLIP's text for a forbidden term no column marks (the
  ``concept-reliance`` check's text route).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from clipaudit.columns import ColumnKey, DeclaredRoles, column_keys, column_kind, key_presence
from clipaudit.describe.components import ComponentDescriptions
from clipaudit.findings.coverage import measure_coverage
from clipaudit.findings.reliance import (
    Presence,
    concept_direction,
    head_inputs,
    head_scores,
    measure_reliance,
    presence_from_activation,
    presence_from_scores,
)
from clipaudit.findings.select import ForbiddenReliance
from clipaudit.heads.base import Head
from clipaudit.results import ColumnCoverage, ColumnInfo, ConceptReliance

log = logging.getLogger(__name__)

TextEncoder = Callable[[list[str]], Tensor]


@dataclass(frozen=True)
class InstanceSet:
    """A set of instances as the concept checks need it; rows in index order."""

    ids: Tensor
    """long [n] instance ids."""
    embeds: Tensor
    """float [n, D]: the audited CLIP's image embeddings (what heads read)."""
    acts: Tensor
    """float [n, d]: activations at the hook point (what the SAE reads)."""
    labels: list[str | None]
    metadata: pd.DataFrame
    codes_indices: Tensor
    """long [n, k] SAE codes."""
    codes_values: Tensor


@dataclass(frozen=True)
class ConceptInputs:
    reference: InstanceSet
    """Where directions and coverage are measured (the audited data when no reference set)."""
    audited: InstanceSet
    descriptions: ComponentDescriptions
    semantic_embeds: Tensor
    """float [max id + 1, D']: the reference model's image embeddings of the reference set,
    by instance id (text-defined presence)."""
    text_encoder: TextEncoder
    """The reference model's text encoder."""
    vocabulary: list[str]
    """The concept vocabulary the components were labelled with ..."""
    vocabulary_embeds: Tensor
    """... and its concepts' unit text embeddings [V, D'] (what a text-defined concept's
    images must be described as to count as showing it)."""


def columns_of(metadata: pd.DataFrame, declared: DeclaredRoles) -> list[ColumnInfo]:
    """The audited data's metadata columns, with the data set's declared roles."""
    out = []
    for column in metadata.columns:
        name = str(column)
        kind, values = column_kind(metadata[column])
        keys = column_keys(metadata[[column]]) if kind != "other" else []
        out.append(ColumnInfo(name=name, kind=kind, values=[str(v) for v in values],  # type: ignore[arg-type]
                              declared_role=declared.roles.get(name),
                              concepts={k.key: k.concept for k in keys}))
    return out


def key_of(metadata: pd.DataFrame, key: str, concept: str) -> ColumnKey | None:
    """The ``ColumnKey`` for ``key`` in ``metadata`` (None when the column is not there)."""
    column, _, value = key.partition("=")
    if column not in metadata.columns:
        return None
    kind, distinct = column_kind(metadata[column])
    if kind == "binary" and not value:
        return next((k for k in column_keys(metadata[[column]]) if k.key == key), None)
    matches = [v for v in distinct if str(v) == value]
    return ColumnKey(key, column, matches[0], concept) if matches else None


def _has_key(instances: InstanceSet, key: str, concept: str) -> ColumnKey | None:
    found = key_of(instances.metadata, key, concept)
    if found is None:
        return None
    return found if bool((key_presence(instances.metadata, found) == 1).any()) else None


# ------------------------------------------------------------------ coverage


def coverage_for_audit(inputs: ConceptInputs, keys: Sequence[tuple[str, str]], n_latents: int,
                       seed: int = 0) -> list[ColumnCoverage]:
    """Coverage of each (key, concept) on the reference set (the audited data when the
    reference set lacks the column), every key of one set measured in one pass."""
    on: dict[str, list[ColumnKey]] = {"reference": [], "audited": []}
    order = []
    for key, concept in keys:
        ref_key = _has_key(inputs.reference, key, concept)
        aud_key = None if ref_key else _has_key(inputs.audited, key, concept)
        if ref_key or aud_key:
            on["reference" if ref_key else "audited"].append(ref_key or aud_key)  # type: ignore[arg-type]
            order.append(key)
    found: dict[str, ColumnCoverage] = {}
    for name, instances in (("reference", inputs.reference), ("audited", inputs.audited)):
        if on[name]:
            for c in measure_coverage(instances.acts, instances.codes_indices,
                                      instances.codes_values, n_latents, instances.metadata,
                                      on[name], concepts=inputs.descriptions.concept, seed=seed):
                found[c.column] = c
    return [found[key] for key in order]


# ------------------------------------------------------------------ reliance


@dataclass(frozen=True)
class ConceptPresence:
    """Where a concept is, on the set its direction is measured on and on the audited data."""

    presence: Presence
    on_reference: bool
    """Measured on the reference set (else on the audited data)."""
    audited: np.ndarray | None
    """int8 per audited instance (1, 0, -1 unknown), or None when unknown."""


def concept_presences(inputs: ConceptInputs, keys: Sequence[tuple[str, str]],
                      text_terms: Sequence[tuple[str, list[str], Callable[[str], bool]]],
                      component_terms: Sequence[tuple[str, list[int]]]) -> list[ConceptPresence]:
    """The presence of every column key, text-defined term (its phrasings and a test of
    whether a concept label is the term) and component-defined term (its components):
    what every head's reliance is then measured on."""
    ref, aud = inputs.reference, inputs.audited
    out = []
    for key, concept in keys:
        audited_key = key_of(aud.metadata, key, concept)
        audited_presence = key_presence(aud.metadata, audited_key) if audited_key else None
        ref_key = _has_key(ref, key, concept)
        column_key = ref_key or audited_key
        if column_key is None:
            continue
        on = ref if ref_key else aud
        presence = Presence(key, "column", key_presence(on.metadata, column_key),
                            f"column {key}" + ("" if ref_key else " (on the audited data)"))
        out.append(ConceptPresence(presence, ref_key is not None, audited_presence))
    for term, phrases, is_term in text_terms:
        out.append(ConceptPresence(_text_presence(inputs, term, phrases, is_term), True, None))
    for term, components in component_terms:
        presence, audited_presence = _component_presence(inputs, term, components)
        out.append(ConceptPresence(presence, True, audited_presence))
    return out


def head_reliance(head: Head, inputs: ConceptInputs, presences: Sequence[ConceptPresence],
                  label_to_class: Mapping[str, str] | None = None) -> list[ConceptReliance]:
    """The head's reliance, per class, on every concept of ``presences``.
    ``label_to_class``: the head's classes of the data's labels (``--label-map``; a label
    it does not name is its own class name), as the audit's attributions use them."""
    ref, aud = inputs.reference, inputs.audited
    x_ref, weight, bias = head_inputs(head, ref.embeds)
    x_aud, _, _ = head_inputs(head, aud.embeds)
    to_class = label_to_class or {}
    labels = [None if x is None else to_class.get(x, x) for x in aud.labels]
    base = head_scores(x_aud, weight, bias, list(head.class_names), labels)
    out: list[ConceptReliance] = []
    for cp in presences:
        on, x_on = (ref, x_ref) if cp.on_reference else (aud, x_aud)
        direction = concept_direction(x_on, cp.presence.values, on.labels)
        out += measure_reliance(direction, cp.presence.concept, cp.presence.source, x_aud, weight,
                                bias, list(head.class_names), labels, cp.audited,
                                cp.presence.detail, base=base)
    return out


def _text_presence(inputs: ConceptInputs, term: str, phrases: list[str],
                   is_term: Callable[[str], bool]) -> Presence:
    """The reference images the reference CLIP scores highest for the term (above the Otsu
    split of the scores) carry it, the others do not; provided what the first have more of
    than the others is the term: among the vocabulary and the term, the text their mean
    embeddings differ along most. Otherwise the reference set does not show the concept
    (the images closest to a phrase the data lack show whatever is nearest to it, often a
    legitimate feature such as a lesion colour), and there is no direction to measure."""
    templates = inputs.descriptions.provenance.get("templates") or ["{}"]
    texts = [t.replace("{}", p) for p in phrases for t in templates]
    concept = _unit(_unit(inputs.text_encoder(texts).detach().float().cpu()).sum(0))
    semantic = _unit(inputs.semantic_embeds[inputs.reference.ids].float())
    empty = inputs.descriptions.empty_text.float()
    scores = semantic @ concept - semantic @ empty
    scores[semantic.norm(dim=1) == 0] = float("nan")
    presence = presence_from_scores(scores, term, f"text: the reference images the reference "
                                    f"CLIP scores highest for {term!r}")
    shown, hidden = presence.values == 1, presence.values == 0
    if not shown.any() or not hidden.any():
        return presence
    # what the images above the split have more of than those below: the vocabulary term
    # (or the concept) their mean embeddings differ along most
    shift = (_unit(semantic[torch.from_numpy(shown)].sum(0))
             - _unit(semantic[torch.from_numpy(hidden)].sum(0)))
    candidates = torch.cat([inputs.vocabulary_embeds.float(), concept[None]])
    best = int((candidates @ shift).argmax())
    label = term if best == len(inputs.vocabulary) else inputs.vocabulary[best]
    if label == term or is_term(label):
        return presence
    return Presence(term, "text", np.full_like(presence.values, -1),
                    f"not found in the reference set: the images the reference CLIP finds most "
                    f"like {term!r} look like {label!r}")


def _component_presence(inputs: ConceptInputs, term: str,
                        components: list[int]) -> tuple[Presence, np.ndarray]:
    """Presence from the summed activation of the components labelled with the term, on the
    reference set, and the same split applied to the audited data."""
    comps = torch.tensor(components, dtype=torch.long)

    def activation(instances: InstanceSet) -> Tensor:
        hit = torch.isin(instances.codes_indices, comps)
        return (instances.codes_values.float() * hit).clamp(min=0).sum(dim=1)

    detail = f"components {', '.join(str(j) for j in components)}"
    presence, threshold = presence_from_activation(activation(inputs.reference), term, detail)
    audited, _ = presence_from_activation(activation(inputs.audited), term, detail, threshold)
    return presence, audited.values


def forbidden_reliance(reliance: Sequence[ConceptReliance], class_names: Sequence[str],
                       labels: Sequence[str], term_of: Callable[[str, str], str | None],
                       key_of_term: Callable[[str], str | None]) -> ForbiddenReliance:
    """(class, component label) -> the class's reliance on the forbidden term the label
    is, and where its direction came from: the term's column when one marks it, else the
    components labelled with it. Labels that are not forbidden are absent; so are those
    whose reliance could not be measured.

    Looked up on demand: the findings ask about the few (class, label) pairs of their
    candidates, while every pair is classes x distinct labels (1,000 x thousands)."""
    return _ForbiddenReliance(reliance, class_names, labels, term_of, key_of_term)


class _ForbiddenReliance(Mapping[tuple[str, str], ConceptReliance]):
    """``forbidden_reliance``'s mapping: each pair decided when first asked, then kept."""

    def __init__(self, reliance: Sequence[ConceptReliance], class_names: Sequence[str],
                 labels: Sequence[str], term_of: Callable[[str, str], str | None],
                 key_of_term: Callable[[str], str | None]) -> None:
        self._index = {(r.source, r.concept, r.class_name): r for r in reliance}
        self._classes, self._labels = list(dict.fromkeys(class_names)), list(dict.fromkeys(labels))
        self._class_set, self._label_set = set(self._classes), set(self._labels)
        self._term_of, self._key_of_term = term_of, key_of_term
        self._memo: dict[tuple[str, str], ConceptReliance | None] = {}

    def _find(self, name: str, label: str) -> ConceptReliance | None:
        if (name, label) not in self._memo:
            found = None
            if label and name in self._class_set and label in self._label_set:
                term = self._term_of(name, label)
                key = self._key_of_term(term) if term is not None else None
                for source, concept in (("column", key), ("components", term)):
                    r = self._index.get((source, concept, name)) if concept else None  # type: ignore[arg-type]
                    if r is not None and r.status == "measured" and r.reliance is not None:
                        found = r
                        break
            self._memo[(name, label)] = found
        return self._memo[(name, label)]

    def __getitem__(self, pair: tuple[str, str]) -> ConceptReliance:
        found = self._find(*pair) if isinstance(pair, tuple) and len(pair) == 2 else None
        if found is None:
            raise KeyError(pair)
        return found

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return (pair for pair in ((n, lab) for n in self._classes for lab in self._labels)
                if self._find(*pair) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
