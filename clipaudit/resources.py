"""Where clipaudit's shipped assets live.

In a wheel, ``rules/`` and ``report_templates/`` are force-included under
``clipaudit/_assets/``; in a source checkout (editable install) they are at the
repository root. Everything that needs them asks this module.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DPATH = Path(__file__).resolve().parent


def _asset_dpath(name: str) -> Path:
    for candidate in (_PACKAGE_DPATH / "_assets" / name, _PACKAGE_DPATH.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"clipaudit asset folder '{name}' is missing from this installation")


def rules_dpath() -> Path:
    """Folder of the shipped rule files (default.yaml, dermatology.yaml, ...)."""
    return _asset_dpath("rules")


def templates_dpath() -> Path:
    """Folder of the shipped jinja2 report templates."""
    return _asset_dpath("report_templates")


def package_data_dpath() -> Path:
    """Folder of data that lives inside the package (tiny CLIP weights, concept lists)."""
    return _PACKAGE_DPATH / "_data"
