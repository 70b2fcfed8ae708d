"""Re-judging a finished audit folder with a rule set (``clipaudit rules apply``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipaudit.gate.engine import evaluate, exit_code
from clipaudit.gate.loader import load_ruleset
from clipaudit.gate.model import RuleSet
from clipaudit.gate.outputs import JUNIT_FNAME, SUMMARY_FNAME, write_junit, write_summary
from clipaudit.results import AUDIT_FNAME, AuditResult, load_audit, save_audit
from clipaudit.staging import staged_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateRun:
    """An audit judged by a rule set, and where the verdicts were written."""

    result: AuditResult
    """The audit with the new verdicts and ``rules_file``."""
    exit_code: int
    """0: no failing rule; 1: a failing rule (2 is raised as a ClipAuditError)."""
    audit_fpath: Path
    junit_fpath: Path
    summary_fpath: Path
    baseline_dpath: Path | None
    """The baseline audit compared with, if any."""


# verdicts, junit.xml, summary.md and reports change together, or not at all
@staged_output("audit_dpath", command="rules apply", copy=True, replaces=AUDIT_FNAME)
def apply_rules(audit_dpath: Path | str, rules: str | Path | RuleSet, *,
                baseline: Path | str | None = None, junit_fpath: Path | str | None = None,
                summary_fpath: Path | str | None = None,
                today: dt.date | None = None, column_roles: Sequence[str] = ()) -> GateRun:
    """Evaluate ``rules`` on the audit in ``audit_dpath`` and rewrite its verdicts.

    ``baseline`` (an audit folder) overrides the rule set's ``baseline``;
    ``column_roles`` (``COLUMN=ROLE``) override the rule file's and the data set's roles.
    Writes audit.json, junit.xml and summary.md (by default into ``audit_dpath``), and
    re-renders the folder's report.html and report.pdf where they exist, so no file of
    the folder shows the old verdict. The folder changes whole or not at all.
    """
    from clipaudit.columns import parse_role_overrides

    audit_dpath = Path(audit_dpath)
    ruleset = rules if isinstance(rules, RuleSet) else load_ruleset(rules)
    ruleset = ruleset.with_column_roles(parse_role_overrides(column_roles))
    result = load_audit(audit_dpath)
    baseline_dpath = Path(baseline) if baseline is not None else ruleset.baseline
    baseline_result = load_audit(baseline_dpath) if baseline_dpath is not None else None
    verdicts = evaluate(result, ruleset, baseline=baseline_result, today=today)
    result = dataclasses.replace(result, verdicts=verdicts, rules_file=ruleset.name)
    audit_fpath = audit_dpath / AUDIT_FNAME if audit_dpath.is_dir() else audit_dpath
    save_audit(result, audit_fpath.parent)
    junit = write_junit(result, junit_fpath or audit_fpath.parent / JUNIT_FNAME)
    summary = write_summary(result, summary_fpath or audit_fpath.parent / SUMMARY_FNAME)
    _rerender_reports(audit_fpath.parent)
    log.info("rules %s on audit %s: %s", ruleset.name, result.audit_id, result.verdict)
    return GateRun(result, exit_code(verdicts), audit_fpath, junit, summary, baseline_dpath)


def _rerender_reports(audit_dpath: Path) -> None:
    from clipaudit.report.render import HTML_FNAME, PDF_FNAME, write_report

    html, pdf = (audit_dpath / HTML_FNAME).is_file(), (audit_dpath / PDF_FNAME).is_file()
    if html or pdf:
        write_report(audit_dpath, html=html, pdf=pdf)
