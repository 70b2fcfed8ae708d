"""The CI gate: rule files, registered checks, verdicts, junit.xml and summary.md.

    ruleset = load_ruleset("dermatology")          # or a path; extends resolved
    config = ruleset.finding_config()              # thresholds for the audit
    verdicts = evaluate(result, ruleset, baseline=None)
    exit_code(verdicts)                            # 0 pass, 1 a failing rule
"""

from clipaudit.gate import checks as _checks  # noqa: F401  (registers the built-in checks)
from clipaudit.gate import trust_checks as _trust_checks  # noqa: F401
from clipaudit.gate.apply import GateRun, apply_rules
from clipaudit.gate.baseline import BaselineIndex, BaselineMatch
from clipaudit.gate.engine import (
    NotEvaluated,
    check_audit_trust,
    evaluate,
    exit_code,
    is_not_evaluated,
    not_evaluated_classes,
)
from clipaudit.gate.loader import list_rulesets, load_ruleset, parse_ruleset
from clipaudit.gate.matching import concept_matches
from clipaudit.gate.model import CheckSpec, RuleSet, Waiver
from clipaudit.gate.outputs import (
    JUNIT_FNAME,
    SUMMARY_FNAME,
    render_summary_md,
    write_junit,
    write_summary,
)
from clipaudit.gate.registry import (
    CheckOutcome,
    Scope,
    Violation,
    get_check,
    list_checks,
    register_check,
    ruleset_json_schema,
)

__all__ = [
    "JUNIT_FNAME",
    "SUMMARY_FNAME",
    "BaselineIndex",
    "BaselineMatch",
    "CheckOutcome",
    "CheckSpec",
    "GateRun",
    "NotEvaluated",
    "RuleSet",
    "Scope",
    "Violation",
    "Waiver",
    "apply_rules",
    "check_audit_trust",
    "concept_matches",
    "evaluate",
    "exit_code",
    "get_check",
    "is_not_evaluated",
    "list_checks",
    "list_rulesets",
    "load_ruleset",
    "not_evaluated_classes",
    "parse_ruleset",
    "register_check",
    "render_summary_md",
    "ruleset_json_schema",
    "write_junit",
    "write_summary",
]
