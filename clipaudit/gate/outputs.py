"""Gate outputs for CI: junit.xml (one test case per rule and class) and summary.md.

Class names, concepts and messages are user data: XML is built with ElementTree
(which escapes) after dropping characters XML 1.0 cannot hold; markdown cells are
HTML-escaped and markdown-escaped so a class called ``<script>`` or ``a|b`` stays text.
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from clipaudit.artifacts import atomic_path
from clipaudit.gate.engine import is_not_evaluated, not_evaluated_classes
from clipaudit.results import AuditResult, RuleVerdict

JUNIT_FNAME = "junit.xml"
SUMMARY_FNAME = "summary.md"
AUDIT_GROUP = "audit"
"""JUnit suite of rules that are judged once per audit (not per head and class)."""

_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌"}


def _failed(v: RuleVerdict) -> bool:
    return v.status == "fail" and v.waived is None


# ------------------------------------------------------------------ junit


def _x(text: object) -> str:
    return _XML_INVALID.sub("\ufffd", str(text))


def _skipped(v: RuleVerdict) -> bool:
    """Waived, or not evaluated (too few instances) without failing: a JUnit skip."""
    return v.waived is not None or (is_not_evaluated(v) and not _failed(v))


def _case_name(v: RuleVerdict) -> str:
    return f"{v.rule} [{v.class_name}]" if v.class_name is not None else v.rule


def _counts(verdicts: Iterable[RuleVerdict]) -> dict[str, str]:
    verdicts = list(verdicts)
    return {"tests": str(len(verdicts)), "failures": str(sum(map(_failed, verdicts))),
            "skipped": str(sum(_skipped(v) for v in verdicts)),
            "errors": "0", "time": "0"}


EXIT_CODES = ("clipaudit exit codes: 0 every rule passed, 1 a rule failed, 2 usage or input "
              "error, 3 internal error")


def _exit_code(result: AuditResult) -> int:
    return 1 if any(map(_failed, result.verdicts)) else 0


def junit_tree(result: AuditResult) -> ET.Element:
    """The JUnit XML document: a suite per head (plus ``audit``), a case per verdict."""
    root = ET.Element("testsuites", {"name": "clipaudit", **_counts(result.verdicts)})
    root.append(ET.Comment(f" {EXIT_CODES}; this audit: {_exit_code(result)} "))
    groups: dict[str, list[RuleVerdict]] = {}
    for v in result.verdicts:
        groups.setdefault(v.head if v.head is not None else AUDIT_GROUP, []).append(v)
    for group, verdicts in groups.items():
        suite = ET.SubElement(root, "testsuite",
                              {"name": _x(f"clipaudit.{group}"), **_counts(verdicts)})
        props = ET.SubElement(suite, "properties")
        for key, value in (("audit_id", result.audit_id), ("verdict", result.verdict),
                           ("rules", result.rules_file or ""),
                           ("exit_code", str(_exit_code(result)))):
            ET.SubElement(props, "property", name=key, value=_x(value))
        for v in verdicts:
            case = ET.SubElement(suite, "testcase", classname=_x(f"clipaudit.{group}"),
                                 name=_x(_case_name(v)), time="0")
            if _failed(v):
                failure = ET.SubElement(case, "failure", message=_x(v.message), type=_x(v.check))
                failure.text = _x(_failure_text(v))
            elif v.waived is not None:
                ET.SubElement(case, "skipped", message=_x(f"waived: {v.waived}"))
            elif is_not_evaluated(v):
                ET.SubElement(case, "skipped", message=_x(v.message))
            label = "WARNING: " if v.status == "warn" else ""
            ET.SubElement(case, "system-out").text = _x(label + v.message)
    ET.indent(root)
    return root


_LISTS = ("violations", "waived", "known_in_baseline", "expired_waivers", "matches")


def _failure_text(v: RuleVerdict) -> str:
    """The message, every violation when there are several, and the numbers behind it."""
    violations = v.details.get("violations", [])
    lines = [v.message, *(f"- {item.get('message')}" for item in violations
                          if len(violations) > 1)]
    numbers = {k: val for k, val in v.details.items() if k not in _LISTS}
    if numbers:
        lines.append(json.dumps(numbers, default=str, sort_keys=True))
    return "\n".join(lines)


def write_junit(result: AuditResult, fpath: Path | str) -> Path:
    """Write ``result``'s verdicts as JUnit XML (atomically)."""
    fpath = Path(fpath)
    with atomic_path(fpath) as tmp:
        ET.ElementTree(junit_tree(result)).write(tmp, encoding="utf-8", xml_declaration=True)
    return fpath


# ------------------------------------------------------------------ markdown


