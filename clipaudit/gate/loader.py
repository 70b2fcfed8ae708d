"""Loading rule files: YAML, ``extends``, strict validation, located error messages.

Every problem becomes a ``RuleFileError`` whose lines read
``rules/x.yaml: checks[2].max_share: expected a number, got 'high'``. Each file of an
``extends`` chain is validated on its own (so a message names the file at fault),
then merged onto its parent and validated again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clipaudit.errors import InputError, RuleFileError
from clipaudit.gate.messages import format_validation_error
from clipaudit.gate.model import RuleSet
from clipaudit.gate.registry import ruleset_model
from clipaudit.resources import rules_dpath

log = logging.getLogger(__name__)

MAX_RULE_FILE_BYTES = 1 << 20
RULE_SUFFIXES = (".yaml", ".yml")


def list_rulesets() -> list[str]:
    """Names of the rule sets shipped with clipaudit (``default``, ``dermatology``, ...)."""
    return sorted(p.stem for p in rules_dpath().glob("*.yaml"))


def shipped_ruleset_fpath(name: str) -> Path:
    return rules_dpath() / f"{name}.yaml"


def load_ruleset(name_or_path: str | Path) -> RuleSet:
    """A shipped rule set by name, or a rule file; ``extends`` chains are resolved.

    Raises RuleFileError (file, path and problem) for a malformed file and InputError
    for a name that is neither shipped nor a file.
    """
    fpath = _resolve(name_or_path, base_dpath=Path.cwd(), referrer=None)
    merged, sources = _load_merged(fpath, chain=())
    ruleset = _validate_complete(merged, fpath)
    is_shipped = isinstance(name_or_path, str) and name_or_path in list_rulesets()
    ruleset._sources = sources
    ruleset._name = str(name_or_path) if is_shipped else str(Path(name_or_path))
    return ruleset


def parse_ruleset(data: Any, source: str = "<rules>", base_dpath: Path | None = None) -> RuleSet:
    """Validate rule-file content already read (a dict as YAML would give it); relative
    ``extends`` and ``baseline`` paths are taken from ``base_dpath`` (default: cwd)."""
    fpath, base_dpath = Path(source), base_dpath or Path.cwd()
    raw = _validated_raw(data, fpath, base_dpath)
    sources: tuple[Path, ...] = ()
    if raw.get("extends") is not None:
        parent_fpath = _resolve(raw["extends"], base_dpath=base_dpath, referrer=fpath)
        parent, sources = _load_merged(parent_fpath, chain=(fpath,))
        own, raw = raw, _merge(parent, raw, fpath)
        _check_waiver_rules(own, raw, fpath)
    else:
        _check_waiver_rules(raw, raw, fpath)
    ruleset = _validate_complete(raw, fpath)
    ruleset._sources = sources
    ruleset._name = source
    return ruleset


# ------------------------------------------------------------------ files


def display_path(fpath: Path) -> Path:
    """``fpath`` relative to the working folder when it lies inside it (as users type it)."""
    try:
        return fpath.relative_to(Path.cwd())
    except ValueError:
        return fpath


def _resolve(name_or_path: str | Path, base_dpath: Path, referrer: Path | None) -> Path:
    if isinstance(name_or_path, str) and name_or_path in list_rulesets():
        return shipped_ruleset_fpath(name_or_path).resolve()
    fpath = (base_dpath / Path(name_or_path)).resolve()
    if fpath.is_file():
        return fpath
    shipped = ", ".join(list_rulesets())
    if referrer is not None:
        raise RuleFileError(f"{display_path(referrer)}: extends: {str(name_or_path)!r} is neither a shipped "
                            f"rule set ({shipped}) nor a file (looked for {fpath})")
    raise InputError(f"{name_or_path}: no such rule file, and not a shipped rule set "
                     f"({shipped})")


def _read_yaml(fpath: Path) -> Any:
    if fpath.suffix.lower() not in RULE_SUFFIXES:
        log.debug("rule file %s has no .yaml suffix; reading it as YAML", fpath)
    try:
        if fpath.stat().st_size > MAX_RULE_FILE_BYTES:
            raise RuleFileError(f"{display_path(fpath)}: too large for a rule file "
                                f"(> {MAX_RULE_FILE_BYTES // 1024} KiB)")
        text = fpath.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RuleFileError(f"{display_path(fpath)}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RuleFileError(f"{display_path(fpath)}: cannot be read ({e.strerror or e})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RuleFileError(f"{display_path(fpath)}: {where}invalid YAML ({e.problem})") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:
        raise RuleFileError(f"{display_path(fpath)}: invalid YAML ({e})") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one) and
    leaves dates as text, so a bad date is reported where it is (``waivers[1].expires``)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# ------------------------------------------------------------------ validation + extends


def _load_merged(fpath: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """``fpath``'s content merged onto its parents' (each file validated on its own),
    and the files read, ``fpath`` first."""
    if fpath in chain:
        cycle = " -> ".join(str(display_path(p)) for p in (*chain[chain.index(fpath):], fpath))
        raise RuleFileError(f"{display_path(chain[-1])}: extends: cycle {cycle}")
    raw = _validated_raw(_read_yaml(fpath), fpath, fpath.parent)
    if raw.get("extends") is None:
        _check_waiver_rules(raw, raw, fpath)
        return raw, (fpath,)
    parent_fpath = _resolve(raw["extends"], base_dpath=fpath.parent, referrer=fpath)
    parent, sources = _load_merged(parent_fpath, (*chain, fpath))
    merged = _merge(parent, raw, fpath)
    _check_waiver_rules(raw, merged, fpath)
    return merged, (fpath, *sources)


def _check_waiver_rules(own: dict[str, Any], merged: dict[str, Any], fpath: Path) -> None:
    """A waiver of this file that names a rule must name one of the merged rule set."""
    ids = [c["id"] for c in merged.get("checks", [])]
    for i, waiver in enumerate(own.get("waivers", [])):
        if waiver.get("rule") is not None and waiver["rule"] not in ids:
            raise RuleFileError(f"{display_path(fpath)}: waivers[{i}].rule: no rule {waiver['rule']!r} "
                                f"(rules: {', '.join(ids) or 'none'})")


def _validated_raw(data: Any, fpath: Path, base_dpath: Path) -> dict[str, Any]:
    """The file's own content, checked alone; ``baseline`` made absolute."""
    if data is None:
        raise RuleFileError(f"{display_path(fpath)}: the rule file is empty (it needs at least 'version: 1')")
    if not isinstance(data, dict):
        raise RuleFileError(f"{display_path(fpath)}: expected a mapping of rule settings at the top level, "
                            f"got {type(data).__name__}")
    _validate(data, fpath)
    raw = dict(data)
    if isinstance(raw.get("baseline"), str):
        raw["baseline"] = str((base_dpath / raw["baseline"]).resolve())
    return raw


