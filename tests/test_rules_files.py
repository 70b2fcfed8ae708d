"""Rule files: shipped sets, strict validation with located messages, extends, schema,
and the ``rules check|list|schema`` verbs. Malformed files of any shape must give a
RuleFileError (exit code 2), never a traceback."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError, RuleFileError
from clipaudit.gate import (
    CheckOutcome,
    CheckSpec,
    RuleSet,
    list_checks,
    list_rulesets,
    load_ruleset,
    parse_ruleset,
    register_check,
    ruleset_json_schema,
)
from clipaudit.gate import registry as gate_registry
from clipaudit.resources import rules_dpath

runner = CliRunner()

VALID = {
    "version": 1,
    "thresholds": {"share_min": 0.1, "calibrated_alignment_max": 0.02, "clarity_min": 0.3},
    "concepts": {"forbidden": {"*": ["ruler"], "malignant": ["hair"]},
                 "synonyms": {"ruler": ["scale bar"]}},
    "metadata": {"artifact_columns": ["has_*"], "auc_min": 0.9},
    "checks": [
        {"id": "no-shortcuts", "check": "shortcut-share", "severity": "fail", "max_share": 0.15},
        {"id": "forbidden", "check": "forbidden-concept"},
        {"id": "sae", "check": "sae-quality", "max_fvu": 0.5},
    ],
    "waivers": [{"component": 3, "reason": "known, fixed in v2", "expires": "2027-01-31"}],
}


def write_rules(dpath: Path, data, name: str = "rules.yaml") -> Path:
    fpath = dpath / name
    fpath.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return fpath


# ------------------------------------------------------------------ shipped rule sets


def test_shipped_rule_sets_load_and_lint():
    assert {"default", "dermatology", "strict"} <= set(list_rulesets())
    for name in list_rulesets():
        ruleset = load_ruleset(name)
        assert ruleset.name == name and ruleset.checks
        assert runner.invoke(app, ["rules", "check", str(rules_dpath() / f"{name}.yaml")]
                             ).exit_code == 0


@pytest.mark.parametrize("label", [
    "ruler", "measuring ruler", "band-aid", "Band Aid", "plaster", "skin marker", "ink marker",
    "hair", "gel bubbles", "dark corners", "vignette", "colour chart", "color chart", "text",
    "date stamp", "reflection", "dark skin",
])
@pytest.mark.parametrize("class_name", ["benign", "malignant"])
def test_dermatology_forbids_the_artifacts_for_every_class(label, class_name):
    assert load_ruleset("dermatology").concept_status(class_name, label) == "forbidden"
    assert load_ruleset("default").concept_status(class_name, label) in (None, "forbidden")


@pytest.mark.parametrize("label", ["irregular border", "dark lesion", "malignant melanoma",
                                   "pink skin", "benign nevus"])
def test_dermatology_does_not_forbid_the_lesion_itself(label):
    assert load_ruleset("dermatology").concept_status("malignant", label) != "forbidden"


def test_dermatology_extends_default_with_a_stricter_limit():
    default, derm = load_ruleset("default"), load_ruleset("dermatology")
    assert [p.name for p in derm.sources] == ["dermatology.yaml", "default.yaml"]
    assert {c.id for c in default.checks} <= {c.id for c in derm.checks}
    share = {r.name: next(c for c in r.checks if c.id == "no-shortcuts").max_share
             for r in (default, derm)}
    assert share["dermatology"] < share["default"]
    # which components are findings is not stricter: 0.05 flagged chance reliance
    assert derm.thresholds.share_min == default.thresholds.share_min
    # forbidden lists add up: default's watermark stays forbidden
    assert derm.concept_status("benign", "watermark") == "forbidden"


def test_finding_config_carries_thresholds_and_expanded_concepts():
    ruleset = parse_ruleset(VALID)
    config = ruleset.finding_config()
    assert (config.share_min, config.calibrated_alignment_max, config.clarity_min) == (0.1, 0.02, 0.3)
    assert {"ruler", "scale bar"} <= set(config.forbidden["*"])
    assert config.forbidden["malignant"] == ["hair"]


# ------------------------------------------------------------------ located errors


@pytest.mark.parametrize("patch, expected", [
    ({"checks": [{"id": "a", "check": "shortcut-share", "max_share": "high"}]},
     "checks[0].max_share: expected a number, got 'high'"),
    ({"checks": [{"id": "a", "check": "shortcut-share", "max_share": 0.1},
                 {"id": "b", "check": "nope"}]},
     "checks[1].check: unknown check 'nope'. Available: alignment-calibration, baseline-regression"),
    ({"checks": [{"id": "a", "check": "shortcut-share", "max_share": 0.1, "max_shar": 1}]},
     "checks[0].max_shar: unknown key 'max_shar' (did you mean 'max_share'?"),
    ({"checks": [{"id": "a", "check": "forbidden-concept", "severity": "fatal"}]},
     "checks[0].severity: expected 'fail' or 'warn', got 'fatal'"),
    ({"thresholds": {"share_min": 1.5}}, "thresholds.share_min: must be <= 1.0, got 1.5"),
    ({"thresholds": {"share_min": float("nan")}}, "thresholds.share_min: expected a finite"),
    ({"concepts": {"forbidden": {"*": "ruler"}}},
     "concepts.forbidden[\"*\"]: expected a list, got 'ruler'"),
    ({"waivers": [{"component": 3}]}, "waivers[0].reason: required key is missing"),
    ({"waivers": [{"reason": "because"}]}, "waivers[0]: a waiver needs at least one of"),
    ({"waivers": [{"concept": "hair", "reason": "because", "expires": "31/01/2027"}]},
     "waivers[0].expires: expected a date like 2027-01-31, got '31/01/2027'"),
    ({"version": 2}, "version: expected 1, got 2"),
    ({"colour": "red"}, "colour: unknown key 'colour'"),
    ({"checks": [{"id": "a", "check": "forbidden-concept"},
                 {"id": "a", "check": "forbidden-concept"}]}, "duplicate rule id 'a'"),
    ({"waivers": [{"rule": "missing", "reason": "because"}]}, "waivers[0].rule: no rule"),
    ({"checks": []}, "checks: the rule set runs no checks"),
])
def test_errors_name_file_path_and_problem(tmp_path, patch, expected):
    fpath = write_rules(tmp_path, {**VALID, **patch}, name="x.yaml")
    with pytest.raises(RuleFileError) as info:
        load_ruleset(fpath)
    assert expected in str(info.value)
    assert all(line.startswith(str(fpath)) for line in str(info.value).splitlines())


@pytest.mark.parametrize("text, expected", [
    ("", "the rule file is empty"),
    ("- 1\n- 2\n", "expected a mapping of rule settings at the top level, got list"),
    ("version: 1\nversion: 1\n", "line 2, column 1: invalid YAML (duplicate key 'version')"),
    ("version: [1\n", "invalid YAML"),
    ("version: 1\nchecks: &a [*a]\n", "checks"),
])
def test_unreadable_yaml_is_a_rule_file_error(tmp_path, text, expected):
    with pytest.raises(RuleFileError, match=r"rules\.yaml: ") as info:
        load_ruleset(write_rules(tmp_path, text))
    assert expected in str(info.value)


def test_every_problem_gets_its_own_line(tmp_path):
    fpath = write_rules(tmp_path, {**VALID, "thresholds": {"share_min": "x", "clarity_min": "y"}})
    with pytest.raises(RuleFileError) as info:
        load_ruleset(fpath)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "share_min" in lines[0] and "clarity_min" in lines[1]


def test_unknown_name_is_an_input_error():
    with pytest.raises(InputError, match="not a shipped rule set"):
        load_ruleset("no-such-rules")


# ------------------------------------------------------------------ extends


def test_extends_merges_and_resolves_relative_paths(tmp_path):
    (tmp_path / "team").mkdir()
    write_rules(tmp_path, {**VALID, "baseline": "audits/v1"}, name="base.yaml")
    child = write_rules(tmp_path / "team", {
        "version": 1, "extends": "../base.yaml",
        "concepts": {"forbidden": {"*": ["logo"]}},
        "checks": [{"id": "no-shortcuts", "check": "shortcut-share", "max_share": 0.05}],
        "disable": ["sae"],
        "waivers": [{"concept": "hair", "reason": "accepted by the clinic"}],
    }, name="child.yaml")
    ruleset = load_ruleset(child)
    assert [c.id for c in ruleset.checks] == ["no-shortcuts", "forbidden"]
    assert ruleset.checks[0].max_share == 0.05
    assert ruleset.concepts.forbidden["*"] == ["ruler", "logo"]
    assert len(ruleset.waivers) == 2
    assert ruleset.baseline == (tmp_path / "audits" / "v1").resolve()
    assert [p.name for p in ruleset.sources] == ["child.yaml", "base.yaml"]


@pytest.mark.parametrize("child, expected", [
    ({"extends": "child.yaml"}, "extends: cycle"),
    ({"extends": "missing.yaml"}, "is neither a shipped rule set"),
    ({"extends": "default", "disable": ["nope"]}, "disable[0]: the extended rule set has no"),
])
def test_extends_errors(tmp_path, child, expected):
    with pytest.raises(RuleFileError, match="child.yaml") as info:
        load_ruleset(write_rules(tmp_path, {"version": 1, **child}, name="child.yaml"))
    assert expected in str(info.value)


def test_a_problem_in_the_parent_names_the_parent(tmp_path):
    write_rules(tmp_path, {**VALID, "thresholds": {"share_min": "high"}}, name="base.yaml")
    child = write_rules(tmp_path, {"version": 1, "extends": "base.yaml"}, name="child.yaml")
    with pytest.raises(RuleFileError, match=r"base\.yaml: thresholds\.share_min"):
        load_ruleset(child)


# ------------------------------------------------------------------ schema + registry


def test_shipped_schema_is_the_generated_schema():
    shipped = json.loads((rules_dpath() / "schema.json").read_text())
    assert shipped == ruleset_json_schema(), "regenerate: clipaudit rules schema > rules/schema.json"
    check_schemas = shipped["properties"]["checks"]["items"]["oneOf"]
    assert len(check_schemas) == len(list_checks())
    result = runner.invoke(app, ["rules", "schema"])
    assert result.exit_code == 0 and json.loads(result.stdout) == shipped


@pytest.fixture
def plugin_check():
    class MaxFindings(CheckSpec):
        limit: int = 3
        """Most findings a class may have."""

    @register_check("max-findings", params=MaxFindings)
    def max_findings(spec, scope):
        """Too many findings."""
        return CheckOutcome([], "ok")

    yield "max-findings"
    gate_registry._REGISTRY.pop("max-findings")
    gate_registry._MODEL_CACHE.clear()


def test_registered_checks_are_validated_by_their_own_parameters(plugin_check):
    assert plugin_check in list_checks()
    spec = {"id": "few", "check": plugin_check, "limit": 2}
    assert parse_ruleset({"version": 1, "checks": [spec]}).checks[0].limit == 2
    with pytest.raises(RuleFileError, match=r"checks\[0\]\.limit: expected an integer"):
        parse_ruleset({"version": 1, "checks": [{**spec, "limit": "two"}]})
    with pytest.raises(RuleFileError, match="max-findings"):
        parse_ruleset({"version": 1, "checks": [{"id": "x", "check": "unknown"}]})


# ------------------------------------------------------------------ CLI


def test_rules_check_cli(tmp_path):
    good = write_rules(tmp_path, VALID, name="good.yaml")
    bad = write_rules(tmp_path, {**VALID, "thresholds": {"share_min": "high"}}, name="bad.yaml")
    ok = runner.invoke(app, ["rules", "check", str(good)])
    assert ok.exit_code == 0 and "valid" in ok.stdout
    fail = runner.invoke(app, ["rules", "check", str(bad)])
    assert fail.exit_code == 2 and "thresholds.share_min: expected a number" in fail.stderr
    as_json = runner.invoke(app, ["rules", "check", str(bad), "--json"])
    assert as_json.exit_code == 2 and json.loads(as_json.stdout)["valid"] is False
    listed = runner.invoke(app, ["rules", "list", "--json"])
    names = {c["name"] for c in json.loads(listed.stdout)["checks"]}
    assert listed.exit_code == 0 and names == set(list_checks())


# ------------------------------------------------------------------ any shape, never a traceback

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["fail", "warn", "shortcut-share", "*", "2027-01-31",
                                           "sae-quality", "ruler", "0.1", ""]),
)
_keys = st.one_of(st.sampled_from(
    ["version", "checks", "id", "check", "max_share", "severity", "waivers", "reason",
     "component", "expires", "thresholds", "share_min", "concepts", "forbidden", "extends",
     "baseline", "metadata", "disable", "class", "synonyms", "max_fvu"]),
    st.text(string.ascii_letters, max_size=8), st.integers(0, 3))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


def _assert_clean(fpath: Path) -> None:
    try:
        assert isinstance(load_ruleset(fpath), RuleSet)
        expected_exit = 0
    except RuleFileError as e:
        assert str(e).startswith(str(fpath))
        expected_exit = 2
    result = runner.invoke(app, ["rules", "check", str(fpath)])
    assert result.exit_code == expected_exit, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


_fuzz = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(data=_values)
def test_any_structure_is_a_rule_set_or_a_rule_file_error(tmp_path, data):
    fpath = tmp_path / "fuzz.yaml"
    fpath.write_text(yaml.safe_dump(data))
    _assert_clean(fpath)


@_fuzz
@given(path=st.lists(st.sampled_from(["checks", "waivers", "thresholds", "concepts", 0, 1, 2,
                                      "max_share", "forbidden", "*", "id", "expires"]),
                     min_size=1, max_size=4), junk=_values)
def test_a_valid_file_with_junk_anywhere_is_a_rule_file_error_or_valid(tmp_path, path, junk):
    data = json.loads(json.dumps(VALID))
    node = data
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            break
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int)
                                  and path[-1] < len(node)):
        node[path[-1]] = junk
    fpath = tmp_path / "mutated.yaml"
    fpath.write_text(yaml.safe_dump(data))
    _assert_clean(fpath)


@_fuzz
@given(text=st.text(max_size=200))
def test_any_text_is_a_rule_set_or_a_rule_file_error(tmp_path, text):
    fpath = tmp_path / "text.yaml"
    fpath.write_text(text, encoding="utf-8", errors="surrogatepass")
    _assert_clean(fpath)
