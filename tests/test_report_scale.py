"""Reports of audits with many classes: verdict first, a roll-up, details only where
something fails or warns, bounded HTML and PDF."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from clipaudit.report import build_report_data, render_html, write_report
from clipaudit.results import (
    AuditResult,
    ClassAudit,
    ComponentPoint,
    ComponentReliance,
    Finding,
    HeadAudit,
    InstanceInfo,
    PermutationControl,
    RuleVerdict,
    save_audit,
)

N_CLASSES = 1000
FAILING = {"class 0007", "class 0420"}
WARNING = {f"class {i:04d}" for i in range(900, 930)}
RULES = ("no-shortcuts", "shortcut-watch", "no-forbidden-concepts", "metadata-confirmed",
         "unexplained-evidence", "no-new-shortcuts")


def _result(audit_dpath: Path) -> AuditResult:
    rng = random.Random(0)
    (audit_dpath / "thumbnails").mkdir(parents=True)
    instances = []
    for i in range(40):
        Image.new("RGB", (96, 96), (rng.randrange(256), 90, 40)).save(audit_dpath / f"thumbnails/{i}.png")
        instances.append(InstanceInfo(i, f"/img/{i}.jpg", None, f"thumbnails/{i}.png"))
    heads, verdicts = [], []
    for head in ("probe", "zero-shot"):
        names = [f"class {i:04d}" for i in range(N_CLASSES)]
        findings = []
        for c, name in enumerate(names):
            for r in range(2):  # two findings in every class, backed only where a rule trips
                share = 0.4 if name in FAILING else 0.15 if name in WARNING else 0.11
                findings.append(Finding(
                    id=f"{head}:{name}:{c % 30 + r}", head=head, class_name=name, component=c % 30 + r,
                    kind="shortcut", rank=r + 1, share=share, concept_share=share, alignment=-0.02,
                    clarity=0.6, concept=f"concept {c % 30}", concept_score=0.1,
                    top_instances=[(c + k) % 40 for k in range(8)], share_ci=[share - 0.05, share + 0.05],
                    concept_share_ci=[share - 0.05, share + 0.05], chance_share=0.12, p_value=0.3,
                    backed=name in FAILING | WARNING))
        classes = [ClassAudit(name, 5, 0.2, sum(f.share for f in findings if f.class_name == name), 0.01,
                              components=[ComponentPoint(j, rng.uniform(-0.05, 0.3), rng.uniform(-0.1, 0.1),
                                                         rng.random(), f"concept {j}") for j in range(20)])
                   for name in names]
        relied = [ComponentReliance(j, f"concept {j}", 60 - j, 33, [names[j], names[j + 1]], 0.4)
                  for j in range(30)]
        heads.append(HeadAudit(head, "linear-probe", names, 0.2, classes, findings, [], relied))
        for rule in RULES:
            for name in names:
                status = "fail" if name in FAILING and rule == "no-shortcuts" else \
                    "warn" if name in WARNING | FAILING and rule == "shortcut-watch" else "pass"
                verdicts.append(RuleVerdict(rule, "shortcut-share", status, f"{rule} on {name}: {status}",
                                            head, name))
    return AuditResult("many-classes", {"statistics": {"resamples": 500, "level": 0.95}},
                       {"fvu": 0.1}, heads, instances=instances, verdicts=verdicts,
                       permutation=PermutationControl(0, 1500, 0, 0, 0))


@pytest.fixture(scope="module")
def audit_dpath(tmp_path_factory) -> Path:
    dpath = tmp_path_factory.mktemp("many") / "audit"
    save_audit(_result(dpath), dpath)
    return dpath


def test_a_thousand_class_report_rolls_up_and_details_only_what_fails_or_warns(audit_dpath):
    from clipaudit.results import load_audit

    result = load_audit(audit_dpath)
    data = build_report_data(result, audit_dpath)
    assert data.verdict == "fail" and data.n_reasons == 2 * (2 + 32)
    # under the verdict: a few of each rule, and how many more (not 20 rows of one rule)
    assert [(r.status, r.rule) for r in data.reasons] == \
        [("fail", "no-shortcuts")] * 3 + [("warn", "shortcut-watch")] * 3
    assert [(m.status, m.rule, m.n) for m in data.reasons_more] == \
        [("fail", "no-shortcuts", 1), ("warn", "shortcut-watch", 2 * 32 - 3)]
    probe = data.heads[0]
    assert len(probe.class_rows) == N_CLASSES and probe.n_classes == N_CLASSES
    assert {c.class_name for c in probe.classes} == FAILING | WARNING  # details: fail and warn only
    assert probe.classes[0].status == "fail"  # worst first
    assert [r.class_name for r in probe.class_rows[:2]] == sorted(FAILING)  # by spurious share
    assert probe.class_rows[0].anchor and probe.class_rows[-1].anchor is None
    assert probe.relied_rows[0].n_classes == 60 and len(probe.relied_rows) == 20
    # verdicts: per-rule counts, and only those that do not pass are listed
    assert {(r.rule, r.n_fail, r.n_warn) for r in data.rule_summary} >= {("no-shortcuts", 4, 0)}
    assert len(data.verdict_rows) == 2 * (2 + 32) and data.n_verdicts == 2 * 6 * N_CLASSES
    page = render_html(data)
    assert len(page.encode()) < 3_000_000, len(page.encode())
    assert "<select" not in page and 'id="class-search"' in page  # 2,000 options would not help
    assert page.count('class="card"') == 2 * 2 * (2 + 30)
    assert len(re.findall(r"\.th-\d+\{background-image", page)) <= 40  # each image once
    assert "With labels shuffled within the data" in page
    assert "61 more verdict(s) like these; see" in page


def test_the_pdf_edition_cuts_long_tables_and_says_where_the_rest_is(audit_dpath):
    from clipaudit.results import load_audit

    data = build_report_data(load_audit(audit_dpath), audit_dpath, print_mode=True)
    probe = data.heads[0]
    assert len(probe.class_rows) == 40 and len(probe.classes) == 15
    assert probe.n_details_left_out == 32 - 15
    assert len(data.finding_rows) == 40 and data.n_findings == 2 * 2 * N_CLASSES
    assert all(r.backed for r in data.finding_rows)  # backed findings first
    cards = [c for cls in probe.classes for c in cls.cards]
    assert len(cards) == 20 and all(c.backed for c in cards)  # a budget, backed first
    assert sum(cls.n_cards_left_out for cls in probe.classes) == 2 * 15 - 20
    page = render_html(data, print_mode=True)
    assert "every class is in report.html and audit.json" in page
    assert page.count('class="card"') == 2 * 20
    assert page.count("2 more finding(s) of this class: see the findings table") == 2 * 5
    html = build_report_data(load_audit(audit_dpath), audit_dpath).heads[0]
    assert sum(len(cls.cards) for cls in html.classes) == 2 * 32  # the HTML cards them all


@pytest.mark.slow
def test_the_pdf_of_a_thousand_classes_stays_short(audit_dpath, tmp_path):
    paths = write_report(audit_dpath, html=True, pdf=True)
    pdfinfo = shutil.which("pdfinfo")
    if pdfinfo is None:
        pytest.fail("pdfinfo not found: install Debian's poppler-utils (scripts/test.sh does)")
    info = subprocess.run([pdfinfo, str(paths.pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))
    assert 3 <= pages <= 60, pages
    assert paths.html.stat().st_size < 3_000_000
