"""CLI verbs: audit (owned by the audit module)."""

from clipaudit.cli import app  # noqa: F401
