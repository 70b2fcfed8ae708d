"""Audit reports: AuditResult -> ReportData -> self-contained HTML and PDF.

compute (``build_report_data``) -> data (``ReportData``) -> render (``render_html``,
``render_pdf``); ``write_report`` does all three for a finished audit folder.
"""

from clipaudit.report.build import build_report_data
from clipaudit.report.model import ReportConfig, ReportData
from clipaudit.report.render import ReportPaths, render_html, render_pdf, write_report

__all__ = [
    "ReportConfig",
    "ReportData",
    "ReportPaths",
    "build_report_data",
    "render_html",
    "render_pdf",
    "write_report",
]