def _validate_complete(data: dict[str, Any], fpath: Path) -> RuleSet:
    """The merged rule set; one that runs no check would pass every audit, so it is refused."""
    ruleset = _validate(data, fpath)
    if not ruleset.checks:
        raise RuleFileError(f"{display_path(fpath)}: checks: the rule set runs no checks, so "
                            "it would pass any audit (add checks, or 'extends: default')")
    return ruleset


def _validate(data: dict[str, Any], fpath: Path) -> RuleSet:
    model = ruleset_model()
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RuleFileError("\n".join(format_validation_error(e, display_path(fpath), model))) from None
    except RecursionError:
        raise RuleFileError(f"{display_path(fpath)}: nested too deeply (recursive YAML anchors?)") from None


def _merge(parent: dict[str, Any], child: dict[str, Any], child_fpath: Path) -> dict[str, Any]:
    """Child over parent: mappings merge, concept/column/waiver lists add up, checks
    replace by id, ``disable`` drops the parent's checks."""
    out = {k: v for k, v in parent.items() if k not in ("extends", "disable")}
    parent_ids = [c["id"] for c in parent.get("checks", [])]
    for i, rule_id in enumerate(child.get("disable", [])):
        if rule_id not in parent_ids:
            raise RuleFileError(f"{display_path(child_fpath)}: disable[{i}]: the extended rule set has no "
                                f"check {rule_id!r} (it has: {', '.join(parent_ids) or 'none'})")
    disabled = set(child.get("disable", []))
    checks = [c for c in parent.get("checks", []) if c["id"] not in disabled]
    for spec in child.get("checks", []):
        ids = [c["id"] for c in checks]
        if spec["id"] in ids:
            checks[ids.index(spec["id"])] = spec
        else:
            checks.append(spec)
    out["checks"] = checks
    out["waivers"] = [*parent.get("waivers", []), *child.get("waivers", [])]
    for key, value in child.items():
        if key in ("extends", "disable", "checks", "waivers"):
            continue
        if key in ("concepts", "metadata"):
            out[key] = _merge_lists(parent.get(key, {}), value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _merge_lists(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Lists (and lists inside mappings) add up without repeats; scalars: child wins."""
    out = dict(parent)
    for key, value in child.items():
        old = out.get(key)
        if isinstance(value, list) and isinstance(old, list):
            out[key] = [*old, *(v for v in value if v not in old)]
        elif isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge_lists(old, value)
        else:
            out[key] = value
    return out