def md_escape(text: object) -> str:
    """User text as literal markdown on one line (safe in a table cell)."""
    flat = " ".join(str(text).split())
    escaped = html.escape(flat, quote=False).replace("@", "&#64;")
    return _MD_SPECIAL.sub(r"\\\1", escaped)


def _table(header: list[str], rows: list[list[str]], max_rows: int) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows[:max_rows]]
    if len(rows) > max_rows:
        lines.append(f"\n... and {len(rows) - max_rows} more (see junit.xml and the report)")
    return lines


def _verdict_row(v: RuleVerdict, text: str) -> list[str]:
    return [md_escape(v.rule), md_escape(v.head or "-"), md_escape(v.class_name or "-"),
            md_escape(text)]


def render_summary_md(result: AuditResult, max_rows: int = 50) -> str:
    """Markdown for a CI step summary or a PR comment: verdict first, then what failed."""
    verdicts = result.verdicts
    failing = [v for v in verdicts if _failed(v) and not is_not_evaluated(v)]
    warnings = [v for v in verdicts if v.status == "warn" and v.waived is None
                and not is_not_evaluated(v)]
    waived = [v for v in verdicts if v.waived is not None]
    unjudged = [v for v in verdicts if is_not_evaluated(v) and v.waived is None]
    n_pass = len(verdicts) - len(failing) - len(warnings) - len(waived) - len(unjudged)
    small = not_evaluated_classes(verdicts)
    verdict = result.verdict
    lines = [f"## {_ICON[verdict]} clipaudit gate: {verdict.upper()}", "",
             f"Audit {md_escape(result.audit_id)} · rules {md_escape(result.rules_file or '-')}"
             f" · **{len(failing)} failing** · {len(warnings)} warning(s) · {n_pass} passing"
             f" · {len(waived)} waived"
             + (f" · **{len(small)} class(es) not evaluated**" if small else ""), ""]
    header = ["Rule", "Head", "Class"]
    if small:
        lines += _not_evaluated_section(small, max_rows)
    if failing:
        lines += ["### Failing rules", ""]
        lines += _table([*header, "Why"], [_verdict_row(v, v.message) for v in failing], max_rows)
        lines.append("")
    if warnings:
        lines += ["### Warnings", ""]
        lines += _table([*header, "Why"], [_verdict_row(v, v.message) for v in warnings],
                        max_rows)
        lines.append("")
    if waived:
        lines += ["### Waived", ""]
        lines += _table([*header, "Waiver"], [_verdict_row(v, v.waived or "") for v in waived],
                        max_rows)
        lines.append("")
    lines += _findings_section(result, max_rows=10)
    rows = [[_ICON[v.status] + (" waived" if v.waived else ""), md_escape(v.rule),
             md_escape(v.check), md_escape(v.head or "-"), md_escape(v.class_name or "-"),
             md_escape(v.message)] for v in verdicts]
    lines += [f"<details><summary>All {len(verdicts)} rule results</summary>", ""]
    lines += _table(["Status", "Rule", "Check", "Head", "Class", "Message"], rows, max_rows)
    lines += ["", "</details>", "",
              f"<sub>{EXIT_CODES}; this audit: {_exit_code(result)}.</sub>", ""]
    return "\n".join(lines)


def _not_evaluated_section(small: list, max_rows: int) -> list[str]:
    rows = [[_ICON[c.status] if c.status != "pass" else "waived", md_escape(c.head),
             md_escape(c.class_name), str(c.n_instances), str(c.min_instances)] for c in small]
    return ["### Not evaluated", "",
            "No rule judged these classes: they have fewer audited instances than the rule "
            "set's `min_instances`.", "",
            *_table(["Status", "Head", "Class", "Instances", "Minimum"], rows, max_rows), ""]


def _findings_section(result: AuditResult, max_rows: int) -> list[str]:
    findings = sorted((f for h in result.heads for f in h.findings), key=lambda f: -f.share)
    if not findings:
        return ["No findings: no component carries a large share of a class's evidence "
                "while meaning something else.", ""]
    rows = [[md_escape(f.head), md_escape(f.class_name), str(f.component), md_escape(f.concept),
             f"{f.share:.3f}", f"{f.alignment:.3f}", md_escape(f.kind)] for f in findings]
    return ["### Top findings", "",
            *_table(["Head", "Class", "Component", "Concept", "Share", "Alignment", "Kind"],
                    rows, max_rows), ""]


def write_summary(result: AuditResult, fpath: Path | str) -> Path:
    """Write ``render_summary_md(result)`` (atomically)."""
    fpath = Path(fpath)
    with atomic_path(fpath) as tmp:
        tmp.write_text(render_summary_md(result), encoding="utf-8")
    return fpath
