"""Output folders replaced whole or not at all.

``staged_folder(target)`` yields a staging folder beside ``target``
(``.<name>.staging-<pid>/``); the caller writes every output there, and only when the
block ends without an error is the staging folder swapped in for ``target``. So the
folder a CI job uploads holds either the previous complete audit or the new complete
one, never the previous run's verdict beside this run's half-written tables.

- **The swap.** Where the OS offers it (Linux ``renameat2(RENAME_EXCHANGE)``), the new
  folder and the old one change places in one atomic step, then the old one is
  deleted. Elsewhere the old folder is renamed aside (``.<name>.old-<pid>/``), the new
  one renamed in, and the old one deleted; a run killed between those two renames is
  repaired by the next run (below), which puts the previous audit back.
- **The marker.** ``.<name>.staging-<pid>.json`` beside the staging folder says what it
  is (which command and process made it, for which target, and whether it is
  complete). The running process holds a lock on it, so a later run can tell a live
  run from a killed one.
- **Repair.** Every run first looks at the staging and old folders of its target. A
  killed run's staging folder is deleted; if the target is missing while a moved-aside
  previous folder exists, that folder is put back. A staging folder whose process still
  runs is left alone, and this run refuses (``OutputError``): two runs must not write
  one folder.
- **Seeding.** ``copy=True`` starts the staging folder as a copy of the target (hard
  links, so it is cheap; clipaudit replaces files, never edits them in place), for
  commands that rewrite part of a folder (``report``, ``rules apply``).
- **Nesting.** Inside a staging block of this process, a staged call on the staging
  folder itself writes straight into it (the audit renders its report in its own
  staging folder).
- **Nothing lost.** A command that replaces its folder (``audit``) refuses a non-empty
  folder that holds no earlier output of it, and the current folder. ``report`` and
  ``rules apply`` run in the current folder rewrite their files in place instead (each
  atomically): swapping the folder a shell sits in would leave the shell in a deleted
  folder.

``staged_output`` applies the same to a library function that takes the output folder
as an argument and returns paths inside it: they are returned pointing at the target.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import errno
import functools
import glob
import inspect
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from clipaudit.artifacts import output_error
from clipaudit.errors import ArtifactError, ClipAuditError, OutputError
from clipaudit.process_locks import held_by_this_process_only

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_ACTIVE: set[Path] = set()
"""Staging folders this process is writing (a staged call on one of them nests)."""
_RENAME_EXCHANGE = 2

try:  # POSIX: the marker's lock tells a live run from a killed one
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def staged_folder(target: Path | str, *, command: str, copy: bool = False,
                  replaces: str | None = None) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``target`` whole (see the module).

    ``replaces``: the file that marks a folder this command may replace (``audit.json``):
    without ``copy``, a non-empty ``target`` without it is refused, so a mistyped
    ``--out`` never deletes someone's files. Raises ``OutputError`` (before any work)
    when ``target`` is a file, such a folder, the current folder, cannot be written,
    or is being written by another live run. On an error in the block the staging
    folder is deleted and ``target`` is left as it was.
    """
    shown = Path(target)  # messages name the folder as the user gave it
    target = Path(os.path.abspath(target))
    if target.is_symlink() and target.is_dir():  # replace the folder, keep the link
        target = target.resolve()
    if target in _ACTIVE:
        yield target
        return
    cwd = Path.cwd()
    if copy and (cwd == target or target in cwd.parents):
        # Swapping the folder a shell sits in would leave that shell in a deleted folder:
        # rewrite the files in place instead, each of them atomically.
        yield target
        return
    _check_target(target, shown, copy, replaces, cwd)
    with output_error(shown):
        target.parent.mkdir(parents=True, exist_ok=True)
    repair(target, shown)
    staging = _sibling(target, "staging")
    marker = _marker_path(staging)
    with output_error(shown):
        if staging.exists():  # this pid's leftover from before a reboot
            shutil.rmtree(staging)
        staging.mkdir()
        lock = _write_marker(marker, target, command, state="building")
    _ACTIVE.add(staging)
    try:
        if copy and target.is_dir():
            with output_error(shown):
                _link_tree(target, staging)
        with held_by_this_process_only(lock):  # a killed run's forked workers hold nothing
            yield staging
        with output_error(shown):
            _update_marker(marker, state="complete")
            _swap_in(staging, target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, ClipAuditError) and str(staging) in str(e):  # name what the user named
            e.args = (str(e).replace(str(staging), str(shown)), *e.args[1:])
        raise
    finally:
        _ACTIVE.discard(staging)
        marker.unlink(missing_ok=True)
        lock.close()


def _check_target(target: Path, shown: Path, copy: bool, replaces: str | None,
                  cwd: Path) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(f"{shown}: exists and is not a folder; give a folder path (it "
                          "is created, or replaced whole when it holds an earlier output)")
    if copy and replaces is not None and not (target / replaces).is_file():
        raise ArtifactError(f"{shown / replaces}: file not found")  # as reading it would say
    if copy or not target.is_dir():
        return
    if cwd == target or target in cwd.parents:
        raise OutputError(f"{shown}: is the current folder (or holds it), which this "
                          "command would replace whole; write into another folder")
    if replaces is not None and (target / replaces).is_file():
        return
    if any(target.iterdir()):
        raise OutputError(f"{shown}: folder is not empty and holds no earlier clipaudit "
                          f"output{f' ({replaces})' if replaces else ''}; this command "
                          "replaces its output folder whole, so give a new or empty folder")


