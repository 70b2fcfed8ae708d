"""Exit codes mean one thing: 0 pass, 1 a rule failed, 2 usage or input error, 3 internal
error. Every verb is forced into an internal error (its library function raises) and
must exit 3 with one line and a crash report, never 1 and never a bare traceback."""

from __future__ import annotations

import errno

import pytest
import typer
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError

# verb -> (arguments after the verb, the library function it calls, patched to raise)
VERBS = {
    "demo": ([], "clipaudit.demo.run_demo"),
    "extract": (["images", "--out", "cache", "--model", "tiny-derm-clip"],
                "clipaudit.cli.cmd_extract.load_image_source"),
    "train-sae": (["cache", "--out", "sae.safetensors"], "clipaudit.sae.train_sae_on_cache"),
    "sae-info": (["sae.safetensors"], "clipaudit.sae.sae_info"),
    "fit-probe": (["cache", "--out", "probe.safetensors"], "clipaudit.heads.fit_probe_on_cache"),
    "explain": (["img.png", "--sae", "sae.safetensors"], "clipaudit.attribution.explain.explain_images"),
    "audit": (["cache", "--sae", "s", "--probe", "p", "--out", "audit"], "clipaudit.audit.run_audit"),
    "report": (["audit"], "clipaudit.report.write_report"),
    "rules check": (["rules.yaml"], "clipaudit.gate.load_ruleset"),
    "rules list": ([], "clipaudit.gate.list_rulesets"),
    "rules schema": ([], "clipaudit.gate.ruleset_json_schema"),
    "rules apply": (["audit", "--rules", "default"], "clipaudit.gate.apply_rules"),
    "synthetic make-dataset": (["--out", "data"], "clipaudit.cli.cmd_synthetic.make_planted_dataset"),
    "synthetic make-counterfactual": (["--out", "pairs", "--artifact", "ruler"],
                                      "clipaudit.cli.cmd_synthetic.make_counterfactual_dataset"),
    "synthetic train-clip": (["--out", "clip"], "clipaudit.cli.cmd_synthetic.train_tiny_clip"),
    "vocab list": ([], "clipaudit.describe.list_vocabulary_infos"),
    "vocab show": (["general"], "clipaudit.describe.vocabulary_info"),
}


def _leaf_commands(command, prefix: str = "") -> list[str]:
    subs = getattr(command, "commands", None)
    if not subs:
        return [prefix.strip()]
    return [name for key, sub in subs.items() for name in _leaf_commands(sub, f"{prefix} {key}")]


def test_the_table_covers_every_verb():
    assert sorted(_leaf_commands(typer.main.get_command(app))) == sorted(VERBS)


def _invoke(verb: str, monkeypatch, tmp_path, error: BaseException, *extra: str):
    args, target = VERBS[verb]
    module, name = target.rsplit(".", 1)

    def fail(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(f"{module}.{name}", fail)
    monkeypatch.setenv("CLIPAUDIT_CRASH_DIR", str(tmp_path / "crashes"))
    monkeypatch.delenv("CLIPAUDIT_DEBUG", raising=False)
    (tmp_path / "crashes").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, [*extra, *verb.split(), *args])


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_an_internal_error_exits_3_with_one_line_and_a_crash_report(verb, monkeypatch, tmp_path):
    res = _invoke(verb, monkeypatch, tmp_path, AttributeError("'NoneType' has no attribute 'W_dec'"))
    assert res.exit_code == 3, res.output
    lines = [line for line in res.stderr.splitlines() if "error" in line]  # demo says hello first
    assert len(lines) == 1, res.stderr
    assert f"clipaudit {verb} failed" in lines[0] and "AttributeError" in lines[0]
    assert "Traceback" not in res.output
    (report,) = (tmp_path / "crashes").iterdir()
    assert str(report) in lines[0]
    text = report.read_text()
    assert "Traceback" in text and "W_dec" in text and f"command: clipaudit {verb}" in text


@pytest.mark.parametrize("verb", ["audit", "rules list"])
def test_debug_prints_the_traceback_wherever_it_is_given(verb, monkeypatch, tmp_path):
    for where in ("before", "after"):
        args = ["--debug"] if where == "before" else []
        res = _invoke(verb, monkeypatch, tmp_path, RuntimeError("boom"), *args) if args else \
            CliRunner().invoke(app, [*verb.split(), *VERBS[verb][0], "--debug"])
        assert res.exit_code == 3, res.output
        assert "Traceback" in res.stderr and "RuntimeError: boom" in res.stderr
    assert not list((tmp_path / "crashes").iterdir())
    # --debug does not stick to the next run in the same process
    res = CliRunner().invoke(app, [*verb.split(), *VERBS[verb][0]])
    assert res.exit_code == 3 and "Traceback" not in res.stderr


@pytest.mark.parametrize("error, code, text", [
    (InputError("cache: not found"), 2, "error: cache: not found"),
    (OSError(errno.ENOSPC, "No space left on device", "audit/audit.json"), 2,
     "audit/audit.json: No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("shapes do not match"), 3, "ValueError: shapes do not match"),
])
def test_each_kind_of_error_has_its_own_code(error, code, text, monkeypatch, tmp_path):
    res = _invoke("audit", monkeypatch, tmp_path, error)
    assert res.exit_code == code, res.output
    assert text in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_usage_errors_stay_2_and_help_documents_the_codes():
    res = CliRunner().invoke(app, ["audit", "--no-such-option"])
    assert res.exit_code == 2
    helped = CliRunner().invoke(app, ["--help"])
    assert helped.exit_code == 0
    flat = " ".join(helped.output.split())
    assert "3 internal error" in flat and "1 a rule failed" in flat


def test_junit_and_summary_document_the_codes_and_carry_this_audits(tmp_path):
    import xml.etree.ElementTree as ET

    from test_report import make_audit_folder

    from clipaudit.gate import render_summary_md, write_junit

    result = make_audit_folder(tmp_path / "audit")  # one failing rule
    summary = render_summary_md(result)
    assert "3 internal error" in summary and "this audit: 1." in summary
    write_junit(result, tmp_path / "junit.xml")
    text = (tmp_path / "junit.xml").read_text()
    assert "3 internal error" in text
    codes = {p.get("value") for p in ET.parse(tmp_path / "junit.xml").iter("property")
             if p.get("name") == "exit_code"}
    assert codes == {"1"}
