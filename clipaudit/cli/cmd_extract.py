"""CLI verbs: extract (owned by the extract module)."""

from clipaudit.cli import app  # noqa: F401
