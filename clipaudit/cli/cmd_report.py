"""CLI verbs: report (re-render report.html / report.pdf from a finished audit)."""

from __future__ import annotations

from pathlib import Path

import typer

from clipaudit.cli import app
from clipaudit.cli._common import json_option, out, print_json, quiet_option, user_errors


@app.command("report")
@user_errors
def report(
    audit_dpath: Path = typer.Argument(..., metavar="AUDIT_DIR",
                                       help="Audit folder (holds audit.json)."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write report.html."),
    pdf: bool = typer.Option(True, "--pdf/--no-pdf", help="Write report.pdf."),
    as_json: bool = json_option("the written paths"),
    quiet: bool = quiet_option(),
) -> None:
    """Render the HTML and PDF reports of a finished audit, without recomputing anything
    (both files change together, or neither does)."""
    from clipaudit.report import write_report

    paths = write_report(audit_dpath, html=html, pdf=pdf)
    if as_json:
        print_json({"html": str(paths.html) if paths.html else None,
                    "pdf": str(paths.pdf) if paths.pdf else None})
        return
    for fpath in (paths.html, paths.pdf):
        if fpath is not None:
            out.print(str(fpath), markup=False)
