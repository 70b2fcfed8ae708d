"""What every command shares: the consoles, --quiet/--json, progress (clipaudit/cli/_progress.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from clipaudit.cli._progress import RichReporter
from clipaudit.errors import EXIT_PASS, EXIT_RULE_FAILED, EXIT_USAGE

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

__all__ = ["RichReporter", "err", "json_option", "out", "print_error", "print_json",
           "quiet_option", "user_errors"]

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = EXIT_PASS, EXIT_RULE_FAILED, EXIT_USAGE

F = TypeVar("F", bound=Callable[..., Any])


def print_error(e: Exception) -> None:
    """One line on stderr; the message is escaped (a '[audit]' in it is text, not markup)."""
    err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)


def user_errors(fn: F) -> F:
    """Kept for the verbs that carry it: errors are mapped to exit codes (2 for a
    ClipAuditError, 3 for an internal error) in one place, ``ClipAuditGroup.invoke``
    (clipaudit/cli/_exit.py), for every verb."""
    return fn


def not_evaluated_note(verdicts: Any) -> str:
    """``, N class(es) not evaluated`` for the verdict line ("" when every class was judged)."""
    from clipaudit.gate import not_evaluated_classes

    small = not_evaluated_classes(verdicts)
    return f", {len(small)} class(es) not evaluated" if small else ""


def print_not_evaluated(verdicts: Any) -> None:
    """Under the verdict line: the classes no rule judged (too few audited instances)."""
    from clipaudit.gate import not_evaluated_classes

    small = not_evaluated_classes(verdicts)
    if not small:
        return
    listed = ", ".join(f"{c.head}/{c.class_name} ({c.n_instances})" for c in small[:10])
    more = f" and {len(small) - 10} more" if len(small) > 10 else ""
    out.print(f"[yellow]not evaluated[/] (fewer than {small[0].min_instances} audited "
              f"instances; no rule judged them): {escape(listed)}{more}")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def quiet_option() -> Any:
    return typer.Option(False, "--quiet", "-q", help="No progress and no notes on stderr; "
                                                      "print only the result.")


def json_option(what: str = "the result") -> Any:
    return typer.Option(False, "--json", help=f"Print {what} as JSON on stdout (no progress).")
