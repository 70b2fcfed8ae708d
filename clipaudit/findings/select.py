"""Which relied-on components are shortcuts: findings from relevance and meaning.

Component j is eligible for class c when it is poorly aligned with the class
(alpha[j, c] < alignment_max), coherent (clarity >= clarity_min) and not labelled
with a concept the class is expected to rely on. An eligible component is a
candidate when it carries a large share of the class's evidence
(rho[j, c] >= share_min), or when the eligible components with its concept label,
each carrying at least member_share_min, together carry share_min: an SAE often
splits one shortcut (dark corners, hair) over several components, none of which
carries the whole of it. A candidate whose concept label is forbidden for the class
is a forbidden-concept finding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from clipaudit.describe.labels import is_unlabelled
from clipaudit.gate.matching import ConceptMatcher
from clipaudit.results import ComponentPoint, Finding, FindingConfig, FindingKind


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


_MATCHER = ConceptMatcher()  # the lists of a FindingConfig already hold every synonym


def _concept_listed(concept: str, listing: dict[str, list[str]], class_name: str) -> bool:
    """The gate's matching (clipaudit/gate/matching.py): whole words, any case,
    punctuation and plurals: 'hair' matches 'dark hair' and 'Hairs.', not 'chair'; an
    ``unlabelled (closest: ...)`` label matches nothing."""
    return _MATCHER.matches(concept, [*listing.get("*", []), *listing.get(class_name, [])])


def select_candidates(share_jc: torch.Tensor, alignment_jc: torch.Tensor, clarity_j: torch.Tensor,
                      concepts: Sequence[str], concept_scores: torch.Tensor,
                      class_names: Sequence[str], config: FindingConfig) -> list[Candidate]:
    """Findings for every class, in class order; within a class by concept share, then share."""
    out = []
    floor = min(config.member_share_min, config.share_min)
    for c, name in enumerate(class_names):
        eligible = []
        for j in torch.nonzero(share_jc[:, c] >= floor).flatten().tolist():
            alignment, clarity = float(alignment_jc[j, c]), float(clarity_j[j])
            if math.isnan(alignment) or math.isnan(clarity):
                continue
            if alignment >= config.alignment_max or clarity < config.clarity_min:
                continue
            forbidden = _concept_listed(concepts[j], config.forbidden, name)
            if not forbidden and _concept_listed(concepts[j], config.expected, name):
                continue  # forbidden wins over expected, as in the rule engine
            eligible.append((j, float(share_jc[j, c]), alignment, clarity, forbidden))
        by_concept: dict[str, float] = defaultdict(float)
        for j, share, *_ in eligible:
            if concepts[j] and not is_unlabelled(concepts[j]):  # dead or undescribed: no group
                by_concept[concepts[j]] += share
        of_class = []
        for j, share, alignment, clarity, forbidden in eligible:
            together = by_concept.get(concepts[j], share)
            if share < config.share_min and together < config.share_min:
                continue
            of_class.append(Candidate(j, name, share, together, alignment, clarity, concepts[j],
                                      float(concept_scores[j]),
                                      "forbidden-concept" if forbidden else "shortcut"))
        of_class.sort(key=lambda cand: (-cand.concept_share, cand.concept, -cand.share, cand.component))
        out += of_class
    return out


def metadata_aucs(activation_n: np.ndarray, metadata: pd.DataFrame) -> dict[str, float]:
    """ROC AUC of a component's activation against each binary metadata column."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for column in metadata.columns:
        values = metadata[column].dropna()
        if values.nunique() != 2:
            continue
        positive = _positive_value(values)
        target = (metadata[column] == positive).to_numpy()
        known = metadata[column].notna().to_numpy()
        try:
            out[str(column)] = float(roc_auc_score(target[known], activation_n[known]))
        except ValueError:  # a single class after dropping missing values
            continue
    return out


def _positive_value(values: pd.Series):
    uniq = sorted(values.unique(), key=str)
    for candidate in (True, 1, "True", "true", "yes", "1"):
        if candidate in uniq:
            return candidate
    return uniq[-1]


def make_finding(head: str, cand: Candidate, rank: int, top_instances: list[int],
                 aucs: dict[str, float], ablation) -> Finding:
    return Finding(
        id=f"{head}:{cand.class_name}:{cand.component}", head=head, class_name=cand.class_name,
        component=cand.component, kind=cand.kind, rank=rank, share=cand.share,
        concept_share=cand.concept_share, alignment=cand.alignment, clarity=cand.clarity, concept=cand.concept,
        concept_score=cand.concept_score, top_instances=top_instances, metadata_auc=aucs,
        ablation=ablation,
    )


def scatter_points(share_c: torch.Tensor, alignment_c: torch.Tensor, clarity_j: torch.Tensor,
                   concepts: Sequence[str], limit: int, must_include: Sequence[int]) -> list[ComponentPoint]:
    """The components with the largest |share| for one class (plus every finding)."""
    order = share_c.abs().argsort(descending=True)[:limit].tolist()
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
