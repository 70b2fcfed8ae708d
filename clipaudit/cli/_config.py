"""Option defaults from a config file.

Precedence, highest first: the command-line option, a ``CLIPAUDIT_*`` environment
variable, the config file, the built-in default. The file is ``--config PATH``, else
``$CLIPAUDIT_CONFIG``, else ``clipaudit.toml`` in the working directory if there is
one. One TOML table per command (``[audit]``, ``[rules.apply]`` for sub-commands),
keys named like the long options (``top-m`` or ``top_m``)::

    [audit]
    rules = "rules/team.yaml"
    vocab = ["dermatology", "terms.txt"]
    top-m = 400

Environment variables are ``CLIPAUDIT_<COMMAND>_<OPTION>`` (``CLIPAUDIT_AUDIT_TOP_M=200``;
lists separated by spaces); a few options also have a shorter documented one
(``CLIPAUDIT_DEVICE``). An unknown table or key is an error that names the file, so a
typo never passes silently. Click applies this order itself: the file's values become
the commands' ``default_map``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from clipaudit.errors import InputError

CONFIG_ENV = "CLIPAUDIT_CONFIG"
CONFIG_FNAME = "clipaudit.toml"
ENV_PREFIX = "CLIPAUDIT"


def find_config(explicit: Path | None) -> Path | None:
    """The config file in effect, or None."""
    if explicit is not None:
        return explicit
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    local = Path(CONFIG_FNAME)
    return local if local.is_file() else None


def load_default_map(fpath: Path, root: Any) -> dict[str, Any]:
    """The file's tables as click's ``default_map``, checked against the command tree
    (``root``: the click command; typer ships its own click, so this duck-types)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        with open(fpath, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{fpath}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{fpath}: not a readable TOML file ({e})") from None
    return _check(fpath, doc, root, "")


def _check(fpath: Path, table: dict[str, Any], command: Any, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    commands = getattr(command, "commands", None)
    if commands is not None:  # a group
        for name, value in table.items():
            sub = commands.get(name)
            if sub is None:
                known = ", ".join(sorted(commands))
                raise InputError(f"{fpath}: no command [{where}{name}] (commands: {known})")
            if not isinstance(value, dict):
                raise InputError(f"{fpath}: [{where}{name}] must be a table of options")
            out[name] = _check(fpath, value, sub, f"{where}{name}.")
        return out
    options = [p for p in command.params if p.param_type_name == "option" and p.name and not p.is_eager]
    by_key = {}
    for p in options:  # the long flag (--json -> json) and the parameter name (as_json) both work
        for name in (p.name, *(o[2:] for o in p.opts if o.startswith("--"))):
            by_key[name.replace("-", "_")] = p
    for key, value in table.items():
        p = by_key.get(key.replace("-", "_"))
        if p is None:
            known = ", ".join(sorted(_flag(q) for q in options))
            raise InputError(f"{fpath}: [{where.rstrip('.')}] has no option {key!r} (options: {known})")
        if (p.multiple or p.nargs != 1) and isinstance(value, str):
            value = [value]  # vocab = "dermatology" means one vocabulary, not its letters
        out[p.name] = value
    return out


def _flag(p: Any) -> str:
    longs = [o[2:] for o in p.opts if o.startswith("--")]
    return longs[0] if longs else p.name
