"""CLI verbs: sae (owned by the sae module)."""

from clipaudit.cli import app  # noqa: F401
