"""CLI verbs: attribution (owned by the attribution module)."""

from clipaudit.cli import app  # noqa: F401
