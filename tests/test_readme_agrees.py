"""The README states figures the code owns; these tests keep the two from drifting."""

from __future__ import annotations

from pathlib import Path

from clipaudit.audit import OutputConfig
from clipaudit.report.model import ReportConfig
from clipaudit.sae.settings import ROWS_PER_LATENT, rule_k

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    assert f"\n{title}\n" in text, title
    body = text.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]
    return " ".join(body.split())


def test_the_reports_section_states_the_thumbnails_the_report_and_the_audit_keep():
    section = _section("## Reports")
    assert f"its top {ReportConfig().thumbnails_per_finding} images" in section
    assert f"keeps the top {OutputConfig().thumbnails_per_finding} ids per finding" in section


def test_the_sae_settings_section_states_the_rule_the_code_applies():
    section = _section("### SAE settings")
    assert f"(16 at d = 96, {rule_k(768)} at d = 768, {rule_k(1024)} at d = 1024)" in section
    assert rule_k(96) == 16
    assert f"at least {ROWS_PER_LATENT} training rows on average" in section
