"""CLI verbs: report (owned by the report module)."""

from clipaudit.cli import app  # noqa: F401
