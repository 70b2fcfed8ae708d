"""CLI verbs: synthetic (owned by the synthetic module)."""

from clipaudit.cli import app  # noqa: F401
