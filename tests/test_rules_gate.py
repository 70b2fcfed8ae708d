"""The gate: each check fails exactly when its threshold is crossed, waivers and their
expiry, baselines (same SAE and changed SAE), trust, and evaluate's verdict shape."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules_support import audit, finding

from clipaudit.errors import ArtifactError, MismatchError
from clipaudit.gate import evaluate, exit_code, parse_ruleset

TODAY = dt.date(2026, 6, 1)
THRESHOLDS = {"share_min": 0.05, "calibrated_alignment_max": 0.02, "clarity_min": 0.3}


def rules(*checks: dict, waivers=(), **extra) -> object:
    return parse_ruleset({"version": 1, "thresholds": THRESHOLDS,
                          "concepts": {"forbidden": {"*": ["ruler"]},
                                       "synonyms": {"ruler": ["scale bar"]}},
                          "checks": list(checks), "waivers": list(waivers), **extra})


def verdicts_of(result, ruleset, **kw):
    return evaluate(result, ruleset, today=TODAY, **kw)


def statuses(result, ruleset, **kw) -> dict:
    return {(v.rule, v.head, v.class_name): v.status for v in verdicts_of(result, ruleset, **kw)}


SHARE = {"id": "share", "check": "shortcut-share", "max_share": 0.15}


def just_over(x: float) -> float:
    return math.nextafter(x, math.inf)


def just_under(x: float) -> float:
    return math.nextafter(x, -math.inf)


# ------------------------------------------------------------------ each check's boundary


@pytest.mark.parametrize("share, status", [(0.15, "pass"), (just_over(0.15), "fail"),
                                           (0.5, "fail"), (0.06, "pass")])
def test_shortcut_share_fails_only_above_the_limit(share, status):
    got = statuses(audit([finding(share=share)]), rules(SHARE))
    assert got[("share", "probe", "malignant")] == status
    assert got[("share", "probe", "benign")] == "pass"


def test_shortcut_share_counts_a_split_concept_whole():
    """Two ruler components of 0.08 each (0.16 together) fail a 0.15 limit; the message
    names both figures. One of 0.03 counts towards its concept, not alone."""
    split = [finding(3, share=0.08, concept_share=0.16), finding(4, share=0.08, concept_share=0.16)]
    (verdict,) = [v for v in verdicts_of(audit(split), rules(SHARE))
                  if v.class_name == "malignant"]
    assert verdict.status == "fail"
    assert "0.080" in verdict.message and "0.160" in verdict.message
    small = [finding(3, share=0.03, concept_share=0.12)]
    assert statuses(audit(small), rules(SHARE))[("share", "probe", "malignant")] == "pass"
    below_member = [finding(3, share=0.01, concept_share=0.5)]  # under member_share_min 0.02
    assert statuses(audit(below_member), rules(SHARE))[("share", "probe", "malignant")] == "pass"


@pytest.mark.parametrize("field, value, counted", [
    ("share", 0.05, True), ("share", just_under(0.05), False),
    ("calibrated_alignment", just_under(0.02), True), ("calibrated_alignment", 0.02, False),
    ("clarity", 0.3, True), ("clarity", just_under(0.3), False),
])
def test_rule_set_thresholds_decide_which_findings_count(field, value, counted):
    spec = {**SHARE, "max_share": 0.0}
    kwargs = {"share": 0.2, field: value}
    got = statuses(audit([finding(**kwargs)]), rules(spec))
    assert got[("share", "probe", "malignant")] == ("fail" if counted else "pass")


@pytest.mark.parametrize("value, status", [(0.3, "pass"), (just_over(0.3), "fail")])
def test_unexplained_share_fails_only_above_the_limit(value, status):
    spec = {"id": "unexplained", "check": "unexplained-share", "max_share": 0.3}
    got = statuses(audit(unexplained=value), rules(spec))
    assert set(got.values()) == {status} and len(got) == 2


@pytest.mark.parametrize("metrics, status", [
    ({"fvu": 0.4, "dead_fraction": 0.5}, "pass"),
    ({"fvu": just_over(0.4), "dead_fraction": 0.5}, "fail"),
    ({"fvu": 0.4, "dead_fraction": just_over(0.5)}, "fail"),
    ({"dead_fraction": 0.1}, "fail"),
])
def test_sae_quality_fails_above_either_limit_or_without_the_metric(metrics, status):
    spec = {"id": "sae", "check": "sae-quality", "max_fvu": 0.4, "max_dead_fraction": 0.5}
    verdicts = verdicts_of(audit(sae_metrics=metrics), rules(spec))
    assert len(verdicts) == 1 and verdicts[0].class_name is None
    assert verdicts[0].status == status
    assert verdicts[0].details["limits"] == {"fvu": 0.4, "dead_fraction": 0.5}


@pytest.mark.parametrize("auc, symmetric, status", [
    (0.9, True, "fail"), (just_under(0.9), True, "pass"), (0.1, True, "fail"),
    (0.1, False, "pass"), (0.5, True, "pass"),
])
def test_metadata_confirmed_triggers_at_the_auc(auc, symmetric, status):
    spec = {"id": "meta", "check": "metadata-confirmed", "symmetric": symmetric}
    f = finding(concept="blob", metadata_auc={"has_ruler": auc, "label_noise": 0.99})
    ruleset = rules(spec, metadata={"artifact_columns": ["HAS_*"], "auc_min": 0.9})
    assert statuses(audit([f]), ruleset)[("meta", "probe", "malignant")] == status


def test_metadata_confirmed_ignores_unlisted_columns_and_skips_without_columns():
    f = finding(concept="blob", metadata_auc={"label_noise": 0.99})
    spec = {"id": "meta", "check": "metadata-confirmed"}
    listed = rules(spec, metadata={"protected_columns": ["skin_tone*"]})
    assert set(statuses(audit([f]), listed).values()) == {"pass"}
    unlisted = verdicts_of(audit([f]), rules(spec))
    assert all(v.status == "pass" and v.message.startswith("skipped") for v in unlisted)


@pytest.mark.parametrize("concept, share, status", [
    ("ruler", 0.1, "fail"), ("Measuring Ruler", 0.1, "fail"), ("scale bar", 0.1, "fail"),
    ("ruler", just_under(0.1), "pass"), ("rulership", 0.2, "pass"), ("lesion", 0.2, "pass"),
])
def test_forbidden_concept_matches_words_synonyms_and_min_share(concept, share, status):
    spec = {"id": "forbidden", "check": "forbidden-concept", "min_share": 0.1}
    got = statuses(audit([finding(concept=concept, share=share)]), rules(spec))
    assert got[("forbidden", "probe", "malignant")] == status


def test_expected_concepts_never_fail_but_forbidden_wins():
    ruleset = rules(SHARE, concepts={"expected": {"malignant": ["border", "ruler"]},
                                     "forbidden": {"*": ["ruler"]}})
    expected = statuses(audit([finding(concept="irregular border")]), ruleset)
    forbidden = statuses(audit([finding(concept="ruler")]), ruleset)
    assert expected[("share", "probe", "malignant")] == "pass"
    assert forbidden[("share", "probe", "malignant")] == "fail"


@settings(max_examples=60, deadline=None)
@given(shares=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
       limit=st.floats(0.0, 1.0))
def test_shortcut_share_fails_iff_a_counted_share_exceeds_the_limit(shares, limit):
    findings = [finding(j, share=s) for j, s in enumerate(shares)]
    spec = {**SHARE, "max_share": limit}
    got = statuses(audit(findings), rules(spec))[("share", "probe", "malignant")]
    counted = [s for s in shares if s >= THRESHOLDS["share_min"]]
    assert (got == "fail") == any(s > limit for s in counted)


# ------------------------------------------------------------------ verdict shape


def test_one_verdict_per_rule_head_and_class_and_severity():
    ruleset = rules(SHARE, {**SHARE, "id": "watch", "severity": "warn", "max_share": 0.1},
                    {"id": "sae", "check": "sae-quality", "max_fvu": 0.5})
    result = audit([finding(share=0.12, head="zero-shot")], heads=("probe", "zero-shot"))
    verdicts = verdicts_of(result, ruleset)
    assert len(verdicts) == 2 * 2 * 2 + 1
    got = {(v.rule, v.head, v.class_name): v for v in verdicts}
    watch = got[("watch", "zero-shot", "malignant")]
    assert watch.status == "warn" and "0.120" in watch.message
    assert watch.details["violations"][0]["component"] == 7
    assert exit_code(verdicts) == 0


def test_rule_limited_to_a_missing_class_warns_instead_of_checking_nothing():
    ruleset = rules({**SHARE, "classes": ["melanoma"], "heads": ["probe"]})
    verdicts = verdicts_of(audit([finding(share=0.9)]), ruleset)
    assert [(v.status, v.class_name) for v in verdicts] == [("warn", "melanoma")]


# ------------------------------------------------------------------ waivers


@pytest.mark.parametrize("waiver, waived", [
    ({"component": 7}, True),
    ({"component": 7, "head": "probe", "class": "malignant", "rule": "share"}, True),
    ({"concept": "Scale Bar"}, True),
    ({"component": 8}, False),
    ({"component": 7, "class": "benign"}, False),
    ({"component": 7, "head": "zero-shot"}, False),
    ({"component": 7, "expires": "2026-06-01"}, True),
    ({"component": 7, "expires": "2026-05-31"}, False),
])
def test_waivers_turn_a_failure_into_a_pass_until_they_expire(waiver, waived):
    ruleset = rules(SHARE, waivers=[{**waiver, "reason": "reviewed by the clinic"}])
    (verdict,) = [v for v in verdicts_of(audit([finding()]), ruleset)
                  if v.class_name == "malignant"]
    if waived:
        assert verdict.status == "pass" and verdict.waived == "reviewed by the clinic"
        assert exit_code([verdict]) == 0
    else:
        assert verdict.status == "fail" and verdict.waived is None
        assert exit_code([verdict]) == 1
    if "expires" in waiver and not waived:
        assert "waiver expired on 2026-05-31 (reviewed by the clinic)" in verdict.message
        assert verdict.details["expired_waivers"][0]["expires"] == "2026-05-31"


def test_expiry_uses_the_evaluation_day():
    ruleset = rules(SHARE, waivers=[{"component": 7, "reason": "until the fix",
                                     "expires": "2026-06-30"}])
    before = evaluate(audit([finding()]), ruleset, today=dt.date(2026, 6, 30))
    after = evaluate(audit([finding()]), ruleset, today=dt.date(2026, 7, 1))
    assert exit_code(before) == 0 and exit_code(after) == 1


def test_a_waiver_covers_only_its_findings():
    ruleset = rules(SHARE, waivers=[{"component": 7, "reason": "known"}])
    (verdict,) = [v for v in verdicts_of(audit([finding(7), finding(8)]), ruleset)
                  if v.class_name == "malignant"]
    assert verdict.status == "fail" and verdict.waived is None
    assert [w["component"] for w in verdict.details["waived"]] == [7]
    assert "component 8" in verdict.message and "component 7" not in verdict.message


def test_a_rule_waiver_covers_an_audit_level_failure():
    spec = {"id": "sae", "check": "sae-quality", "max_fvu": 0.1}
    ruleset = rules(spec, waivers=[{"rule": "sae", "reason": "SAE v2 under training"}])
    (verdict,) = verdicts_of(audit(), ruleset)
    assert verdict.status == "pass" and verdict.waived == "SAE v2 under training"


# ------------------------------------------------------------------ baseline

NEW = {"id": "new", "check": "baseline-regression"}


def _unit(i: int, d: int = 8) -> list[float]:
    return [1.0 if k == i else 0.0 for k in range(d)]


def test_baseline_with_the_same_findings_passes_and_a_new_finding_fails():
    base = audit([finding(7)], audit_id="run-1")
    ruleset = rules(NEW, SHARE)
    same = verdicts_of(audit([finding(7)]), ruleset, baseline=base)
    assert exit_code(same) == 0
    shortcut = next(v for v in same if v.rule == "share" and v.class_name == "malignant")
    assert shortcut.waived == "known in baseline audit run-1"
    grown = verdicts_of(audit([finding(7), finding(9, share=0.1)]), ruleset, baseline=base)
    failing = [v for v in grown if v.status == "fail"]
    assert [(v.rule, v.class_name) for v in failing] == [("new", "malignant")]
    assert "component 9" in failing[0].message and "run-1" in failing[0].message


def test_known_findings_fail_other_checks_when_waive_known_is_off():
    base = audit([finding(7)], audit_id="run-1")
    ruleset = rules(NEW, SHARE, baseline_options={"waive_known": False})
    assert exit_code(verdicts_of(audit([finding(7)]), ruleset, baseline=base)) == 1


def test_a_changed_sae_matches_components_by_decoder_direction():
    base = audit([finding(3)], sae_sha="sae-1", directions={3: _unit(0)}, audit_id="run-1")
    renamed = audit([finding(11)], sae_sha="sae-2", directions={11: _unit(0)})
    moved = audit([finding(11)], sae_sha="sae-2", directions={11: _unit(1)})
    ruleset = rules(NEW)
    kept = [v for v in verdicts_of(renamed, ruleset, baseline=base) if v.class_name == "malignant"]
    assert kept[0].status == "pass"
    assert kept[0].details["matches"][0] == {"finding": "probe:malignant:11", "matched": True,
                                             "baseline_finding": "probe:malignant:3",
                                             "method": "direction", "cosine": 1.0}
    assert exit_code(verdicts_of(moved, ruleset, baseline=base)) == 1


@pytest.mark.parametrize("cosine, status", [(0.9, "pass"), (0.89, "fail")])
def test_direction_matching_uses_the_rule_files_min_cosine(cosine, status):
    base = audit([finding(3)], sae_sha="sae-1", directions={3: [1.0, 0.0]}, audit_id="run-1")
    current = audit([finding(5)], sae_sha="sae-2",
                    directions={5: [cosine, math.sqrt(1 - cosine ** 2)]})
    ruleset = rules(NEW, baseline_options={"min_cosine": 0.9})
    got = statuses(current, ruleset, baseline=base)
    assert got[("new", "probe", "malignant")] == status


def test_same_sae_matches_by_component_id_only():
    base = audit([finding(3)], audit_id="run-1")
    assert exit_code(verdicts_of(audit([finding(4)]), rules(NEW), baseline=base)) == 1
    other_class = audit([finding(3, class_name="benign")])
    assert exit_code(verdicts_of(other_class, rules(NEW), baseline=base)) == 1


def test_without_baseline_the_regression_check_skips_unless_required():
    skipped = verdicts_of(audit([finding()]), rules(NEW))
    assert all(v.status == "pass" and "skipped" in v.message for v in skipped)
    required = verdicts_of(audit([finding()]), rules({**NEW, "require_baseline": True}))
    assert {v.status for v in required} == {"fail"}


@pytest.mark.parametrize("base_kwargs, match", [
    ({"sae_sha": "sae-0"}, "no decoder direction"),
    ({"provenance": {"backbone": {"id": "ViT-B-32"}}}, "for backbone 'ViT-B-32'"),
    ({"sae_sha": "sae-0", "directions": {7: [1.0, 0.0, 0.0]}}, "width"),
])
def test_an_incomparable_baseline_is_refused(base_kwargs, match):
    current = audit([finding(7)], directions={7: [1.0, 0.0]})
    base = audit([finding(7)], audit_id="run-1", **base_kwargs)
    with pytest.raises(MismatchError, match=match):
        evaluate(current, rules(NEW), baseline=base)


# ------------------------------------------------------------------ trust


@pytest.mark.parametrize("kwargs, error, match", [
    ({"provenance": {"backbone": {"id": "tiny-vit-a"}, "sae": {"backbone_id": "ViT-B-16"}}},
     MismatchError, "SAE was trained for backbone 'ViT-B-16'"),
    ({"sae_metrics": {"fvu": float("nan")}}, ArtifactError, "sae_metrics.fvu is nan"),
    ({"unexplained": float("inf")}, ArtifactError, "unexplained_share is inf"),
    ({"findings": [finding(class_name="melanoma")]}, ArtifactError, "does not audit"),
])
def test_an_untrustworthy_audit_is_an_error_not_a_verdict(kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(audit(**kwargs), rules(SHARE))