def staged_output(argument: str, *, command: str, copy: bool = False,
                  replaces: str | None = None) -> Callable[[F], F]:
    """Run the decorated function with its ``argument`` (an output folder; with ``copy``
    also a file in one) pointing into a staging folder, and swap that folder in when it
    returns.

    Paths under the staging folder in the return value (a Path, or the Path fields of a
    dataclass, also inside dicts) are returned pointing at the target."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            given = Path(bound.arguments[argument])
            # a folder to rewrite may be named by its audit.json; a folder to create never
            folder = given.parent if copy and given.is_file() else given
            with staged_folder(folder, command=command, copy=copy, replaces=replaces) as staging:
                bound.arguments[argument] = staging / given.name if given != folder else staging
                result = fn(*bound.args, **bound.kwargs)
            return _relocate(result, staging, folder)

        return wrapper  # type: ignore[return-value]

    return decorate


def repair(target: Path | str, shown: Path | None = None) -> None:
    """Clean up after runs on ``target`` that were killed (see the module docstring).

    Raises ``OutputError`` when another live process is writing ``target``."""
    shown = shown or Path(target)
    target = Path(os.path.abspath(target))
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f".{glob.escape(target.name)}"
    for marker in sorted(parent.glob(f"{prefix}.staging-*.json")):
        if marker.with_suffix("") in _ACTIVE or not _owner_alive(marker):
            continue
        info = _read_marker(marker)
        raise OutputError(f"{shown}: another clipaudit run is writing this folder "
                          f"({info.get('command', '?')}, pid {info.get('pid', '?')}); wait "
                          "for it to finish, or write elsewhere")
    for path in sorted(parent.glob(f"{prefix}.staging-*")):
        if path.suffix == ".json" or path in _ACTIVE:
            continue
        log.warning("%s: removing %s, left by a run that was killed", shown, path.name)
        with output_error(shown):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for old in sorted(parent.glob(f"{prefix}.old-*")):
        with output_error(shown):
            if not target.exists():  # killed between the two renames of a swap
                log.warning("%s: restoring the previous folder, moved aside by a run that "
                            "was killed mid-swap", shown)
                os.rename(old, target)
            elif old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    for marker in parent.glob(f"{prefix}.staging-*.json"):
        if marker.with_suffix("") not in _ACTIVE and not _owner_alive(marker):
            marker.unlink(missing_ok=True)


# ------------------------------------------------------------------ the swap


def _swap_in(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if _exchange(staging, target):  # staging now holds the previous folder
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where that is unavailable."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False  # the file system or kernel cannot exchange: rename in two steps
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (else copy) every file of ``src`` into ``dst``."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    for entry in src.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst / entry.name, copy_function=link, symlinks=True)
        else:
            link(str(entry), str(dst / entry.name))


# ------------------------------------------------------------------ markers


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _marker_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.json"


def _write_marker(marker: Path, target: Path, command: str, state: str) -> Any:
    info = {"what": "a clipaudit staging folder: the outputs of a run that are swapped in "
                    "for the target when complete. A run killed before that leaves it "
                    "behind; the next run on the target deletes it. Safe to delete.",
            "command": command, "target": str(target), "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "state": state}
    handle = open(marker, "w+", encoding="utf-8")  # noqa: SIM115 - held until the swap
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(json.dumps(info, indent=2) + "\n")
    handle.flush()
    return handle


def _update_marker(marker: Path, state: str) -> None:
    info = _read_marker(marker)
    info["state"] = state
    with open(marker, "r+", encoding="utf-8") as f:  # in place: the lock stays on this file
        f.write(json.dumps(info, indent=2) + "\n")
        f.truncate()


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _owner_alive(marker: Path) -> bool:
    """Whether the process that wrote ``marker`` still runs (it holds the marker's lock)."""
    if not marker.is_file():
        return False
    if fcntl is None:  # pragma: no cover - Windows: fall back on the recorded pid
        pid = _read_marker(marker).get("pid")
        try:
            os.kill(int(pid), 0)
        except (OSError, TypeError, ValueError):
            return False
        return True
    try:
        with open(marker, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _relocate(value: Any, staging: Path, target: Path) -> Any:
    """``value`` with paths under ``staging`` pointing under ``target`` instead."""
    if isinstance(value, Path):
        try:
            return target / Path(os.path.abspath(value)).relative_to(staging)
        except ValueError:
            return value
    if isinstance(value, dict):
        moved = {k: _relocate(v, staging, target) for k, v in value.items()}
        return moved if any(moved[k] is not value[k] for k in value) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _relocate(getattr(value, f.name), staging, target)
                   for f in dataclasses.fields(value) if f.init}
        changed = {k: v for k, v in changes.items() if v is not getattr(value, k)}
        return dataclasses.replace(value, **changed) if changed else value
    return value
