"""Advisory locks that belong to one process, not to the children it forks.

``flock`` locks belong to an open file description, which ``fork`` shares: a decoding
worker forked by a DataLoader would go on holding the lock of a run killed with
``kill -9`` until the worker noticed and exited, and the next run would be refused in
the name of a dead process. ``held_by_this_process_only`` points the lock's descriptor
in every forked child at ``/dev/null`` (the child keeps a valid descriptor number, so
nothing it closes later can hit another file), so the lock goes when its process goes.
Descriptors are already closed on ``exec`` (Python opens them non-inheritable).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import IO, Any

_HELD: set[int] = set()
_GUARD = threading.Lock()
_REGISTERED = False


def _release_in_child() -> None:
    if not _HELD:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in _HELD:
            try:
                os.dup2(devnull, fd)
            except OSError:  # pragma: no cover - closed meanwhile: nothing held
                pass
    finally:
        os.close(devnull)
    _HELD.clear()


@contextlib.contextmanager
def held_by_this_process_only(handle: IO[Any]) -> Iterator[None]:
    """While the block runs, processes forked from this one do not hold ``handle``'s lock."""
    global _REGISTERED
    fd = handle.fileno()
    with _GUARD:
        if not _REGISTERED and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_release_in_child)
            _REGISTERED = True
        _HELD.add(fd)
    try:
        yield
    finally:
        with _GUARD:
            _HELD.discard(fd)
