"""The ``clipaudit`` command: a thin typer layer over the library.

Each verb lives in its own module and registers itself on ``app``; commands parse
options, call one library function and print. Exit codes (clipaudit/cli/_exit.py):
0 pass, 1 a rule failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

from pathlib import Path

import typer

from clipaudit._version import __version__
from clipaudit.cli._config import CONFIG_ENV, ENV_PREFIX, find_config, load_default_map
from clipaudit.cli._exit import DEBUG_ENV, ClipAuditGroup

EXIT_CODES_HELP = ("Exit codes: 0 pass, 1 a rule failed (audit, demo, rules apply), "
                   "2 usage or input error, 3 internal error.")

app = typer.Typer(
    name="clipaudit",
    cls=ClipAuditGroup,
    help="Audit CLIP-based classifiers for shortcuts: SAE components x attribution x meaning. "
         + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # option precedence: command line > CLIPAUDIT_<COMMAND>_<OPTION> > config file > default
    context_settings={"auto_envvar_prefix": ENV_PREFIX},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clipaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    config: Path = typer.Option(None, "--config", envvar=CONFIG_ENV, dir_okay=False,
                                help="Option defaults, one TOML table per command "
                                     "(default: ./clipaudit.toml if present)."),
    debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV,
                               help="On an internal error (exit 3), print the traceback "
                                    "instead of writing it to a file. Accepted anywhere "
                                    "on the command line."),
) -> None:
    """clipaudit: find the components a classifier relies on that mean something else.

    Options come from the command line, else CLIPAUDIT_<COMMAND>_<OPTION> environment
    variables, else the config file, else their defaults.

    Exit codes: 0 pass; 1 a rule failed (audit, demo, rules apply); 2 usage or input
    error (one line on stderr; nothing half-written is left); 3 internal error (one
    line naming the command and where the traceback was written).
    """
    from rich.markup import escape

    from clipaudit.cli import _exit
    from clipaudit.cli._common import err

    _exit._debug = _exit._debug or debug
    fpath = find_config(config)
    if fpath is None:
        return
    ctx.default_map = load_default_map(fpath, ctx.command)  # a bad file: exit 2 (_exit.py)
    err.print(f"[dim]option defaults from {escape(str(fpath))}[/]", markup=True, highlight=False)


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
        cmd_vocab,
    )


_register()


def main() -> None:
    app()
