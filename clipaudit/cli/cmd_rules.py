"""CLI verbs: ``rules check | list | schema | apply`` (the CI gate's rule files)."""

from __future__ import annotations

import datetime
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from clipaudit.cli import app
from clipaudit.cli._common import (
    EXIT_USAGE,
    err,
    json_option,
    out,
    print_json,
    quiet_option,
    user_errors,
)
from clipaudit.cli._exit import ClipAuditGroup
from clipaudit.cli.cmd_audit import print_verdict_line, print_verdicts
from clipaudit.errors import RuleFileError
from clipaudit.results import to_dict

rules_app = typer.Typer(cls=ClipAuditGroup, no_args_is_help=True,
                        help="Rule files of the CI gate: lint, list, schema, apply.")
app.add_typer(rules_app, name="rules")

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


@rules_app.command("check")
@user_errors
def check_cmd(
    file: Path = typer.Argument(..., help="Rule file to lint (extends is followed)."),
    json_out: bool = json_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Lint a rule file: exit code 0 when valid, 2 with one line per problem."""
    from clipaudit.gate import load_ruleset

    try:
        ruleset = load_ruleset(file)
    except RuleFileError as e:
        if not json_out:
            raise
        print_json({"file": str(file), "valid": False, "errors": str(e).splitlines()})
        raise typer.Exit(EXIT_USAGE) from None
    expired = [w for w in ruleset.waivers if not w.is_active(datetime.date.today())]
    summary = {"file": str(file), "valid": True, "sources": [str(p) for p in ruleset.sources],
               "rules": [{"id": c.id, "check": c.check, "severity": c.severity}
                         for c in ruleset.checks],
               "waivers": len(ruleset.waivers),
               "expired_waivers": [w.model_dump(mode="json", by_alias=True, exclude_none=True)
                                   for w in expired]}
    if json_out:
        print_json(summary)
        return
    chain = " -> ".join(p.name for p in ruleset.sources)
    out.print(f"{file}: valid ({len(ruleset.checks)} rules, {len(ruleset.waivers)} waivers; "
              f"{chain})", markup=False)
    for w in expired:  # a warning, not a note: printed even with --quiet
        err.print(f"warning: waiver '{w.reason}' expired on {w.expires}; it no longer applies",
                  markup=False)


@rules_app.command("list")
@user_errors
def list_cmd(json_out: bool = json_option(), quiet: bool = quiet_option()) -> None:
    """List the shipped rule sets and the registered checks (--quiet: names only)."""
    from clipaudit.gate import get_check, list_checks, list_rulesets, load_ruleset

    rulesets = [{"name": n, "description": load_ruleset(n).description or ""}
                for n in list_rulesets()]
    checks = [{"name": n, "scope": get_check(n).scope, "description": get_check(n).description}
              for n in list_checks()]
    if json_out:
        print_json({"rulesets": rulesets, "checks": checks})
        return
    if quiet:
        out.print("rule sets: " + " ".join(r["name"] for r in rulesets), markup=False)
        out.print("checks: " + " ".join(c["name"] for c in checks), markup=False)
        return
    for title, rows in (("Rule sets", rulesets), ("Checks", checks)):
        table = Table(title=title, title_justify="left")
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(Text(str(v)) for v in row.values()))
        out.print(table)


@rules_app.command("schema")
@user_errors
def schema_cmd(
    json_out: bool = typer.Option(False, "--json", help="Accepted for uniformity: the schema "
                                  "is JSON either way."),
    quiet: bool = quiet_option(),
) -> None:
    """Print the JSON Schema of rule files (rules/schema.json is this output)."""
    from clipaudit.gate import ruleset_json_schema

    print_json(ruleset_json_schema())


@rules_app.command("apply")
@user_errors
def apply_cmd(
    audit_dir: Path = typer.Argument(..., help="Audit folder (holds audit.json)."),
    rules: str = typer.Option(..., "--rules", "-r", help="Shipped rule set name or rule file."),
    baseline: Path = typer.Option(None, "--baseline", help="Baseline audit folder (overrides "
                                  "the rule file's)."),
    junit: Path = typer.Option(None, "--junit", help="JUnit XML path [AUDIT_DIR/junit.xml]."),
    summary: Path = typer.Option(None, "--summary", help="Markdown summary path "
                                 "[AUDIT_DIR/summary.md]."),
    column_roles: list[str] = typer.Option([], "--column-role",
                                           help="COLUMN=ROLE (artifact, protected or ignore): a "
                                                "metadata column's role, over the rule file's and "
                                                "the data set's (repeat for several columns)."),
    json_out: bool = json_option("the verdicts"),
    quiet: bool = quiet_option(),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every rule result as a "
                                 "table."),
) -> None:
    """Judge a finished audit with a rule set, rewriting its verdicts, junit.xml, summary.md
    and reports together. Exit codes: 0 pass, 1 a rule failed, 2 usage or input error,
    3 internal error."""
    from clipaudit.gate import apply_rules

    run = apply_rules(audit_dir, rules, baseline=baseline, junit_fpath=junit,
                      summary_fpath=summary, column_roles=column_roles)
    result = run.result
    if json_out:
        print_json({"audit_id": result.audit_id, "rules": result.rules_file,
                    "verdict": result.verdict, "exit_code": run.exit_code,
                    "verdicts": to_dict(result.verdicts), "junit": str(run.junit_fpath),
                    "summary": str(run.summary_fpath)})
    elif verbose:
        table = Table(title=Text(f"{result.audit_id}: rules {result.rules_file}"),
                      title_justify="left")
        for column in ("status", "rule", "head", "class", "message"):
            table.add_column(column, overflow="fold")
        for v in result.verdicts:
            status = Text(v.status + (" (waived)" if v.waived else ""), style=_STYLE[v.status])
            table.add_row(status, *(Text(t) for t in (v.rule, v.head or "-",
                                                      v.class_name or "-", v.message)))
        out.print(table)
    elif not quiet:
        print_verdicts(result.verdicts)
    if not json_out:
        print_verdict_line(result.verdict, run.audit_fpath.parent, verbose, result.verdicts)
    raise typer.Exit(run.exit_code)
