"""What every command shares: the consoles, error mapping, progress bars, --json output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from clipaudit.errors import EXIT_PASS, EXIT_RULE_FAILED, EXIT_USAGE

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

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


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


class _RateColumn(ProgressColumn):
    """Units per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f}/s" if speed else "", style="progress.data.speed")


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any):
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in fields.items())
        self._progress.update(self._id, advance=n, info=info)

    def close(self) -> None:
        self._progress.update(self._id, visible=True)

    def __enter__(self) -> _RichTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RichReporter:
    """Progress bars with rate and ETA on stderr; use as a context manager."""

    def __init__(self, quiet: bool = False):
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), _RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err, disable=quiet, transient=False,
        )

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def task(self, description: str, total: int | None = None) -> _RichTask:
        return _RichTask(self._progress, self._progress.add_task(description, total=total, info=""))
