"""One process per worker slot of an activation cache (see ``one_writer_per_worker_slot``)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from clipaudit.artifacts import output_error
from clipaudit.errors import InputError, OutputError
from clipaudit.process_locks import held_by_this_process_only

F = TypeVar("F", bound=Callable[..., Any])


def one_writer_per_worker_slot(fn: F) -> F:
    """Let one process at a time extract a cache as worker i of n.

    Two ``extract`` runs started at once on one cache with the same worker options would
    encode the same shards twice and delete each other's temporary files; the second one
    refuses instead, in one line (exit 2), naming the process that holds the slot. The
    lock (``.extract-worker-<i>-of-<n>.lock`` in the cache, ``flock``) goes with the
    process, not with the decoding workers it forks, so a killed run never blocks the
    next one. Workers with other indices (or
    a read-only cache, where nothing can be written) are not held up.
    """

    @functools.wraps(fn)
    def wrapper(source: Any, out_dpath: str | Path, config: Any = None, **kwargs: Any) -> Any:
        dpath = Path(out_dpath)
        if dpath.exists() and not dpath.is_dir():
            raise InputError(f"{dpath}: exists and is not a folder")
        with output_error(dpath):
            dpath.mkdir(parents=True, exist_ok=True)
        index, count = (0, 1) if config is None else (config.worker_index, config.worker_count)
        with _worker_slot(dpath, index, count):
            if config is None:
                return fn(source, out_dpath, **kwargs)
            return fn(source, out_dpath, config, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _worker_slot(dpath: Path, index: int, count: int) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield
        return
    fpath = dpath / f".extract-worker-{index}-of-{count}.lock"
    try:
        handle = open(fpath, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield  # nothing can be written here, so there is nothing to guard
            return
        raise
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(
                f"{dpath}: another clipaudit extract ({holder}) is writing this cache as worker "
                f"{index} of {count}; wait for it to finish, or "
                "split the work between runs with --worker-index/--worker-count") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        with held_by_this_process_only(handle):
            yield
