"""CLI verbs: rules (owned by the rules module)."""

from clipaudit.cli import app  # noqa: F401
