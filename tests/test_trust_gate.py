"""The checks that keep a PASS honest: forbidden means forbidden (on reliance, whatever the
alignment), concept reliance without the SAE, SAE coverage, column roles, calibration."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import torch
from test_rules_support import audit, finding

from clipaudit.findings.select import select_candidates
from clipaudit.gate import evaluate, exit_code, parse_ruleset
from clipaudit.results import (
    ClassCalibration,
    ColumnCoverage,
    ColumnInfo,
    ConceptReliance,
    FindingConfig,
)

TODAY = dt.date(2026, 6, 1)
COLUMNS = [
    ColumnInfo("has_tag", "binary", ["False", "True"], "artifact", {"has_tag": "tag"}),
    ColumnInfo("has_ruler", "binary", ["False", "True"], None, {"has_ruler": "ruler"}),
    ColumnInfo("watermark", "binary", ["0", "1"], None, {"watermark": "watermark"}),
    ColumnInfo("lesion_size", "binary", ["large", "small"], "ignore", {"lesion_size": "size"}),
    ColumnInfo("skin_tone", "categorical", ["dark", "fair"], "protected",
               {"skin_tone=dark": "dark skin tone", "skin_tone=fair": "fair skin tone"}),
]


def rules(*checks: dict, forbidden=("ruler",), **extra):
    return parse_ruleset({"version": 1,
                          "thresholds": {"share_min": 0.1, "calibrated_alignment_max": 0.5,
                                         "reliance_min": 0.05},
                          "concepts": {"forbidden": {"*": list(forbidden)}},
                          "checks": list(checks), **extra})


def reliance(concept: str, value: float | None, *, source: str = "column",
             class_name: str = "malignant", status: str = "measured", detail: str = "",
             low: float | None = None):
    return ConceptReliance(concept, source, class_name, status, reliance=value,  # type: ignore[arg-type]
                           reliance_low=low, flip_rate=value, detail=detail)


def result(findings=(), relied=(), coverage=(), calibration=None, columns=COLUMNS):
    base = audit(list(findings))
    head = dataclasses.replace(base.heads[0], concept_reliance=list(relied))
    calibration = calibration if calibration is not None else [
        ClassCalibration(c, 0.1, "labels", 100) for c in ("benign", "malignant")]
    return dataclasses.replace(base, heads=[head], columns=columns, coverage=list(coverage),
                               calibration=calibration)


def verdicts(res, ruleset):
    return {(v.rule, v.class_name): v for v in evaluate(res, ruleset, today=TODAY)}


# ------------------------------------------------------------------ forbidden means forbidden


FORBIDDEN = {"id": "forbidden", "check": "forbidden-concept"}


def test_a_relied_on_forbidden_concept_fails_whatever_its_alignment():
    """Issue 20 case 5: the ruler component is well aligned with its class (calibrated 0.9,
    above the 0.5 limit) yet the head relies on rulers: the gate fails, the message shows
    the reliance figure and where its direction came from."""
    f = finding(calibrated_alignment=0.9, alignment=0.4, share=0.3, reliance=0.31,
                kind="forbidden-concept")
    f = dataclasses.replace(f, reliance_source="column has_ruler")
    v = verdicts(result([f]), rules(FORBIDDEN))[("forbidden", "malignant")]
    assert v.status == "fail"
    assert "0.310 accuracy (column has_ruler)" in v.message and "ruler" in v.message


def test_a_forbidden_label_the_head_does_not_rely_on_passes_however_poorly_aligned():
    """The issue-20 control: the tag's components carry 0.20 of the class's evidence and are
    poorly aligned, but putting the tag on the other class costs nothing: no failure."""
    f = finding(calibrated_alignment=0.0, share=0.2, reliance=0.01, kind="forbidden-concept")
    share = {"id": "share", "check": "shortcut-share", "max_share": 0.15}
    got = verdicts(result([f]), rules(FORBIDDEN, share))
    assert got[("forbidden", "malignant")].status == "pass"
    assert got[("share", "malignant")].status == "pass"


def test_where_reliance_was_not_measured_alignment_decides():
    aligned = finding(calibrated_alignment=0.9, share=0.3, reliance=None)
    poorly = finding(8, calibrated_alignment=0.1, share=0.3, reliance=None)
    got = verdicts(result([aligned]), rules(FORBIDDEN))[("forbidden", "malignant")]
    assert got.status == "pass"
    got = verdicts(result([poorly]), rules(FORBIDDEN))[("forbidden", "malignant")]
    assert got.status == "fail" and "reliance not measurable" in got.message


def test_select_candidates_follows_the_same_rule():
    """alignment above the limit: a forbidden ruler is a finding when relied on (lower bound
    0.15 >= 0.05), not when reliance is not established (0.08, but at least only 0.01), and
    by alignment alone when not measurable."""
    share = torch.tensor([[0.3], [0.3], [0.3]])
    calibrated = torch.tensor([[0.9], [0.9], [0.1]])
    concepts = ["ruler", "scale bar", "band-aid"]
    config = FindingConfig(share_min=0.1, calibrated_alignment_max=0.5, reliance_min=0.05,
                           forbidden={"*": ["ruler", "scale bar", "band-aid"]})
    relied = {("c", "ruler"): reliance("has_ruler", 0.2, low=0.15, detail="column has_ruler"),
              ("c", "scale bar"): reliance("x", 0.08, low=0.01, detail="column x")}
    cands = select_candidates(share, calibrated, torch.ones(3), concepts, torch.ones(3), ["c"],
                              config, calibrated_jc=calibrated, forbidden_reliance=relied)
    assert sorted((c.component, c.kind, c.reliance_low) for c in cands) == [
        (0, "forbidden-concept", 0.15), (2, "forbidden-concept", None)]
    assert {c.component: c.reliance_source for c in cands}[0] == "column has_ruler"


# ------------------------------------------------------------------ concept-reliance


RELIANCE = {"id": "reliance", "check": "concept-reliance"}


def test_concept_reliance_fails_on_an_artifact_a_protected_key_and_a_forbidden_column():
    relied = [reliance("has_tag", 0.2), reliance("skin_tone=dark", 0.06),
              reliance("has_ruler", 0.3), reliance("watermark", 0.9),
              reliance("has_tag", 0.0, class_name="benign")]
    got = verdicts(result(relied=relied), rules(RELIANCE))
    message = got[("reliance", "malignant")].message
    assert got[("reliance", "malignant")].status == "fail"
    assert "`has_tag` (artifact)" in message and "`skin_tone=dark` (protected)" in message
    assert "`has_ruler` (forbidden)" in message and "0.300 accuracy" in message
    assert "watermark" not in message  # no role, not forbidden: not judged (column-roles warns)
    assert got[("reliance", "benign")].status == "fail"  # benign was not measured at all


def test_concept_reliance_passes_below_the_limit_and_says_what_it_measured():
    keys = ["has_tag", "skin_tone=dark", "skin_tone=fair", "has_ruler"]
    relied = [reliance(k, 0.04, class_name=c) for k in keys for c in ("benign", "malignant")]
    got = verdicts(result(relied=relied), rules(RELIANCE))
    v = got[("reliance", "malignant")]
    assert v.status == "pass" and "4 concept(s) measured; largest reliance (lower bound) 0.040" \
        in v.message


def test_confounded_and_unmeasured_concepts_are_not_passed_silently():
    keys = ["has_tag", "skin_tone=dark", "skin_tone=fair"]
    relied = [reliance(k, 0.0, class_name=c) for k in keys for c in ("benign", "malignant")]
    relied.append(reliance("has_ruler", None, status="confounded",
                           detail="no class has both instances with and without the concept"))
    v = verdicts(result(relied=relied), rules(RELIANCE))[("reliance", "malignant")]
    assert v.status == "fail" and "no class has both" in v.message
    too_few = relied[:-1] + [reliance("has_ruler", None, status="too-few")]
    v = verdicts(result(relied=too_few), rules(RELIANCE))[("reliance", "malignant")]
    assert v.status == "pass" and "1 not measurable" in v.message


def test_the_lower_bound_decides_and_a_watch_rule_can_judge_the_estimate():
    keys = ["has_tag", "skin_tone=dark", "skin_tone=fair", "has_ruler"]
    relied = [reliance(k, 0.0, low=-0.01) for k in keys[1:]] + [reliance("has_tag", 0.06, low=0.03)]
    watch = {**RELIANCE, "id": "watch", "severity": "warn", "bound": "estimate"}
    got = verdicts(result(relied=relied), rules(RELIANCE, watch))
    assert got[("reliance", "malignant")].status == "pass"
    v = got[("watch", "malignant")]
    assert v.status == "warn" and "costs 0.060 accuracy (at least 0.030)" in v.message


def test_forbidden_concepts_without_a_column_are_judged_through_text():
    keys = ["has_tag", "skin_tone=dark", "skin_tone=fair"]
    relied = [reliance(k, 0.0) for k in keys] + [
        reliance("hospital tag", 0.4, source="text"), reliance("has_ruler", 0.0)]
    ruleset = rules(RELIANCE, forbidden=("ruler", "hospital tag"))
    v = verdicts(result(relied=relied), ruleset)[("reliance", "malignant")]
    assert v.status == "fail" and "'hospital tag' (text-defined)" in v.message
    columns_only = rules({**RELIANCE, "sources": ["column"]}, forbidden=("ruler", "hospital tag"))
    assert verdicts(result(relied=relied), columns_only)[("reliance", "malignant")].status == "pass"


def test_a_command_line_role_changes_what_is_judged():
    relied = [reliance(k, 0.0) for k in ("has_tag", "skin_tone=dark", "skin_tone=fair",
                                         "has_ruler")] + [reliance("watermark", 0.5)]
    ruleset = rules(RELIANCE)
    assert verdicts(result(relied=relied), ruleset)[("reliance", "malignant")].status == "pass"
    with_role = ruleset.with_column_roles({"watermark": "artifact"})
    v = verdicts(result(relied=relied), with_role)[("reliance", "malignant")]
    assert v.status == "fail" and "`watermark` (artifact)" in v.message
    assert ruleset.role_overrides == {}  # the original rule set is unchanged


# ------------------------------------------------------------------ sae-coverage


COVERAGE = {"id": "coverage", "check": "sae-coverage"}


def _coverage(column, decodable, best, group=None):
    return ColumnCoverage(column, 1000, 300, "measured", decodable, 12, best,
                          "ruler" if group else None, group)


def test_an_sae_blind_to_a_forbidden_column_fails_and_says_what_to_change():
    covered = [_coverage("has_tag", 0.99, 0.97), _coverage("skin_tone=dark", 0.99, 0.95),
               _coverage("skin_tone=fair", 0.99, 0.95),
               _coverage("has_ruler", 0.99, 0.71, group=0.74)]
    res = result(coverage=covered)
    res = dataclasses.replace(res, provenance={**res.provenance,
                                               "sae": {**res.provenance["sae"], "n_latents": 768,
                                                       "k": 32}})
    v = verdicts(res, rules(COVERAGE))[("coverage", None)]
    assert v.status == "fail"
    assert v.message.startswith("the SAE cannot see `has_ruler`: decodable at AUC 0.99, best "
                                "component 0.71 (#12), best concept group 0.74 ('ruler'); "
                                "findings about it are blind")
    assert "768 latents, k 32" in v.message and "more training rows" in v.message
    split = [*covered[:3], _coverage("has_ruler", 0.99, 0.71, group=0.95)]
    assert verdicts(result(coverage=split), rules(COVERAGE))[("coverage", None)].status == "pass"
    undecodable = [*covered[:3], _coverage("has_ruler", 0.6, 0.55)]
    v = verdicts(result(coverage=undecodable), rules(COVERAGE))[("coverage", None)]
    assert v.status == "pass" and "has_ruler not-decodable" in v.message


def test_coverage_not_measured_for_a_judged_column_fails():
    v = verdicts(result(coverage=[]), rules(COVERAGE))[("coverage", None)]
    assert v.status == "fail" and "not measured by this audit" in v.message


# ------------------------------------------------------------------ column-roles, calibration


def test_a_binary_column_no_rule_reads_gets_a_warning():
    roles = {"id": "roles", "check": "column-roles", "severity": "warn"}
    v = verdicts(result(), rules(roles))[("roles", None)]
    assert v.status == "warn" and "`watermark` has no role" in v.message
    assert "has_ruler" not in v.message and "lesion_size" not in v.message  # forbidden; ignored
    declared = rules(roles, metadata={"ignored_columns": ["water*"]})
    assert verdicts(result(), declared)[("roles", None)].status == "pass"
    assert exit_code(evaluate(result(), rules(roles), today=TODAY)) == 0


@pytest.mark.parametrize("calibration, status", [
    ([ClassCalibration("malignant", 0.1, "labels", 50)], "pass"),
    ([ClassCalibration("malignant", -0.01, "uncalibrated: the reference CLIP's texts do not "
                       "favour the class's own images", 50)], "fail"),
    ([], "fail"),
])
def test_alignment_calibration(calibration, status):
    spec = {"id": "calibration", "check": "alignment-calibration"}
    v = verdicts(result(calibration=calibration), rules(spec))[("calibration", "malignant")]
    assert v.status == status


@pytest.mark.parametrize("low, status", [(None, "fail"), (0.08, "fail"), (0.049, "pass"),
                                         (0.0, "pass")])
def test_metadata_confirmed_defers_to_the_causal_test_of_the_same_column(low, status):
    """A finding that predicts an artifact column fails metadata-confirmed unless the head's
    measured reliance on that column (the concept route) stays under the limit: then the
    component carries evidence that does not move predictions, and the verdict says both."""
    f = finding(concept="tag", share=0.15, metadata_auc={"has_tag": 1.0})
    f = dataclasses.replace(f, calibrated_alignment=0.1, backed=True)
    relied = [] if low is None else [reliance("has_tag", low, low=low)]
    v = verdicts(result([f], relied), rules({"id": "meta", "check": "metadata-confirmed"}))
    verdict = v[("meta", "malignant")]
    assert verdict.status == status
    if status == "pass":
        assert "has_tag" in verdict.message and f"at least {low:.3f}" in verdict.message
    # another class's or another column's reliance never decides
    other = [reliance("has_tag", 0.0, low=0.0, class_name="benign"), reliance("has_ruler", 0.0, low=0.0)]
    assert verdicts(result([f], other), rules({"id": "meta", "check": "metadata-confirmed"})
                    )[("meta", "malignant")].status == "fail"
