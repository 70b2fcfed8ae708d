"""What every command shares: the consoles, error mapping, progress bars, --json output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
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

from clipaudit.errors import ClipAuditError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def print_error(e: Exception) -> None:
    """One line on stderr; the message is escaped (a '[audit]' in it is text, not markup)."""
    err.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)


def user_errors(fn: F) -> F:
    """Turn a ClipAuditError into one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClipAuditError as e:
            print_error(e)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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
