"""Progress on stderr: rich bars in a terminal, plain lines in logs.

In a terminal, each task is a bar with counts, rate, elapsed time and ETA. Where
stderr is not a terminal (a CI log, a file) or ``CI`` is set, bars would print as
``━ … 100% … eta …`` debris, so each task prints a plain line instead every
``$CLIPAUDIT_PROGRESS_INTERVAL`` seconds (default 10) and one when it ends:

    extract: 1024/4000 (25.6%), 41.3/s, 24.8s elapsed, eta 1m12s
    extract: 4000/4000 done in 1m37s (41.2/s)
"""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
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

INTERVAL_ENV = "CLIPAUDIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def plain_progress(console: Console) -> bool:
    """Plain lines instead of bars: stderr is not a terminal, or ``CI`` is set."""
    ci = os.environ.get("CI", "").strip().lower()
    return not console.is_terminal or ci not in ("", "0", "false", "no")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _fields_text(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in fields.items())


class _PlainTask:
    def __init__(self, console: Console, description: str, total: int | None, interval: float):
        self._console, self._description, self._total = console, description, total
        self._interval, self._done = interval, 0
        self._fields: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._closed = False

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._done += n
        self._fields.update(fields)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._print(now, final=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool) -> None:
        elapsed = now - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        count = f"{self._done}/{self._total}" if self._total else f"{self._done}"
        if final:
            line = f"{self._description}: {count} done in {_duration(elapsed)} ({rate:.1f}/s)"
        else:
            share = f" ({100 * self._done / self._total:.1f}%)" if self._total else ""
            eta = (f", eta {_duration((self._total - self._done) / rate)}"
                   if self._total and rate > 0 and self._done < self._total else "")
            line = (f"{self._description}: {count}{share}, {rate:.1f}/s, "
                    f"{_duration(elapsed)} elapsed{eta}")
        if self._fields:
            line += "  " + _fields_text(self._fields)
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __enter__(self) -> _PlainTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RateColumn(ProgressColumn):
    """Units per second."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f}/s" if speed else "", style="progress.data.speed")


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any):
        self._progress, self._id = progress, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._progress.update(self._id, advance=n, info=_fields_text(fields))

    def close(self) -> None:
        self._progress.update(self._id, visible=True)

    def __enter__(self) -> _RichTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _QuietTask(_RichTask):
    def __init__(self) -> None:
        pass

    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class RichReporter:
    """The CLI's progress reporter on stderr (bars, or plain lines in logs; nothing when
    ``quiet``); use as a context manager."""

    def __init__(self, quiet: bool = False, console: Console | None = None):
        from clipaudit.cli._common import err

        self._console = console or err
        self._quiet = quiet
        self._plain = not quiet and plain_progress(self._console)
        self._tasks: list[_PlainTask] = []
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), _RateColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self._console, disable=quiet or self._plain, transient=False,
        )

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
        for task in self._tasks:  # a task left open by an error still gets its last line
            task.close()

    def task(self, description: str, total: int | None = None) -> _RichTask | _PlainTask:
        if self._quiet:
            return _QuietTask()
        if self._plain:
            task = _PlainTask(self._console, description, total, _interval())
            self._tasks.append(task)
            return task
        return _RichTask(self._progress, self._progress.add_task(description, total=total, info=""))
