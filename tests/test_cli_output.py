"""What the CLI prints: plain progress lines in logs, a short verdict summary, and
--quiet/--json on every verb."""

from __future__ import annotations

import io
import json

import pytest
import typer
from rich.console import Console
from test_exit_codes import _leaf_commands
from test_report import make_audit_folder
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.cli._progress import RichReporter, plain_progress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=80), buffer


def test_progress_in_a_log_is_plain_lines_with_counts_rate_and_time(monkeypatch):
    monkeypatch.setenv("CLIPAUDIT_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("CI", raising=False)
    console, buffer = _console(terminal=False)
    with RichReporter(console=console) as reporter, reporter.task("extract", total=4) as task:
        task.advance(2, skipped=1)
        task.advance(2, skipped=1)
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("extract: 2/4 (50.0%), ") and "/s, " in lines[0]
    assert "elapsed" in lines[0] and "skipped 1" in lines[0]
    assert lines[-1].startswith("extract: 4/4 done in ") and lines[-1].endswith("skipped 1")
    assert "━" not in buffer.getvalue() and "\x1b" not in buffer.getvalue()


def test_progress_lines_come_at_the_interval_not_per_step(monkeypatch):
    monkeypatch.setenv("CLIPAUDIT_PROGRESS_INTERVAL", "3600")
    console, buffer = _console(terminal=False)
    with RichReporter(console=console) as reporter, reporter.task("train", total=1000) as task:
        for _ in range(1000):
            task.advance(loss=0.5)
    assert buffer.getvalue().splitlines() == [line for line in buffer.getvalue().splitlines()
                                              if "done in" in line]
    assert len(buffer.getvalue().splitlines()) == 1


def test_ci_gets_plain_lines_even_on_a_terminal_and_a_terminal_gets_bars(monkeypatch):
    console, _ = _console(terminal=True)
    monkeypatch.setenv("CI", "true")
    assert plain_progress(console)
    monkeypatch.setenv("CI", "false")
    assert not plain_progress(console)
    monkeypatch.delenv("CI")
    assert not plain_progress(console) and plain_progress(_console(terminal=False)[0])


def test_quiet_prints_no_progress(monkeypatch):
    console, buffer = _console(terminal=False)
    with RichReporter(quiet=True, console=console) as reporter, reporter.task("x", 2) as task:
        task.advance(2)
    assert buffer.getvalue() == ""


def test_every_verb_takes_quiet_and_json():
    root = typer.main.get_command(app)

    def find(path: str):
        command = root
        for part in path.split():
            command = command.commands[part]
        return command

    for path in _leaf_commands(root):
        flags = {opt for param in find(path).params for opt in param.opts}
        assert {"--quiet", "--json"} <= flags, path


@pytest.fixture
def audit_dir(tmp_path):
    make_audit_folder(tmp_path / "audit")
    return tmp_path / "audit"


def test_the_verdict_summary_is_short_and_the_table_is_behind_verbose(audit_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["rules", "apply", str(audit_dir), "--rules", "strict"])
    assert res.exit_code == 1, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("rules: ") and " failing, " in lines[0]
    n_failing = int(lines[0].split("results: ")[1].split(" failing")[0])
    fails = [line for line in lines if line.startswith("  FAIL ")]
    assert len(fails) == n_failing > 0
    assert lines[-1].startswith("verdict: FAIL   audit folder: ") and "--verbose" in lines[-1]
    assert not any(c in res.stdout for c in "┏┃━│"), "a table in the default summary"
    verbose = runner.invoke(app, ["rules", "apply", str(audit_dir), "--rules", "strict", "-v"])
    assert verbose.exit_code == 1 and "┃" in verbose.stdout
    quiet = runner.invoke(app, ["rules", "apply", str(audit_dir), "--rules", "strict", "-q"])
    assert quiet.exit_code == 1 and quiet.stdout.splitlines() == [lines[-1]]
    as_json = runner.invoke(app, ["rules", "apply", str(audit_dir), "--rules", "strict", "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["verdict"] == "fail"
