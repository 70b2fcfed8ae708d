import numpy as np
import pandas as pd
import torch

from clipaudit.findings.select import metadata_aucs, select_candidates
from clipaudit.results import FindingConfig


def _inputs():
    share = torch.tensor([[0.5, 0.0], [0.2, 0.3], [0.05, 0.6], [0.3, 0.1]])
    alignment = torch.tensor([[0.10, 0.0], [-0.01, 0.0], [0.0, 0.2], [0.0, 0.0]])
    clarity = torch.tensor([0.9, 0.8, 0.9, 0.1])
    concepts = ["malignant lesion", "ruler", "benign nevus", "hair"]
    return share, alignment, clarity, concepts, torch.ones(4)


def test_candidates_need_share_low_alignment_and_clarity():
    share, alignment, clarity, concepts, scores = _inputs()
    cands = select_candidates(share, alignment, clarity, concepts, scores, ["malignant", "benign"],
                              FindingConfig(share_min=0.15, calibrated_alignment_max=0.05, clarity_min=0.3))
    got = {(c.class_name, c.component) for c in cands}
    # 0: aligned with malignant; 3: not coherent; 2 for benign: aligned; 1: the ruler
    assert got == {("malignant", 1), ("benign", 1)}
    assert all(c.kind == "shortcut" for c in cands)


def test_forbidden_and_expected_concepts():
    share, alignment, clarity, concepts, scores = _inputs()
    config = FindingConfig(share_min=0.15, calibrated_alignment_max=0.05, clarity_min=0.3,
                           forbidden={"malignant": ["ruler"]}, expected={"benign": ["Ruler"]})
    cands = select_candidates(share, alignment, clarity, concepts, scores, ["malignant", "benign"], config)
    assert [(c.class_name, c.kind) for c in cands] == [("malignant", "forbidden-concept")]
    both = FindingConfig(share_min=0.15, calibrated_alignment_max=0.05, clarity_min=0.3,
                         forbidden={"*": ["ruler"]}, expected={"*": ["ruler"]})
    cands = select_candidates(share, alignment, clarity, concepts, scores, ["malignant", "benign"], both)
    assert {c.kind for c in cands} == {"forbidden-concept"} and len(cands) == 2  # forbidden wins


def test_concept_lists_match_whole_phrases_only():
    share = torch.tensor([[0.5]])
    args = (torch.tensor([[0.0]]), torch.tensor([0.9]), ["chair"], torch.ones(1), ["x"])
    cands = select_candidates(share, *args, FindingConfig(share_min=0.1, forbidden={"*": ["hair"]}))
    assert cands[0].kind == "shortcut"


def test_metadata_auc_is_one_for_a_perfect_detector_and_skips_non_binary_columns():
    meta = pd.DataFrame({"has_ruler": [True, False, True, False], "tone": ["a", "b", "c", "a"],
                         "flag": [1, 0, 0, 1]})
    act = np.array([3.0, 0.0, 2.0, 0.1])
    aucs = metadata_aucs(act, meta)
    assert aucs["has_ruler"] == 1.0 and "tone" not in aucs
    assert aucs["flag"] == 0.75  # positives 3.0 and 0.1 vs negatives 0.0 and 2.0: 3 of 4 pairs


def test_components_of_one_concept_are_candidates_together():
    """An SAE splits 'dark corners' over three components of 0.04 each: none reaches
    share_min alone, together (0.12) they do, and rank before a lone 0.11 finding. A
    member below member_share_min, an aligned one and an expected one do not count."""
    share = torch.tensor([[0.04], [0.04], [0.04], [0.11], [0.015], [0.30], [0.05], [0.09], [0.015]])
    alignment = torch.tensor([[0.0]] * 5 + [[0.5]] + [[0.0]] * 3)
    clarity = torch.full((9,), 0.9)
    concepts = ["dark corners"] * 3 + ["hair", "dark corners", "dark corners", "lesion", "ink", "ink"]
    config = FindingConfig(share_min=0.10, member_share_min=0.02, calibrated_alignment_max=0.02,
                           clarity_min=0.3, expected={"*": ["lesion"]})
    cands = select_candidates(share, alignment, clarity, concepts, torch.ones(9), ["benign"], config)
    assert [c.component for c in cands] == [0, 1, 2, 3]
    assert [round(c.concept_share, 3) for c in cands] == [0.12, 0.12, 0.12, 0.11]
    # 7 (ink, 0.09) + 8 (ink, 0.015 < member_share_min) stay below share_min
    alone = select_candidates(share, alignment, clarity, concepts, torch.ones(9), ["benign"],
                              FindingConfig(share_min=0.10, member_share_min=0.01,
                                            calibrated_alignment_max=0.02, clarity_min=0.3,
                                            expected={"*": ["lesion"]}))
    assert {c.component for c in alone} == {0, 1, 2, 3, 4, 7, 8}
