"""Progress reporting without UI: the library reports, the CLI draws.

Long-running library functions take a ``reporter`` argument (default: silent).
The CLI passes one that draws rich progress bars with rate and ETA.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None:
        """Count ``n`` more units done; ``fields`` (loss=..., fvu=...) are shown beside the bar."""

    def close(self) -> None: ...

    def __enter__(self) -> Task: ...

    def __exit__(self, *exc: object) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None = None) -> Task:
        """Start a task of ``total`` units (None: unknown)."""


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullReporter:
    """Reports nothing (the library default)."""

    def task(self, description: str, total: int | None = None) -> _NullTask:
        return _NullTask()


NULL_REPORTER = NullReporter()
