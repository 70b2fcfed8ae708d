"""One concept matcher: the findings and the gate decide "is this label the forbidden (or
expected) concept?" the same way, whatever the case, punctuation, plural or synonym."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipaudit.findings.select import select_candidates
from clipaudit.gate import parse_ruleset
from clipaudit.gate.matching import ConceptMatcher, singular, words_of

WORDS = ["ruler", "rulers", "Ruler", "scale", "bar", "band", "aid", "aids", "ink", "pink",
         "hair", "hairs", "chair", "patch", "patches", "body", "bodies", "glass", "glasses",
         "dark", "corner", "corners", "skin", "marker", "us", "bus", "lens"]
SEPARATORS = [" ", "/", "-", "_", ", ", " / ", ". ", "  "]
CLASSES = ["benign", "malignant"]
CHECKS = [{"id": "forbidden", "check": "forbidden-concept"}]


@st.composite
def phrases(draw, max_words: int = 3) -> str:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=max_words))
    text = words[0]
    for word in words[1:]:
        text += draw(st.sampled_from(SEPARATORS)) + word
    if draw(st.booleans()):
        text = text.upper() if draw(st.booleans()) else text.title()
    return text + draw(st.sampled_from(["", ".", "!", " "]))


term_lists = st.dictionaries(st.sampled_from(["*", *CLASSES]), st.lists(phrases(2), max_size=3),
                             max_size=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(phrases(), min_size=1, max_size=6), forbidden=term_lists,
       expected=term_lists, synonyms=st.dictionaries(phrases(2), st.lists(phrases(2), max_size=2),
                                                     max_size=3))
def test_findings_and_the_gate_cannot_disagree(labels, forbidden, expected, synonyms):
    ruleset = parse_ruleset({"version": 1, "checks": CHECKS, "concepts": {
        "forbidden": forbidden, "expected": expected, "synonyms": synonyms}})
    n = len(labels)
    candidates = select_candidates(
        torch.full((n, len(CLASSES)), 0.5), torch.full((n, len(CLASSES)), -1.0), torch.ones(n),
        labels, torch.ones(n), CLASSES, ruleset.finding_config())
    kinds = {(c.class_name, c.component): c.kind for c in candidates}
    for name in CLASSES:
        for j, label in enumerate(labels):
            status = ruleset.concept_status(name, label)
            want = {"forbidden": "forbidden-concept", "expected": None}.get(status, "shortcut")
            assert kinds.get((name, j)) == want, (name, label, status)


@pytest.mark.parametrize("label", ["ruler/scale bar", "Ruler.", "rulers", "RULER", "measuring ruler",
                                   "a ruler, a scale"])
def test_spellings_of_ruler_are_forbidden_in_both_views(label):
    ruleset = parse_ruleset({"version": 1, "checks": CHECKS,
                             "concepts": {"forbidden": {"malignant": ["ruler"]}}})
    assert ruleset.concept_status("malignant", label) == "forbidden"
    (cand,) = select_candidates(torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.ones(1), [label],
                                torch.ones(1), ["malignant"], ruleset.finding_config())
    assert cand.kind == "forbidden-concept"


@pytest.mark.parametrize("label, term, matches", [
    ("band_aid", "band-aid", True), ("Band-Aids", "band aid", True), ("plaster", "band-aid", True),
    ("pink skin", "ink", False), ("chair", "hair", False), ("dark corners", "dark corner", True),
    ("skin patches", "patch", True), ("bodies", "body", True), ("glasses", "glass", True),
    ("bus", "bu", False),
])
def test_case_punctuation_plurals_and_synonyms(label, term, matches):
    assert ConceptMatcher({"band-aid": ["plaster"]}).matches(label, [term]) is matches


@given(st.text(max_size=30))
def test_words_of_is_idempotent(text):
    words = words_of(text)
    assert words_of(" ".join(words)) == words
    assert all(singular(w) == w for w in words)
