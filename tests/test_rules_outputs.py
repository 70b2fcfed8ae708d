"""Gate outputs: junit.xml, summary.md (user data escaped), and ``rules apply`` exit codes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import xml.etree.ElementTree as ET

import pytest
from test_rules_support import audit, finding
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.gate import (
    apply_rules,
    evaluate,
    parse_ruleset,
    render_summary_md,
    write_junit,
)
from clipaudit.results import load_audit, save_audit

runner = CliRunner()

RULES = {
    "version": 1,
    "thresholds": {"share_min": 0.05, "calibrated_alignment_max": 0.02, "clarity_min": 0.3},
    "concepts": {"forbidden": {"*": ["ruler"]}},
    "checks": [
        {"id": "no-shortcuts", "check": "shortcut-share", "max_share": 0.15},
        {"id": "forbidden", "check": "forbidden-concept", "severity": "warn"},
        {"id": "sae", "check": "sae-quality", "max_fvu": 0.5},
        {"id": "new", "check": "baseline-regression"},
    ],
    "waivers": [{"component": 2, "reason": "accepted <b>by</b> QA", "expires": "2099-01-01"}],
}
HOSTILE = ("<script>alert(1)</script>", "a|b", "**bold** [x](http://e) `c` @team")


def judged(findings, classes=("benign", "malignant")):
    result = audit(findings, classes=classes)
    verdicts = evaluate(result, parse_ruleset(RULES), today=dt.date(2026, 1, 1))
    return dataclasses.replace(result, verdicts=verdicts, rules_file="team<rules>.yaml")


def test_junit_has_one_case_per_rule_and_class_with_failures_marked(tmp_path):
    result = judged([finding(1, share=0.3), finding(2, share=0.3, class_name="benign")])
    root = ET.parse(write_junit(result, tmp_path / "junit.xml")).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(result.verdicts) == 3 * 2 + 1
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert ("clipaudit.probe", "no-shortcuts [malignant]") in names
    assert ("clipaudit.audit", "sae") in names
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["no-shortcuts [malignant]"]
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert [c.get("name") for c in skipped] == ["no-shortcuts [benign]", "forbidden [benign]"]
    assert root.get("tests") == "7" and root.get("failures") == "1"


@pytest.mark.parametrize("class_name", [*HOSTILE, "ctrl\x00\x1b[31m"])
def test_junit_escapes_user_data(tmp_path, class_name):
    result = judged([finding(1, share=0.3, class_name=class_name)], classes=(class_name,))
    root = ET.parse(write_junit(result, tmp_path / "junit.xml")).getroot()
    names = [c.get("name") for c in root.iter("testcase")]
    assert f"no-shortcuts [{class_name}]" in names or "\x00" in class_name
    assert len(names) == len(result.verdicts)


def test_summary_leads_with_the_verdict_and_lists_failing_rules():
    failing = render_summary_md(judged([finding(1, share=0.3)]))
    assert failing.splitlines()[0] == "## ❌ clipaudit gate: FAIL"
    assert "### Failing rules" in failing and "no\\-shortcuts" not in failing
    assert "| no-shortcuts | probe | malignant |" in failing
    assert "**1 failing**" in failing and "### Waived" not in failing
    waived = render_summary_md(judged([finding(2, share=0.3)]))
    assert waived.splitlines()[0] == "## ✅ clipaudit gate: PASS"
    assert "### Waived" in waived and "accepted &lt;b&gt;by&lt;/b&gt; QA" in waived
    warned = render_summary_md(judged([finding(3, share=0.1)]))  # ruler: a warn rule
    assert warned.splitlines()[0] == "## ⚠️ clipaudit gate: WARN"
    assert "### Warnings" in warned and "### Failing rules" not in warned


@pytest.mark.parametrize("class_name", HOSTILE)
def test_summary_escapes_user_data(class_name):
    md = render_summary_md(judged([finding(1, share=0.3, class_name=class_name,
                                           concept=class_name)], classes=(class_name,)))
    assert "<script>" not in md and "`c`" not in md and "@team" not in md
    assert "[x](" not in md and "**bold**" not in md
    for line in md.splitlines():
        if line.startswith("| no-shortcuts"):
            assert line.count("|") - line.count("\\|") == 5  # the class name adds no column


# ------------------------------------------------------------------ rules apply


@pytest.fixture
def audit_dpath(tmp_path):
    dpath = tmp_path / "audit"
    save_audit(audit([finding(1, share=0.3, concept="blob")]), dpath)
    return dpath


def _rules_file(tmp_path, **changes):
    fpath = tmp_path / "rules.yaml"
    fpath.write_text(json.dumps({**RULES, **changes}))  # JSON is YAML
    return fpath


def test_rules_apply_fails_with_exit_1_and_writes_the_outputs(tmp_path, audit_dpath):
    result = runner.invoke(app, ["rules", "apply", str(audit_dpath),
                                 "--rules", str(_rules_file(tmp_path)), "--json"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "fail" and doc["exit_code"] == 1
    saved = load_audit(audit_dpath)
    assert saved.verdict == "fail" and len(saved.verdicts) == len(doc["verdicts"])
    assert ET.parse(audit_dpath / "junit.xml").getroot().get("failures") == "1"
    assert "FAIL" in (audit_dpath / "summary.md").read_text()


def test_rules_apply_passes_with_exit_0_when_the_failure_is_waived(tmp_path, audit_dpath):
    rules = _rules_file(tmp_path, waivers=[{"component": 1, "reason": "known, fix in v3"}])
    result = runner.invoke(app, ["rules", "apply", str(audit_dpath), "--rules", str(rules)])
    assert result.exit_code == 0, result.output
    assert "waived" in result.stdout


def test_rules_apply_with_a_baseline_fails_only_on_new_findings(tmp_path, audit_dpath):
    base = tmp_path / "base"
    save_audit(audit([finding(1, share=0.3)], audit_id="run-1"), base)
    run = apply_rules(audit_dpath, _rules_file(tmp_path), baseline=base)
    assert run.exit_code == 0 and run.baseline_dpath == base
    save_audit(audit([finding(5, share=0.3)], audit_id="run-1"), base)
    assert apply_rules(audit_dpath, _rules_file(tmp_path), baseline=base).exit_code == 1


@pytest.mark.parametrize("setup, match", [
    ("untrusted", "SAE was trained for backbone"),
    ("missing", "file not found"),
    ("bad-rules", "checks[0].max_share"),
])
def test_rules_apply_exits_2_on_input_errors(tmp_path, audit_dpath, setup, match):
    rules = _rules_file(tmp_path)
    target = audit_dpath
    if setup == "untrusted":
        prov = {"backbone": {"id": "a"}, "sae": {"backbone_id": "b"}}
        save_audit(audit([finding()], provenance=prov), audit_dpath)
    elif setup == "missing":
        target = tmp_path / "nowhere"
    else:
        rules = _rules_file(tmp_path, checks=[{"id": "x", "check": "shortcut-share",
                                               "max_share": "high"}])
    result = runner.invoke(app, ["rules", "apply", str(target), "--rules", str(rules)])
    assert result.exit_code == 2 and match in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
