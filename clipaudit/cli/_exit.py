"""How every ``clipaudit`` command ends: one exit code per meaning, one line per error.

- 0 pass, 1 a rule failed (the gate's verdict, raised by the commands themselves);
- 2 a usage or input error: click's usage errors, any ``ClipAuditError`` and an output
  that cannot be written (disk full, read-only, not a folder), printed as one line;
- 3 an internal error: any other exception. One line names the command and the
  exception and says where the full traceback was written (``--debug`` or
  ``CLIPAUDIT_DEBUG=1`` prints it instead). Never 1: a crash must not read as a
  failed rule, and a failed rule must not read as a crash.

The mapping lives in the command group (``ClipAuditGroup.invoke``), so it covers every
verb, including ones a plug-in registers, whether or not they are decorated.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from clipaudit._version import __version__
from clipaudit.errors import EXIT_INTERNAL, EXIT_USAGE, ClipAuditError

DEBUG_ENV = "CLIPAUDIT_DEBUG"
"""Set to 1 to print an internal error's traceback instead of writing it to a file."""
CRASH_DIR_ENV = "CLIPAUDIT_CRASH_DIR"
"""Folder for crash reports (default: the system's temporary folder)."""
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141
_COMMAND_KEY = "clipaudit.command"

# Errors of the machine the user runs on, not of clipaudit: a full disk, a read-only or
# unwritable folder, a path that is a file. Exit 2 with the file and the reason.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS,
                                 errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP,
                                 errno.ENOTDIR, errno.EISDIR})
_debug = False


def debug_enabled() -> bool:
    return _debug or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


class ClipAuditGroup(TyperGroup):
    """The command group: maps every exception a verb raises to its exit code."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        global _debug
        if ctx.parent is None:  # --debug is accepted anywhere on the command line
            cut = args.index("--") if "--" in args else len(args)
            _debug = "--debug" in args[:cut]
            args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if name:
            ctx.meta[_COMMAND_KEY] = f"{ctx.command_path} {name}"
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # exit codes chosen by a command, and click's usage errors (exit 2)
        except (Exception, KeyboardInterrupt) as e:
            code = exit_code_for(e, ctx.meta.get(_COMMAND_KEY, ctx.command_path))
            raise typer.Exit(code) from None


def exit_code_for(e: BaseException, command: str) -> int:
    """Print what went wrong (one line on stderr) and return the exit code."""
    from clipaudit.cli._common import err, print_error

    if isinstance(e, ClipAuditError):
        print_error(e)
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        err.print("interrupted", markup=False)
        return EXIT_INTERRUPTED
    if isinstance(e, OSError) and e.errno == errno.EPIPE:  # `clipaudit ... | head`
        sys.stdout = _Silent()  # type: ignore[assignment,unused-ignore]  # not a TextIO
        return EXIT_BROKEN_PIPE
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        print_error(ClipAuditError(f"{where}{e.strerror or e}"))
        return EXIT_USAGE
    return _internal_error(e, command)


def _internal_error(e: BaseException, command: str) -> int:
    from clipaudit.cli._common import err

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    detail = " ".join(str(e).split())[:300]
    what = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
    if debug_enabled():
        err.print(text, markup=False, highlight=False, end="")
        where = "traceback above"
    else:
        try:
            where = f"traceback in {write_crash_report(command, text)}; --debug prints it"
        except OSError as log_error:
            err.print(text, markup=False, highlight=False, end="")
            where = f"traceback above: could not write a crash report ({log_error.strerror})"
    err.print(f"[bold red]internal error:[/] {escape(command)} failed: {escape(what)} "
              f"({escape(where)}). This is a bug in clipaudit or a library it uses, not a "
              f"problem with your input; exit code {EXIT_INTERNAL}.",
              markup=True, highlight=False, soft_wrap=True)
    return EXIT_INTERNAL


def write_crash_report(command: str, text: str) -> Path:
    """The traceback and what produced it, in ``$CLIPAUDIT_CRASH_DIR`` (default: temp)."""
    dpath = Path(os.environ.get(CRASH_DIR_ENV) or tempfile.gettempdir())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fpath = dpath / f"clipaudit-crash-{stamp}-{os.getpid()}.txt"
    header = (f"command: {command}\nargv: {sys.argv!r}\nclipaudit {__version__}, Python "
              f"{platform.python_version()}, {platform.platform()}\n\n")
    fpath.write_text(header + text, encoding="utf-8", errors="backslashreplace")
    return fpath


class _Silent:
    """stdout after the reader went away: further writes and the final flush are no-ops."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
