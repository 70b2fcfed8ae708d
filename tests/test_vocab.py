"""Vocabularies a user can write and inspect (issue 20, case 7): ``clipaudit vocab list |
show``, and the label floor: a component whose best term beats no scrambled phrase of
the vocabulary is ``unlabelled (closest: TERM)`` and matches no rule-file concept."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.describe import ConceptVocabulary, describe_components, list_vocabularies
from clipaudit.describe.labels import (
    apply_label_floor,
    closest_term,
    is_unlabelled,
    scrambled_phrases,
    unlabelled_label,
)
from clipaudit.findings.select import select_candidates
from clipaudit.gate import parse_ruleset
from clipaudit.gate.matching import ConceptMatcher
from clipaudit.results import FindingConfig


def test_vocab_list_and_show_name_every_shipped_vocabulary_and_read_user_files(tmp_path):
    res = CliRunner().invoke(app, ["vocab", "list", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert [v["name"] for v in listed] == list_vocabularies() and len(listed) >= 3
    assert all(v["n_concepts"] > 0 and v["description"] for v in listed)
    shown = json.loads(CliRunner().invoke(app, ["vocab", "show", "dermatology", "--json"]).stdout)
    ruler = next(c for c in shown["concepts"] if c["concept"] == "ruler")
    assert "scale bar" in ruler["synonyms"] and shown["source"] == "built-in"
    mine = tmp_path / "studio.yaml"
    mine.write_text("# Our studio's artifacts\nwatermark: [copyright notice]\n- bad\n")
    bad = CliRunner().invoke(app, ["vocab", "show", str(mine)])
    assert bad.exit_code == 2 and str(mine) in bad.output and "Traceback" not in bad.output
    mine.write_text("# Our studio's artifacts\n#\nwatermark: [copyright notice]\nlight box:\n")
    res = CliRunner().invoke(app, ["vocab", "show", str(mine), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) | {"path": ""} == {
        "name": "studio", "source": "file", "path": "", "description": "Our studio's artifacts",
        "n_concepts": 2, "n_synonyms": 1,
        "concepts": [{"concept": "watermark", "synonyms": ["copyright notice"]},
                     {"concept": "light box", "synonyms": []}]}
    unknown = CliRunner().invoke(app, ["vocab", "show", "nope"])
    assert unknown.exit_code == 2 and "dermatology, general, product" in unknown.output


def test_unlabelled_labels_round_trip_and_match_no_concept():
    label = unlabelled_label("ruler")
    assert label == "unlabelled (closest: ruler)" and is_unlabelled(label)
    assert closest_term(label) == "ruler" and closest_term("ruler") == "ruler"
    assert not is_unlabelled("ruler") and not is_unlabelled("unlabelled")
    matcher = ConceptMatcher({"ruler": ["scale bar"]})
    assert matcher.first_match(label, ["ruler", "scale bar", "unlabelled", "closest"]) is None
    assert matcher.first_match("measuring ruler", ["ruler"]) == "ruler"
    rules = parse_ruleset({"version": 1, "concepts": {"forbidden": {"*": ["ruler"]},
                                                      "expected": {"*": ["ruler"]}},
                           "checks": [{"id": "f", "check": "forbidden-concept"}]})
    assert rules.concept_status("benign", label) is None


def test_an_unlabelled_component_is_never_a_forbidden_finding_nor_grouped_by_its_closest_term():
    # components 0 and 1 carry 0.08 each, both nearest to "ruler"; only 0 is labelled
    share = torch.tensor([[0.08], [0.08], [0.01]])
    alignment = torch.full((3, 1), -0.1)
    clarity = torch.full((3,), 0.8)
    concepts = ["ruler", unlabelled_label("ruler"), "hair"]
    config = FindingConfig(share_min=0.1, forbidden={"*": ["ruler"]})
    found = select_candidates(share, alignment, clarity, concepts, torch.zeros(3), ["malignant"],
                              config)
    assert found == []  # 0.08 alone is under share_min; the unlabelled one does not add to it
    config = FindingConfig(share_min=0.05, forbidden={"*": ["ruler"]})
    found = {c.component: c for c in select_candidates(share, alignment, clarity, concepts,
                                                       torch.zeros(3), ["malignant"], config)}
    assert found[0].kind == "forbidden-concept" and found[0].concept_share == pytest.approx(0.08)
    assert found[1].kind == "shortcut"  # still a finding, by share and alignment


def test_scrambled_phrases_keep_letters_and_are_seeded():
    phrases = ["ruler", "band-aid", "dark corners"]
    null = scrambled_phrases(phrases, n=50, seed=3)
    assert null == scrambled_phrases(phrases, n=50, seed=3) != scrambled_phrases(phrases, n=50, seed=4)
    letters = {"".join(sorted(p.replace(" ", ""))) for p in phrases}
    assert len(null) == 50 and all("".join(sorted(p.replace(" ", ""))) in letters for p in null)
    assert len(scrambled_phrases(phrases)) == 64 and len(scrambled_phrases(["x"] * 400)) == 512


def test_apply_label_floor_keeps_only_labels_above_every_scrambled_phrase():
    scores = torch.tensor([0.3, 0.1, float("nan"), 0.2])
    null = torch.tensor([[0.1, 0.2], [0.05, 0.1], [0.0, 0.0], [0.2, -1.0]])
    assert apply_label_floor(["ruler", "hair", "", "text"], scores, null) == [
        "ruler", unlabelled_label("hair"), "", unlabelled_label("text")]


class _Encoder:
    """Pseudo-random unit text embeddings (seeded by the text), fixed ones for some texts."""

    def __init__(self, d: int, fixed: dict[str, torch.Tensor]):
        self.d, self.fixed = d, fixed

    def __call__(self, texts):
        rows = [self.fixed.get(t, torch.randn(self.d, generator=torch.Generator().manual_seed(
            zlib.crc32(t.encode())))) for t in texts]
        return torch.stack(rows)


def test_describe_labels_components_a_term_describes_and_unlabels_the_rest():
    """24 components: 4 lie on a vocabulary term's text direction, 20 on random
    directions no term (nor scrambled phrase) was made for. Those 4 keep their label; of
    the 20, most become unlabelled (a meaningless vocabulary wins against its scrambles
    in about a third of them), and with the floor off all 24 get the nearest term."""
    from types import SimpleNamespace

    d, g = 64, torch.Generator().manual_seed(1)
    terms = ["ruler", "watermark", "hair", "logo"] + [f"thing {i}" for i in range(12)]
    directions = {t: torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) for t in terms[:4]}
    encoder = _Encoder(d, {**directions, "": torch.zeros(d)})
    semantic = torch.cat([torch.stack(list(directions.values())), torch.randn(20, d, generator=g)])
    ids = torch.arange(24)[:, None]  # one top instance each: the component's own embedding
    top = SimpleNamespace(ids=ids, values=torch.ones(24, 1), counts=torch.ones(24, dtype=torch.long))
    vocab = ConceptVocabulary("v", terms)
    desc = describe_components(top, semantic, encoder, vocab, {})
    assert desc.concept[:4] == terms[:4]
    unlabelled = [c for c in desc.concept[4:] if is_unlabelled(c)]
    assert len(unlabelled) >= 12, desc.concept
    assert desc.provenance["label_floor"] == "scrambled"
    off = describe_components(top, semantic, encoder, vocab, {}, label_floor="off")
    assert not any(is_unlabelled(c) for c in off.concept)
    assert [closest_term(c) for c in desc.concept] == off.concept
    with pytest.raises(Exception, match="label floor 'high'"):
        describe_components(top, semantic, encoder, vocab, {}, label_floor="high")
