"""CLI verbs: audit, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from clipaudit.audit import AuditConfig, OutputConfig
from clipaudit.cli import app
from clipaudit.cli._common import (
    RichReporter,
    err,
    json_option,
    not_evaluated_note,
    out,
    print_json,
    print_not_evaluated,
    quiet_option,
    user_errors,
)
from clipaudit.cli._options import option
from clipaudit.demo import DemoConfig
from clipaudit.describe.config import DescribeConfig

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


_LISTED = 30
"""Rows of the findings and rules tables printed with --verbose (the rest are in the
audit folder)."""


def _ci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _print_outcome(outcome, as_json: bool, quiet: bool = False, verbose: bool = False) -> None:
    from clipaudit.gate import not_evaluated_classes
    from clipaudit.results import to_dict

    result = outcome.result
    if as_json:
        print_json({"verdict": result.verdict, "exit_code": outcome.exit_code,
                    "audit_dir": str(outcome.audit_dpath),
                    "files": {k: str(v) for k, v in outcome.files.items()},
                    "verdicts": to_dict(result.verdicts),
                    "not_evaluated": to_dict(not_evaluated_classes(result.verdicts)),
                    "findings": [to_dict(f) for h in result.heads for f in h.findings],
                    "permutation": to_dict(result.permutation)})
        return
    if verbose:
        _print_tables(result)
    elif not quiet:
        n_findings = {h.name: len(h.findings) for h in result.heads}
        n_backed = sum(f.backed for h in result.heads for f in h.findings)
        out.print(f"findings: {sum(n_findings.values())} ("
                  + ", ".join(f"{name} {n}" for name, n in n_findings.items())
                  + f"), {n_backed} backed by the data", markup=False)
        print_verdicts(result.verdicts)
    control = result.permutation
    if control is not None and not quiet:
        out.print(f"permutation control (labels shuffled): {control.n_findings} findings, "
                  f"{control.n_backed} backed, {control.n_failing} failing verdicts", markup=False)
    print_verdict_line(result.verdict, outcome.audit_dpath, verbose, result.verdicts)


def print_verdicts(verdicts) -> None:
    """Counts, then one line per failing rule and per warning (never a wrapped table)."""
    failing = [v for v in verdicts if v.status == "fail" and v.waived is None]
    warnings = [v for v in verdicts if v.status == "warn" and v.waived is None]
    waived = [v for v in verdicts if v.waived is not None]
    passing = len(verdicts) - len(failing) - len(warnings) - len(waived)
    out.print(f"rules: {len(verdicts)} results: {len(failing)} failing, {len(warnings)} "
              f"warning(s), {passing} passing, {len(waived)} waived", markup=False)
    for v in [*failing, *warnings]:
        scope = " / ".join(x for x in (v.head, v.class_name) if x)
        out.print(Text.assemble(("  FAIL " if v.status == "fail" else "  WARN ", _STYLE[v.status]),
                                f" {v.rule}" + (f" [{scope}]" if scope else "") + f": {v.message}"))


def print_verdict_line(verdict: str, audit_dpath, verbose: bool, verdicts=()) -> None:
    """The verdict, how many classes no rule judged, the folder; then those classes."""
    more = "" if verbose else " (summary.md lists every rule; --verbose prints them here)"
    out.print(Text.assemble("verdict: ", (verdict.upper(), _STYLE[verdict]),
                            f"{not_evaluated_note(verdicts)}   audit folder: {audit_dpath}{more}"))
    print_not_evaluated(verdicts)


def _print_tables(result) -> None:
    every = sorted((f for h in result.heads for f in h.findings),
                   key=lambda f: (not f.backed, -f.gate_share))
    findings = Table("head", "class", "component", "concept", "share [95% interval]", "chance",
                     "alignment", "clarity", "kind", title=f"findings ({len(every)})")
    for f in every[:_LISTED]:
        findings.add_row(*(Text(x) for x in (
            f.head, f.class_name, str(f.component), f"{f.concept} ({f.concept_score:.2f})",
            f"{f.share:.3f}{_ci(f.share_ci)}",
            "" if f.chance_share is None else f"{f.chance_share:.3f}" + ("" if f.backed else " (not backed)"),
            f"{f.alignment:+.3f}", f"{f.clarity:.2f}", f.kind)))
    out.print(findings)
    if len(every) > _LISTED:
        out.print(f"... and {len(every) - _LISTED} more findings in audit.json and the report")
    shown = [v for v in result.verdicts if v.status != "pass" or v.waived]
    rules = Table("rule", "head", "class", "status", "why",
                  title=f"rules ({len(result.verdicts) - len(shown)} passing not listed)")
    for v in shown[:_LISTED]:
        status = Text(v.status + (" (waived)" if v.waived else ""), style=_STYLE[v.status])
        rules.add_row(Text(v.rule), Text(v.head or ""), Text(v.class_name or ""), status,
                      Text(v.message))
    out.print(rules)
    if len(shown) > _LISTED:
        out.print(f"... and {len(shown) - _LISTED} more in summary.md and junit.xml")


@app.command("audit")
@user_errors
def audit_cmd(
    cache: Path = typer.Argument(..., help="Activation cache folder (clipaudit extract)."),
    sae: Path = typer.Option(..., "--sae", help="SAE file (clipaudit train-sae)."),
    out_dpath: Path = typer.Option(..., "--out", "-o", help="Audit folder to write."),
    probe: Path = typer.Option(None, "--probe", help="Linear probe file (clipaudit fit-probe or your own)."),
    prompts: Path = typer.Option(None, "--prompts", help="Zero-shot prompt-set YAML."),
    rules: str = option(AuditConfig, "rules", "--rules"),
    label_map: Path = option(AuditConfig, "label_map", "--label-map", dir_okay=False),
    vocab: list[str] = option(AuditConfig, "describe.vocabularies", "--vocab",
                              help="Concept vocabulary: a shipped name (clipaudit vocab list) or "
                                   "a .txt/.yaml file (repeat to combine)."),
    label_floor: str = option(AuditConfig, "describe.label_floor", "--label-floor",
                              help="scrambled: a component whose best term beats no scrambled "
                                   "phrase of the vocabulary is 'unlabelled (closest: TERM)' and "
                                   "matches no rule-file concept; off: always the nearest term."),
    baseline: Path = typer.Option(None, "--baseline", help="Earlier audit folder: fail only on new findings."),
    reference_data: Path = option(AuditConfig, "describe.reference_cache", "--reference-data",
                                  help="Cache of a broad image set to describe components with "
                                       "(same model; default: the audited data)."),
    top_m: int = option(AuditConfig, "describe.top_m", "--top-m", min=2,
                        help="Top activating instances that describe each component."),
    descriptions: Path = option(AuditConfig, "describe.reuse", "--descriptions",
                                help="Reuse the component descriptions of an earlier audit (its "
                                     "folder): a new rule file or head re-audits without "
                                     "recomputing them."),
    gradient: str = option(AuditConfig, "gradient", "--gradient",
                           help="frozen (norm scales and the head's normalisation held fixed: "
                                "attributions add up to the score, in closed form). exact is "
                                "refused here: use explain --gradient exact."),
    text_cache: str = option(AuditConfig, "describe.text_cache", "--text-cache"),
    column_roles: list[str] = option(AuditConfig, "column_roles", "--column-role",
                                     help="COLUMN=ROLE (artifact, protected or ignore): a metadata "
                                          "column's role, over the rule file's and the data set's "
                                          "(repeat for several columns)."),
    pdf: bool = option(OutputConfig, "pdf", "--pdf/--no-pdf", help="Also write report.pdf."),
    attributions: bool = option(OutputConfig, "attributions.write", "--attributions/--no-attributions",
                                help="Write the per-instance attribution tables "
                                     "(attributions-<head>/, Parquet; off by default: large)."),
    attribution_classes: str = option(OutputConfig, "attributions.classes", "--attribution-classes"),
    resamples: int = option(AuditConfig, "statistics.resamples", "--resamples", min=10),
    permutation: bool = option(AuditConfig, "statistics.permutation",
                               "--permutation-control/--no-permutation-control",
                               help="Also audit with labels shuffled within the data and report "
                                    "the findings and failures chance alone produces."),
    seed: int = option(AuditConfig, "seed", "--seed"),
    as_json: bool = json_option("the verdict, every rule result and the findings"),
    quiet: bool = quiet_option(),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print the findings and the rule "
                                 "results that did not pass as tables (summary.md has them all)."),
) -> None:
    """Audit a probe and/or prompt set for shortcuts. The audit folder is replaced whole
    when the audit is complete (a killed audit leaves the earlier one as it was).

    Exit codes: 0 every rule passed, 1 a rule failed, 2 usage or input error,
    3 internal error."""
    from clipaudit.attribution.table import AttributionTableConfig
    from clipaudit.audit import run_audit
    from clipaudit.findings.statistics import StatisticsConfig

    config = AuditConfig(
        rules=rules, label_map=label_map, gradient=gradient, seed=seed,
        column_roles=tuple(column_roles),
        outputs=OutputConfig(pdf=pdf, attributions=AttributionTableConfig(attributions, attribution_classes)),
        statistics=StatisticsConfig(resamples=resamples, permutation=permutation),
        describe=DescribeConfig(vocabularies=tuple(vocab), reference_cache=reference_data, top_m=top_m,
                                label_floor=label_floor, reuse=descriptions, text_cache=text_cache))
    with RichReporter(quiet=as_json or quiet) as reporter:
        outcome = run_audit(cache, sae, out_dpath, probe=probe, prompts=prompts, config=config,
                            baseline_dpath=baseline, reporter=reporter)
    _print_outcome(outcome, as_json, quiet, verbose)
    raise typer.Exit(outcome.exit_code)


@app.command("demo")
@user_errors
def demo_cmd(
    out_dpath: Path = option(DemoConfig, "out_dpath", "--out", "-o"),
    n_images: int = option(DemoConfig, "n_images", "--images", help="Images in the planted data set."),
    pdf: bool = option(DemoConfig, "pdf", "--pdf/--no-pdf", help="Also write report.pdf."),
    as_json: bool = json_option("the verdict, every rule result and the findings"),
    quiet: bool = quiet_option(),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every finding and rule "
                                 "result as tables."),
) -> None:
    """Run the whole pipeline on the bundled tiny CLIP and a planted ruler shortcut
    (exit 1, as intended: the probe relies on rulers)."""
    from clipaudit.demo import run_demo

    if not (as_json or quiet):
        err.print(f"clipaudit demo: planting a ruler -> malignant shortcut in {n_images} synthetic "
                  f"dermoscopy images, then auditing a probe and a prompt set on the bundled demo "
                  f"model tiny-derm-clip; output in {out_dpath}/", markup=False)
    with RichReporter(quiet=as_json or quiet) as reporter:
        outcome = run_demo(DemoConfig(out_dpath=out_dpath, n_images=n_images, pdf=pdf), reporter=reporter)
    _print_outcome(outcome, as_json, quiet, verbose)
    if not (as_json or quiet):
        if outcome.exit_code == 1:
            out.print("[bold]The audit FAILED, as intended:[/] the probe relies on rulers to call lesions "
                      "malignant, which rules/dermatology.yaml forbids. A CI job would stop here (exit 1).")
        out.print(f"Open {outcome.audit_dpath / 'report.html'} (or report.pdf) to see the evidence.",
                  markup=False)
    raise typer.Exit(outcome.exit_code)
