"""The ``clipaudit`` command: a thin typer layer over the library.

Each verb lives in its own module and registers itself on ``app``; commands parse
options, call one library function and print. Exit codes: 0 pass, 1 rule
violations, 2 usage or input error.
"""

from __future__ import annotations

import typer

from clipaudit._version import __version__

app = typer.Typer(
    name="clipaudit",
    help="Audit CLIP-based classifiers for shortcuts: SAE components x attribution x meaning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clipaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """clipaudit: find the components a classifier relies on that mean something else."""


def _register() -> None:
    # Importing a command module registers its verbs on ``app``.
    from clipaudit.cli import (  # noqa: F401
        cmd_attribution,
        cmd_audit,
        cmd_extract,
        cmd_report,
        cmd_rules,
        cmd_sae,
        cmd_synthetic,
    )


_register()


def main() -> None:
    app()
