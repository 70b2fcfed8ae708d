"""CLI verbs: audit, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from clipaudit.audit import AuditConfig, OutputConfig
from clipaudit.cli import app
from clipaudit.cli._common import RichReporter, err, out, print_json, user_errors
from clipaudit.cli._options import option
from clipaudit.demo import DemoConfig
from clipaudit.describe.config import DescribeConfig

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def _print_outcome(outcome, as_json: bool) -> None:
    from clipaudit.results import to_dict

    result = outcome.result
    if as_json:
        print_json({"verdict": result.verdict, "exit_code": outcome.exit_code,
                    "audit_dir": str(outcome.audit_dpath),
                    "files": {k: str(v) for k, v in outcome.files.items()},
                    "verdicts": to_dict(result.verdicts),
                    "findings": [to_dict(f) for h in result.heads for f in h.findings]})
        return
    findings = Table("head", "class", "component", "concept", "share", "alignment", "clarity", "kind",
                     title="findings")
    for head in result.heads:
        for f in head.findings:
            findings.add_row(head.name, f.class_name, str(f.component), f"{f.concept} ({f.concept_score:.2f})",
                             f"{f.share:.3f}", f"{f.alignment:+.3f}", f"{f.clarity:.2f}", f.kind)
    out.print(findings)
    rules = Table("rule", "head", "class", "status", "why", title="rules")
    for v in result.verdicts:
        status = f"[{_STYLE[v.status]}]{v.status}[/]" + (" (waived)" if v.waived else "")
        rules.add_row(v.rule, v.head or "", v.class_name or "", status, v.message)
    out.print(rules)
    out.print(f"verdict: [{_STYLE[result.verdict]}]{result.verdict.upper()}[/]   "
              f"audit folder: {outcome.audit_dpath}")


@app.command("audit")
@user_errors
def audit_cmd(
    cache: Path = typer.Argument(..., help="Activation cache folder (clipaudit extract)."),
    sae: Path = typer.Option(..., "--sae", help="SAE file (clipaudit train-sae)."),
    out_dpath: Path = typer.Option(..., "--out", "-o", help="Audit folder to write."),
    probe: Path = typer.Option(None, "--probe", help="Linear probe file (clipaudit fit-probe or your own)."),
    prompts: Path = typer.Option(None, "--prompts", help="Zero-shot prompt-set YAML."),
    rules: str = option(AuditConfig, "rules", "--rules"),
    vocab: list[str] = option(AuditConfig, "describe.vocabularies", "--vocab",
                              help="Concept vocabulary: general, dermatology, product or a file "
                                   "(repeat to combine)."),
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
    column_roles: list[str] = option(AuditConfig, "column_roles", "--column-role",
                                     help="COLUMN=ROLE (artifact, protected or ignore): a metadata "
                                          "column's role, over the rule file's and the data set's "
                                          "(repeat for several columns)."),
    pdf: bool = option(OutputConfig, "pdf", "--pdf/--no-pdf", help="Also write report.pdf."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Audit a probe and/or prompt set for shortcuts; exit 1 when a rule fails."""
    from clipaudit.audit import run_audit

    config = AuditConfig(
        rules=rules, outputs=OutputConfig(pdf=pdf), column_roles=tuple(column_roles),
        describe=DescribeConfig(vocabularies=tuple(vocab), reference_cache=reference_data, top_m=top_m,
                                reuse=descriptions))
    with RichReporter(quiet=as_json) as reporter:
        outcome = run_audit(cache, sae, out_dpath, probe=probe, prompts=prompts, config=config,
                            baseline_dpath=baseline, reporter=reporter)
    _print_outcome(outcome, as_json)
    raise typer.Exit(outcome.exit_code)


@app.command("demo")
@user_errors
def demo_cmd(
    out_dpath: Path = option(DemoConfig, "out_dpath", "--out", "-o"),
    n_images: int = option(DemoConfig, "n_images", "--images", help="Images in the planted data set."),
    pdf: bool = option(DemoConfig, "pdf", "--pdf/--no-pdf", help="Also write report.pdf."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Run the whole pipeline on the bundled tiny CLIP and a planted ruler shortcut."""
    from clipaudit.demo import run_demo

    err.print(f"clipaudit demo: planting a ruler -> malignant shortcut in {n_images} synthetic "
              f"dermoscopy images, then auditing a probe and a prompt set; output in {out_dpath}/")
    with RichReporter(quiet=as_json) as reporter:
        outcome = run_demo(DemoConfig(out_dpath=out_dpath, n_images=n_images, pdf=pdf), reporter=reporter)
    _print_outcome(outcome, as_json)
    if not as_json:
        if outcome.exit_code == 1:
            out.print("[bold]The audit FAILED, as intended:[/] the probe relies on rulers to call lesions "
                      "malignant, which rules/dermatology.yaml forbids. A CI job would stop here (exit 1).")
        out.print(f"Open {outcome.audit_dpath / 'report.html'} (or report.pdf) to see the evidence.")
    raise typer.Exit(outcome.exit_code)
