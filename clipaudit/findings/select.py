"""Which relied-on components are shortcuts: findings from relevance and meaning.

Component j is eligible for class c in one of two ways:

- **shortcut**: it is poorly aligned with the class on the model's own scale
  (calibrated alignment < calibrated_alignment_max, ``clipaudit.describe.calibration``),
  coherent (clarity >= clarity_min) and not labelled with a concept the class is
  expected to rely on;
- **forbidden concept**: its concept label is forbidden for the class, it is coherent,
  and the head relies on that concept: putting the concept on the other classes'
  images costs the head at least ``reliance_min`` accuracy on them
  (``clipaudit.findings.reliance``), whatever the component's alignment. A label alone
  is not reliance: when the reliance is measured below ``reliance_min`` the component
  is no finding, however poorly aligned (an artifact independent of the label still
  gets components, and they can carry a fair share of every class's evidence). Only
  where reliance cannot be measured does alignment decide, as for a shortcut.

An eligible component is a candidate when it carries a large share of the class's
evidence (rho[j, c] >= share_min), or when the eligible components with its concept
label, each carrying at least member_share_min, together carry share_min: an SAE often
splits one shortcut (dark corners, hair) over several components, none of which
carries the whole of it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from clipaudit.describe.labels import is_unlabelled
from clipaudit.gate.matching import ConceptMatcher
from clipaudit.results import ComponentPoint, ConceptReliance, Finding, FindingConfig, FindingKind


@dataclass(frozen=True)
class Candidate:
    component: int
    class_name: str
    share: float
    concept_share: float
    alignment: float
    clarity: float
    concept: str
    concept_score: float
    kind: FindingKind
    calibrated_alignment: float | None = None
    reliance: float | None = None
    reliance_low: float | None = None
    reliance_source: str | None = None


_MATCHER = ConceptMatcher()  # the lists of a FindingConfig already hold every synonym

ForbiddenReliance = Mapping[tuple[str, str], ConceptReliance]
"""(class name, concept label) -> the class's measured reliance on the forbidden concept
the label is (absent: not measurable)."""


def _concept_listed(concept: str, listing: dict[str, list[str]], class_name: str) -> bool:
    """The gate's matching (clipaudit/gate/matching.py): whole words, any case,
    punctuation and plurals: 'hair' matches 'dark hair' and 'Hairs.', not 'chair'; an
    ``unlabelled (closest: ...)`` label matches nothing."""
    return _MATCHER.matches(concept, [*listing.get("*", []), *listing.get(class_name, [])])


def select_candidates(share_jc: torch.Tensor, alignment_jc: torch.Tensor, clarity_j: torch.Tensor,
                      concepts: Sequence[str], concept_scores: torch.Tensor,
                      class_names: Sequence[str], config: FindingConfig, *,
                      calibrated_jc: torch.Tensor | None = None,
                      forbidden_reliance: ForbiddenReliance | None = None) -> list[Candidate]:
    """Findings for every class, in class order; within a class by concept share, then share.

    ``alignment_jc`` is the raw alignment (reported); ``calibrated_jc`` decides (default:
    the raw alignment, for callers that calibrate themselves). ``forbidden_reliance``
    holds the reliance on each forbidden concept label (absent: not measurable)."""
    calibrated_jc = alignment_jc if calibrated_jc is None else calibrated_jc
    reliance = forbidden_reliance if forbidden_reliance is not None else {}
    out = []
    floor = min(config.member_share_min, config.share_min)
    for c, name in enumerate(class_names):
        eligible = []
        for j in torch.nonzero(share_jc[:, c] >= floor).flatten().tolist():
            clarity, calibrated = float(clarity_j[j]), float(calibrated_jc[j, c])
            if math.isnan(clarity) or clarity < config.clarity_min or not concepts[j]:
                continue
            aligned = not calibrated < config.calibrated_alignment_max  # NaN: cannot tell
            forbidden = _concept_listed(concepts[j], config.forbidden, name)
            measured = reliance.get((name, concepts[j])) if forbidden else None
            decisive = _decisive(measured)
            if forbidden:
                if decisive is not None and decisive < config.reliance_min:
                    continue  # measured: the head does not (demonstrably) rely on the concept
                if decisive is None and aligned:
                    continue  # not measurable: alignment decides, as for a shortcut
            elif aligned or _concept_listed(concepts[j], config.expected, name):
                continue  # forbidden wins over expected, as in the rule engine
            eligible.append((j, float(share_jc[j, c]), forbidden, measured))
        by_concept: dict[str, float] = defaultdict(float)
        for j, share, *_ in eligible:
            if concepts[j] and not is_unlabelled(concepts[j]):  # dead or undescribed: no group
                by_concept[concepts[j]] += share
        of_class = []
        for j, share, forbidden, measured in eligible:
            together = by_concept.get(concepts[j], share)
            if share < config.share_min and together < config.share_min:
                continue
            of_class.append(Candidate(
                j, name, share, together, float(alignment_jc[j, c]), float(clarity_j[j]),
                concepts[j], float(concept_scores[j]),
                "forbidden-concept" if forbidden else "shortcut",
                calibrated_alignment=_finite_or_none(calibrated_jc[j, c]),
                reliance=measured.reliance if measured else None,
                reliance_low=measured.reliance_low if measured else None,
                reliance_source=measured.detail.split(";")[0] if measured else None))
        of_class.sort(key=lambda cand: (-cand.concept_share, cand.concept, -cand.share, cand.component))
        out += of_class
    return out


def _decisive(measured: ConceptReliance | None) -> float | None:
    """What decides reliance: the lower bound, else the estimate (None: not measured)."""
    if measured is None or measured.status != "measured":
        return None
    return measured.reliance_low if measured.reliance_low is not None else measured.reliance


def _finite_or_none(x: torch.Tensor) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


def metadata_aucs(activation_n: np.ndarray, metadata: pd.DataFrame) -> dict[str, float]:
    """ROC AUC of a component's activation against each column key: every binary column
    (``has_ruler``) and every value of a categorical one (``skin_tone=dark``)."""
    from clipaudit.columns import column_keys, key_presence
    from clipaudit.findings.coverage import roc_auc

    out = {}
    scores = torch.as_tensor(np.asarray(activation_n, dtype=np.float64))
    for key in column_keys(metadata):
        presence = key_presence(metadata, key)
        known = presence >= 0
        target = presence[known] == 1
        if target.all() or not target.any():  # a single class after dropping missing values
            continue
        out[key.key] = roc_auc(scores[torch.from_numpy(known)], torch.from_numpy(target))
    return out


def make_finding(head: str, cand: Candidate, rank: int, top_instances: list[int],
                 aucs: dict[str, float], ablation) -> Finding:
    return Finding(
        id=f"{head}:{cand.class_name}:{cand.component}", head=head, class_name=cand.class_name,
        component=cand.component, kind=cand.kind, rank=rank, share=cand.share,
        concept_share=cand.concept_share, alignment=cand.alignment, clarity=cand.clarity, concept=cand.concept,
        concept_score=cand.concept_score, top_instances=top_instances, metadata_auc=aucs,
        ablation=ablation, calibrated_alignment=cand.calibrated_alignment,
        reliance=cand.reliance, reliance_low=cand.reliance_low, reliance_source=cand.reliance_source,
    )


def largest_shares(share_JC: torch.Tensor, limit: int) -> torch.Tensor:
    """[min(limit, J), C]: per class (column), its components by |share|, largest first
    (one ``topk`` for every class: a full sort of 32,768 components per class is not)."""
    return share_JC.abs().topk(min(limit, share_JC.shape[0]), dim=0).indices


def scatter_points(share_c: torch.Tensor, alignment_c: torch.Tensor, clarity_j: torch.Tensor,
                   concepts: Sequence[str], order: Sequence[int],
                   must_include: Sequence[int]) -> list[ComponentPoint]:
    """The components ``order`` names for one class (its largest |share| first, from
    ``largest_shares``), after every finding's."""
    chosen = list(dict.fromkeys([*must_include, *order]))
    points = []
    for j in chosen:
        if share_c[j] == 0:
            continue
        points.append(ComponentPoint(component=j, share=float(share_c[j]),
                                     alignment=_finite(alignment_c[j]), clarity=_finite(clarity_j[j]),
                                     concept=concepts[j]))
    return points


def _finite(x: torch.Tensor) -> float:
    value = float(x)
    return 0.0 if math.isnan(value) else value
