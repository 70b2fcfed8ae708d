"""ReportData -> HTML (interactive, self-contained) and PDF (weasyprint, print styles).

One jinja2 environment, autoescape on and StrictUndefined: class names, labels,
paths and prompts are user data and never become markup. The page's only script
is ours, pinned by a Content-Security-Policy hash, so even markup that slipped
through could not run. Rendering reads ``ReportData`` and writes nothing but the
output files.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from clipaudit.artifacts import atomic_path
from clipaudit.errors import InputError
from clipaudit.report.model import ReportConfig, ReportData
from clipaudit.resources import templates_dpath
from clipaudit.results import AUDIT_FNAME, AuditResult, load_audit
from clipaudit.staging import staged_output

log = logging.getLogger(__name__)

HTML_FNAME = "report.html"
PDF_FNAME = "report.pdf"
_TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class ReportPaths:
    """The files ``write_report`` wrote (None for a format that was not asked for)."""

    html: Path | None
    pdf: Path | None


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dpath())),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _asset(name: str) -> str:
    """A static asset (CSS, JS) inlined verbatim: read as text, never rendered."""
    env = _environment()
    source, _, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
    return source


def _csp_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


def render_html(data: ReportData, *, print_mode: bool = False) -> str:
    """The report as one HTML document; ``print_mode`` drops the script and the controls."""
    script = _asset("report.js")
    context: dict[str, Any] = {
        "d": data,
        "print_mode": print_mode,
        "css": Markup(_asset("report.css")),
        "script": Markup(script),
        "script_hash": _csp_hash(script),
    }
    return _environment().get_template(_TEMPLATE).render(context)


def render_pdf(data: ReportData) -> bytes:
    """The same content as the HTML report, laid out for paper by weasyprint."""
    import weasyprint

    document = weasyprint.HTML(string=render_html(data, print_mode=True),
                               url_fetcher=_offline_fetcher(), base_url=None)
    return document.write_pdf()


def _offline_fetcher() -> Any:
    """A fetcher that serves ``data:`` URIs only: the PDF never reaches disk or network."""
    import weasyprint

    if hasattr(weasyprint, "URLFetcher"):  # weasyprint >= 66
        return weasyprint.URLFetcher(allowed_protocols={"data"})

    def fetch(url: str, *args: Any, **kwargs: Any) -> Any:
        if not url.startswith("data:"):
            raise ValueError(f"report resources must be inline, refusing {url!r}")
        return weasyprint.default_url_fetcher(url, *args, **kwargs)

    return fetch


# both reports change together, or (a killed or failed render) neither does
@staged_output("audit_dpath", command="report", copy=True, replaces=AUDIT_FNAME)
def write_report(audit_dpath: Path | str, *, html: bool = True, pdf: bool = True,
                 config: ReportConfig | None = None,
                 result: AuditResult | None = None) -> ReportPaths:
    """(Re-)render ``report.html`` and/or ``report.pdf`` from a finished audit folder.

    Reads ``audit.json`` (unless ``result``, the audit it holds, is given: the audit
    passes the result it has just written) and the thumbnails only; recomputes nothing.
    Each file is written atomically, so a reader never sees a half-written report.
    """
    from clipaudit.report.build import build_report_data

    if not (html or pdf):
        raise InputError("nothing to write: ask for the HTML report, the PDF report or both")
    audit_dpath = Path(audit_dpath)
    if audit_dpath.is_file():  # the audit.json itself was given
        audit_dpath = audit_dpath.parent
    if not audit_dpath.is_dir():
        raise InputError(f"{audit_dpath}: not an audit folder (expected a folder with audit.json)")
    if result is None:
        result = load_audit(audit_dpath)
    html_fpath = pdf_fpath = None
    if html:
        html_fpath = audit_dpath / HTML_FNAME
        with atomic_path(html_fpath) as tmp:
            tmp.write_text(render_html(build_report_data(result, audit_dpath, config)), encoding="utf-8")
        log.info("wrote %s", html_fpath)
    if pdf:
        pdf_fpath = audit_dpath / PDF_FNAME
        data = build_report_data(result, audit_dpath, config, print_mode=True)
        with atomic_path(pdf_fpath) as tmp:
            tmp.write_bytes(render_pdf(data))
        log.info("wrote %s", pdf_fpath)
    return ReportPaths(html=html_fpath, pdf=pdf_fpath)
