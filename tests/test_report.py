"""Report: AuditResult -> ReportData -> HTML / PDF, on an audit folder built by hand.

The browser test lives in test_report_browser.py and reuses ``make_audit_folder``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import FrozenInstanceError
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.report import build_report_data, render_html, write_report
from clipaudit.report.model import ReportConfig
from clipaudit.report.render import _csp_hash
from clipaudit.report.svg import ScatterPoint, nice_ticks, scatter_svg
from clipaudit.results import (
    AblationEffect,
    AuditResult,
    ClassAudit,
    ComponentHeatmap,
    ComponentInfo,
    ComponentPoint,
    FaithfulnessCurve,
    Finding,
    HeadAudit,
    HeatmapsInfo,
    InstanceInfo,
    RuleVerdict,
    SliceEffect,
    load_audit,
    save_audit,
)

EVIL = "<script>alert(1)</script>"
CLASSES = ["benign", "malignant", EVIL]
METHODS = ["act_x_grad", "logit_lens", "act_x_logit_lens", "activation", "random"]


# ------------------------------------------------------------------ the hand-made audit

def _write_thumbnails(audit_dpath: Path, n: int) -> list[InstanceInfo]:
    (audit_dpath / "thumbnails").mkdir(parents=True, exist_ok=True)
    instances = []
    for i in range(n):
        img = Image.new("RGB", (96, 80), (40 + 20 * i, 200 - 15 * i, 90))
        img.paste((250, 250, 250), (10 + i, 30, 80, 40))  # a "ruler"
        rel = f"thumbnails/{i:04d}.png"
        img.save(audit_dpath / rel)
        instances.append(InstanceInfo(id=i, path=f"/data/lesions/{i:04d}.jpg",
                                      label=CLASSES[i % 3], thumbnail=rel))
    # One instance whose thumbnail was never copied: the report must still render.
    instances.append(InstanceInfo(id=n, path="/data/lesions/gone.jpg", label="malignant",
                                  thumbnail="thumbnails/gone.png"))
    return instances


HEATMAP_INSTANCES = (0, 3, 6, 9, 12)
"""Top instances of component 7 with a heatmap; 12's overlay file is missing on purpose."""


def _write_heatmaps(audit_dpath: Path) -> list[ComponentHeatmap]:
    (audit_dpath / "heatmaps").mkdir(parents=True, exist_ok=True)
    maps = []
    for i in HEATMAP_INSTANCES:
        overlay, raw = f"heatmaps/c7-i{i}-overlay.png", f"heatmaps/c7-i{i}-map.png"
        if i != 12:
            img = Image.new("RGB", (96, 96), (30, 10, 60))
            img.paste((250, 240, 120), (0, 0, 96, 24))  # bright over the "ruler"
            img.save(audit_dpath / overlay)
            img.save(audit_dpath / raw)
        maps.append(ComponentHeatmap(instance=i, overlay=overlay, map=raw, peak=[0, 1],
                                     activation=1.5))
    return maps


def _finding(head: str, class_name: str, component: int, rank: int, concept: str,
             share: float, ablation: bool = True) -> Finding:
    effect = AblationEffect(
        component=component, class_name=class_name, score_delta=-0.21, accuracy_before=0.91,
        accuracy_after=0.64, flipped=7,
        slices=[SliceEffect("has_ruler", "True", 20, -0.4, 0.95, 0.55, 7),
                SliceEffect("has_ruler", "False", 30, -0.02, 0.88, 0.87, 0)])
    return Finding(
        id=f"{head}:{class_name}:{component}", head=head, class_name=class_name,
        component=component, kind="forbidden-concept" if concept == "ruler" else "shortcut",
        rank=rank, share=share, concept_share=share, alignment=-0.031, clarity=0.72, concept=concept,
        concept_score=0.143, top_instances=[0, 3, 6, 9, 12, 1, 4],
        metadata_auc={"has_ruler": 0.94, "skin_tone_dark": 0.53},
        ablation=effect if ablation else None)


def _head(name: str, kind: str, findings: list[Finding], rng: random.Random) -> HeadAudit:
    classes = []
    for c in CLASSES:
        points = [ComponentPoint(component=j, share=rng.uniform(-0.05, 0.12),
                                 alignment=rng.uniform(-0.08, 0.1), clarity=rng.uniform(0, 1),
                                 concept=rng.choice(["lesion", "skin", "ruler", "<b>ink</b>"]))
                  for j in range(40)]
        mine = [f for f in findings if f.class_name == c]
        classes.append(ClassAudit(class_name=c, n_instances=50, accuracy=0.87,
                                  spurious_share=sum(f.share for f in mine),
                                  unexplained_share=0.08, components=points))
    curves = [FaithfulnessCurve(method=m, steps=list(range(0, 11)),
                                scores=[1.0 - (0.09 - 0.015 * k) * s for s in range(11)],
                                auc=0.4 + 0.1 * k)
              for k, m in enumerate(METHODS)]
    return HeadAudit(name=name, kind=kind, class_names=list(CLASSES), accuracy=0.86,
                     classes=classes, findings=findings, faithfulness=curves)


def make_audit_result(instances: list[InstanceInfo],
                      heatmaps: list[ComponentHeatmap] | None = None) -> AuditResult:
    rng = random.Random(0)
    probe = _head("probe", "linear-probe", [
        _finding("probe", "malignant", 7, 1, "ruler", 0.31),
        _finding("probe", "malignant", 21, 2, "band-aid", 0.12, ablation=False),
        _finding("probe", EVIL, 3, 1, EVIL, 0.18),
    ], rng)
    zero_shot = _head("zero-shot", "zero-shot", [
        _finding("zero-shot", "malignant", 7, 1, "ruler", 0.11),
    ], rng)
    verdicts = [
        RuleVerdict(rule="no-forbidden-concepts", check="forbidden-concept", status="fail",
                    message="component 7 (ruler) carries 31.0% of the class evidence",
                    head="probe", class_name="malignant"),
        RuleVerdict(rule="no-shortcuts", check="shortcut", status="warn",
                    message=f"component 3 ({EVIL}) carries 18.0%", head="probe",
                    class_name=EVIL),
        RuleVerdict(rule="no-shortcuts", check="shortcut", status="pass", message="no finding",
                    head="zero-shot", class_name="benign"),
        RuleVerdict(rule="max-unexplained", check="unexplained-share", status="fail",
                    message="unexplained share 8% > 5%", head="zero-shot",
                    class_name="benign", waived="known SAE limitation, ticket #12"),
    ]
    return AuditResult(
        audit_id="audit-2025-test-01",
        provenance={"backbone": {"id": "tiny-vit-a@sha256:abcd", "model": "tiny-vit-a",
                                 "pretrained": None, "weights": "sha256:" + "ab" * 32},
                    "hook": {"layer": 1, "token": "cls"},
                    "sae": {"id": "sae-1", "sha256": "cd" * 32},
                    "probe": {"sha256": "ef" * 32}, "data_hash": "12" * 32, "seed": 0,
                    "date": "2025-01-01T00:00:00+00:00", "clipaudit_version": "0.1.0"},
        sae_metrics={"fvu": 0.121, "l0": 32.0, "dead_fraction": 0.0123},
        heads=[probe, zero_shot],
        components=[ComponentInfo(component=7, concept="ruler", concept_score=0.14,
                                  clarity=0.72, top_instances=[0, 3], heatmaps=heatmaps or [])],
        instances=instances, verdicts=verdicts, rules_file="rules/dermatology.yaml",
        heatmaps=HeatmapsInfo(method="relevance", grid=[4, 4], file="heatmaps/heatmaps.safetensors",
                              note="relevance: test maps <b>4x4</b>") if heatmaps else None,
    )


def make_audit_folder(audit_dpath: Path) -> AuditResult:
    """A finished audit folder: audit.json plus PNG thumbnails (one missing on purpose) and
    heatmap overlays of component 7 (one missing on purpose)."""
    result = make_audit_result(_write_thumbnails(audit_dpath, 14), _write_heatmaps(audit_dpath))
    save_audit(result, audit_dpath)
    return result


@pytest.fixture
def audit_dpath(tmp_path: Path) -> Path:
    make_audit_folder(tmp_path / "audit")
    return tmp_path / "audit"


# ------------------------------------------------------------------ helpers

class _Collect(HTMLParser):
    """Tags, their attributes and the page's visible text (script text kept apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def _parse(page: str) -> _Collect:
    parser = _Collect()
    parser.feed(page)
    return parser


def _decode_data_uri(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64"), header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def _encoding(uri: str) -> str:
    """png, jpeg, webp-lossy or webp-lossless."""
    header, payload = uri.split(",", 1)
    kind = header.removeprefix("data:image/").removesuffix(";base64")
    if kind != "webp":
        return kind
    chunk = base64.b64decode(payload)[12:16]  # RIFF....WEBP then the first chunk's tag
    assert chunk in (b"VP8 ", b"VP8L"), chunk
    return "webp-lossless" if chunk == b"VP8L" else "webp-lossy"


# ------------------------------------------------------------------ report data

def test_report_data_carries_verdict_findings_and_comparison(audit_dpath):
    result = load_audit(audit_dpath)
    data = build_report_data(result, audit_dpath)
    assert data.verdict == "fail"
    # The waived failure is listed but is not a reason for the verdict.
    assert [(r.status, r.rule) for r in data.reasons] == [
        ("fail", "no-forbidden-concepts"), ("warn", "no-shortcuts")]
    assert data.verdict_rows[-1].waived is not None
    assert len(data.finding_rows) == sum(len(h.findings) for h in result.heads)
    assert {r.concept for r in data.finding_rows} == {"ruler", "band-aid", EVIL}
    assert data.class_names == tuple(CLASSES)
    assert data.comparison_heads == ("probe", "zero-shot")
    malignant = next(r for r in data.comparison_rows if r.class_name == "malignant")
    assert [c.spurious_share.value for c in malignant.cells] == pytest.approx([0.43, 0.11])
    assert [c.n_findings for c in malignant.cells] == [2, 1]
    probe = data.heads[0]
    assert [c.status for c in probe.classes] == ["pass", "fail", "warn"]
    assert [r.method for r in probe.faithfulness_rows] == METHODS
    keys = [kv.key for kv in data.provenance]
    assert keys[:2] == ["backbone.id", "backbone.model"]
    assert {"sae.sha256", "probe.sha256", "data_hash", "seed", "date"} <= set(keys)
    with pytest.raises(FrozenInstanceError):
        data.verdict = "pass"  # type: ignore[misc]


def test_thumbnails_are_downsized_inline_and_missing_ones_are_placeholders(audit_dpath):
    big = Image.new("RGBA", (512, 300), (10, 120, 200, 128))
    big.save(audit_dpath / "thumbnails" / "0000.png")
    data = build_report_data(load_audit(audit_dpath), audit_dpath)
    card = data.heads[0].classes[1].cards[0]
    assert card.concept == "ruler"
    assert len(card.thumbnails) == 6
    first = _decode_data_uri(card.thumbnails[0].src)
    assert max(first.size) == ReportConfig().thumbnail_px and first.size[0] > first.size[1]
    assert first.mode in ("RGB", "P")
    # instance 12 has a thumbnail on disk, 14 (not among the top 6) would be the missing one
    assert all(t.src for t in card.thumbnails)
    result = load_audit(audit_dpath)
    moved = [*result.instances[:-1],
             InstanceInfo(id=0, path="x", label="benign", thumbnail="../../etc/passwd")]
    escaped = build_report_data(
        AuditResult(**{**result.__dict__, "instances": moved}), audit_dpath)
    assert escaped.heads[0].classes[1].cards[0].thumbnails[0].src is None


def test_missing_thumbnail_file_becomes_a_placeholder(audit_dpath):
    (audit_dpath / "thumbnails" / "0003.png").unlink()
    data = build_report_data(load_audit(audit_dpath), audit_dpath)
    thumbs = data.heads[0].classes[1].cards[0].thumbnails
    assert [t.src is None for t in thumbs] == [False, True, False, False, False, False]
    page = render_html(data)
    assert page.count("image missing") >= 1


# ------------------------------------------------------------------ SVG

def test_scatter_svg_is_wellformed_escaped_and_sized_by_clarity():
    points = [ScatterPoint(1, 0.3, -0.05, 0.9, "<b>ruler</b> & co", True),
              ScatterPoint(2, 0.02, 0.04, 0.1, "skin", False),
              ScatterPoint(3, -0.01, 0.01, 0.5, "lesion", False)]
    svg = str(scatter_svg(points, EVIL))
    root = ET.fromstring(svg)  # well-formed XML: escaped text cannot open tags
    ns = {"s": "http://www.w3.org/2000/svg"}
    circles = list(root.iter("{http://www.w3.org/2000/svg}circle"))
    assert len(circles) == 3
    radius = {c.find("s:title", ns).text.split()[0]: float(c.get("r")) for c in circles}
    assert radius["#1"] > radius["#3"] > radius["#2"]
    highlighted = [g for g in root.findall("s:g", ns) if g.get("fill") == "#c62828"]
    # The finding is drawn last (on top), in the highlight colour, and labelled.
    assert [c.find("s:title", ns).text.split()[0] for c in highlighted[0]] == ["#1"]
    assert circles[-1] is highlighted[0][0]
    assert "#1 <b>ruler</b> & co" in "".join(highlighted[1].itertext())
    assert "<b>" not in svg and "&lt;b&gt;ruler&lt;/b&gt; &amp; co" in svg
    assert root.get("aria-label") == f"Relevance share vs alignment for class {EVIL}"
    labels = "".join(root.itertext())
    assert "relevance share" in labels and "alignment with the class" in labels


def test_scatter_crowd_is_drawn_as_dots_that_darken_where_they_overlap():
    rng = random.Random(3)
    points = [ScatterPoint(j, rng.uniform(-0.002, 0.002) if j % 2 else rng.uniform(-0.1, 0.3),
                           rng.uniform(-0.1, 0.1), rng.random(), "c", j == 0) for j in range(300)]
    points.append(ScatterPoint(999, float("nan"), 0.0, 0.5, "c", False))
    svg = scatter_svg(points, "x", tooltips=20)
    root = ET.fromstring(str(svg))
    ns = "{http://www.w3.org/2000/svg}"
    circles = list(root.iter(f"{ns}circle"))
    assert len(circles) == 21 and all(c.find(f"{ns}title") is not None for c in circles)
    titled = {int(c.find(f"{ns}title").text.split()[0][1:]) for c in circles}
    largest = sorted((p for p in points[1:] if p.share == p.share), key=lambda p: -abs(p.share))[:20]
    assert titled == {0} | {p.component for p in largest}
    # every other finite point is one dot: a zero-length round-capped segment
    dots = []
    for path in root.iter(f"{ns}path"):
        width = float(path.get("stroke-width"))
        centres = [tuple(map(float, m)) for m in re.findall(r"M([-\d.]+) ([-\d.]+)h0", path.get("d"))]
        assert centres and path.get("d") == "".join(f"M{x:g} {y:g}h0" for x, y in centres)
        # no two dots of one path overlap (a path paints an overlap once, circles twice)
        assert all((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 >= width ** 2
                   for i, a in enumerate(centres) for b in centres[i + 1:])
        dots += [(width / 2, c) for c in centres]
    assert len(dots) == 300 - 21
    layers = [p for p in root.iter(f"{ns}path")]
    assert len(layers) < len(dots) / 4  # far fewer elements than points
    group = next(g for g in root.iter(f"{ns}g") if g.find(f"{ns}path") is not None)
    assert group.get("stroke-linecap") == "round" and group.get("stroke-opacity") == "0.45"
    radii = {r for r, _ in dots}
    assert min(radii) >= 2 and max(radii) <= 8 and len(radii) > 5  # sized by clarity
    assert len(str(svg)) < 0.5 * len(str(scatter_svg(points, "x", tooltips=300)))


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-0.083, 0.126), (3.0, 3.0001), (-5, 120)])
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and min(steps) > 0


# ------------------------------------------------------------------ HTML

def test_html_escapes_user_text_and_loads_nothing_external(audit_dpath):
    page = render_html(build_report_data(load_audit(audit_dpath), audit_dpath))
    assert EVIL not in page
    assert html.escape(EVIL) in page
    parsed = _parse(page)
    scripts = [attrs for tag, attrs in parsed.tags if tag == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]
    # Only our script may run: the CSP pins its hash.
    csp = next(a["content"] for t, a in parsed.tags if a.get("http-equiv") ==
               "Content-Security-Policy")
    assert f"'{_csp_hash(parsed.scripts[0])}'" in csp and "default-src 'none'" in csp
    for tag, attrs in parsed.tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith(("data:", "#")), (tag, key, value)
    assert not re.search(r"url\((?!data:)", page)
    # Thumbnails are CSS backgrounds, each image inlined once however many cards show it.
    thumbs = [a for t, a in parsed.tags if "thumb-img" in (a.get("class") or "")]
    keys = [a["class"].split()[1] for a in thumbs]
    assert thumbs and len(keys) > len(set(keys))  # instances 0, 3, ... are on several cards
    for key in set(keys):
        assert len(re.findall(rf"\.{key}\{{background-image:url\(data:image/", page)) == 1, key
    assert all(a["role"] == "img" and a["aria-label"] for a in thumbs)
    options = [a["value"] for t, a in parsed.tags if t == "option"]
    assert options == ["", *CLASSES]


def test_an_audit_with_little_in_it_still_renders(tmp_path):
    nan = float("nan")
    head = HeadAudit(name="probe", kind="linear-probe", class_names=["a"], accuracy=None,
                     classes=[ClassAudit("a", 0, None, 0.0, nan, components=[
                         ComponentPoint(0, nan, 0.1, 0.5, "x"),
                         ComponentPoint(1, 0.2, 0.1, nan, "y")])],
                     faithfulness=[FaithfulnessCurve("random", [0, 1], [nan, 0.5], nan)])
    result = AuditResult(audit_id="tiny", provenance={}, sae_metrics={}, heads=[head])
    data = build_report_data(result, tmp_path)
    assert data.verdict == "pass" and data.comparison_heads == () and data.finding_rows == ()
    assert data.heads[0].classes[0].unexplained_share.value is None
    for print_mode in (False, True):
        page = render_html(data, print_mode=print_mode)
        assert "No rules were checked." in page and "No SAE metrics recorded." in page
        ET.fromstring(str(data.heads[0].classes[0].scatter_svg))
        ET.fromstring(str(data.heads[0].faithfulness_svg))


def test_print_mode_drops_script_and_controls(audit_dpath):
    data = build_report_data(load_audit(audit_dpath), audit_dpath)
    page = render_html(data, print_mode=True)
    tags = {t for t, _ in _parse(page).tags}
    assert "script" not in tags and "select" not in tags and "button" not in tags
    assert "ruler" in page and "FAIL" in page


def test_write_report_is_repeatable_and_touches_only_its_output(audit_dpath):
    before = {p.name: p.read_bytes() for p in audit_dpath.rglob("*") if p.is_file()}
    paths = write_report(audit_dpath, html=True, pdf=False)
    assert paths.pdf is None and paths.html == audit_dpath / "report.html"
    first = paths.html.read_text()
    write_report(audit_dpath / "audit.json", html=True, pdf=False)
    assert paths.html.read_text() == first
    after = {p.name: p.read_bytes() for p in audit_dpath.rglob("*") if p.is_file()}
    assert after.pop("report.html") and after == before  # no temp files, inputs unchanged
    assert len(first) < 400_000


# ------------------------------------------------------------------ CLI

def test_cli_report_prints_the_paths_it_wrote(audit_dpath):
    res = CliRunner().invoke(app, ["report", str(audit_dpath), "--no-pdf", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"html": str(audit_dpath / "report.html"), "pdf": None}
    assert (audit_dpath / "report.html").is_file()
    assert not (audit_dpath / "report.pdf").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong-kind", "malformed"])
def test_cli_report_refuses_a_broken_audit_with_exit_2(audit_dpath, damage):
    fpath = audit_dpath / "audit.json"
    if damage == "missing":
        fpath.unlink()
    elif damage == "corrupt":
        fpath.write_text('{"kind": "audit", ')
    else:
        doc = json.loads(fpath.read_text())
        if damage == "wrong-kind":
            doc["kind"] = "sae"
        else:
            doc["result"]["heads"][0]["colour"] = "red"
        fpath.write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["report", str(audit_dpath), "--no-pdf"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "audit.json" in lines[0], res.stderr
    assert not (audit_dpath / "report.html").exists()


def test_cli_report_needs_something_to_write(audit_dpath):
    res = CliRunner().invoke(app, ["report", str(audit_dpath), "--no-html", "--no-pdf"])
    assert res.exit_code == 2 and "nothing to write" in res.stderr


# ------------------------------------------------------------------ PDF

def _poppler(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: install Debian's poppler-utils (scripts/test.sh does)")
    return path


@pytest.mark.slow
def test_pdf_pages_are_nonblank_and_text_carries_verdict_and_labels(audit_dpath, tmp_path):
    pdftoppm, pdftotext = _poppler("pdftoppm"), _poppler("pdftotext")
    paths = write_report(audit_dpath, html=False, pdf=True)
    assert paths.html is None and paths.pdf.read_bytes().startswith(b"%PDF-")
    subprocess.run([pdftoppm, "-png", "-r", "40", str(paths.pdf), str(tmp_path / "page")],
                   check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    n_heads = len(load_audit(audit_dpath).heads)
    assert len(pages) >= 1 + n_heads  # the overview, then each head starts a new page
    for page in pages:
        gray = Image.open(page).convert("L")
        dark = sum(gray.histogram()[:200])
        assert dark > 0.002 * gray.width * gray.height, f"{page.name} is blank"
    text = subprocess.run([pdftotext, "-layout", str(paths.pdf), "-"], check=True,
                          capture_output=True, text=True).stdout
    assert "Verdict: FAIL" in text
    assert "ruler" in text and "band-aid" in text
    assert EVIL in text
    page_texts = text.split("\f")[:len(pages)]
    for i, page_text in enumerate(page_texts, start=1):  # running header and page numbers
        assert "clipaudit audit audit-2025-test-01" in page_text, f"page {i} lacks the header"
        assert re.search(rf"\b{i}\s*/\s*{len(pages)}\b", page_text), f"page {i} unnumbered"


@pytest.mark.slow
def test_pdf_draws_the_scatter_crowd_as_it_would_draw_circles(tmp_path):
    """weasyprint (and poppler) must paint a zero-length round-capped segment as a dot."""
    import weasyprint

    pdftoppm = _poppler("pdftoppm")
    rng = random.Random(5)
    points = [ScatterPoint(j, rng.uniform(-0.01, 0.2), rng.uniform(-0.1, 0.1), rng.random(), "c", False)
              for j in range(150)]
    ink = []
    for name, tooltips in (("dots", 0), ("circles", 150)):
        svg = str(scatter_svg(points, "x", tooltips=tooltips))
        assert ("<path" in svg) == (name == "dots")
        (tmp_path / f"{name}.pdf").write_bytes(weasyprint.HTML(string=f"<body>{svg}</body>").write_pdf())
        subprocess.run([pdftoppm, "-png", "-r", "72", "-singlefile", str(tmp_path / f"{name}.pdf"),
                        str(tmp_path / name)], check=True)
        gray = Image.open(tmp_path / f"{name}.png").convert("L")
        ink.append(sum(255 - v for v in gray.tobytes()))
    assert ink[0] == pytest.approx(ink[1], rel=0.05)  # without the dots: 0.4 of the circles' ink


def test_a_finding_split_over_components_shows_its_concept_share(audit_dpath):
    result = load_audit(audit_dpath)
    probe = result.heads[0]
    split = [dataclasses.replace(f, concept_share=0.45) if f.component == 7 else f for f in probe.findings]
    result = dataclasses.replace(result, heads=[dataclasses.replace(probe, findings=split), *result.heads[1:]])
    data = build_report_data(result, audit_dpath)
    cards = {c.id: c for h in data.heads for cls in h.classes for c in cls.cards}
    assert cards["probe:malignant:7"].concept_share.text == "45.0%"
    assert cards["probe:malignant:21"].concept_share is None  # alone with its label
    page = render_html(data)
    assert "(45.0% with the class's other &ldquo;ruler&rdquo; findings)" in page


# ------------------------------------------------------------------ heatmaps


def _cards(data):
    return {c.id: c for h in data.heads for cls in h.classes for c in cls.cards}


def test_finding_cards_carry_heatmap_overlays_beside_their_images(audit_dpath):
    data = build_report_data(load_audit(audit_dpath), audit_dpath)
    cards = _cards(data)
    ruler = cards["probe:malignant:7"]
    # top instances [0, 3, 6, 9, 12, 1]: overlays for 0, 3, 6, 9; 12's file is missing
    assert [t.overlay is not None for t in ruler.thumbnails] == [True] * 4 + [False, False]
    assert ruler.has_heatmaps and cards["zero-shot:malignant:7"].has_heatmaps
    assert not cards["probe:malignant:21"].has_heatmaps  # another component: no maps
    overlay = _decode_data_uri(ruler.thumbnails[0].overlay)
    assert max(overlay.size) <= ReportConfig().thumbnail_px
    assert overlay.convert("RGB").getpixel((10, 5))[0] > 200  # the bright band drawn above
    assert data.any_heatmaps and "relevance: test maps <b>4x4</b>" in data.heatmap_note

    page = render_html(data)
    parsed = _parse(page)
    switches = [a for t, a in parsed.tags if t == "input" and "heatmap-switch" in (a.get("class") or "")]
    assert len(switches) == 2 and all("checked" in a for a in switches)
    labels = {a.get("for") for t, a in parsed.tags if t == "label"}
    assert {a["id"] for a in switches} <= labels
    assert "heatmaps-all" in {a.get("id") for t, a in parsed.tags if t == "input"}
    overlays = _overlay_spans(parsed)
    assert len(overlays) == 8 and all(a["role"] == "img" and "heatmap of component 7" in a["aria-label"]
                                      for a in overlays)
    assert "test maps &lt;b&gt;4x4&lt;/b&gt;" in page  # the note is text

    paper = _parse(render_html(data, print_mode=True))
    assert not [a for t, a in paper.tags if t == "input"]  # nothing to switch on paper
    figures = [a for t, a in paper.tags if t == "figure" and "with-overlay" in (a.get("class") or "")]
    assert len(figures) == 8  # each shows its image and its heatmap side by side
    assert len(_overlay_spans(paper)) == 8


def _overlay_spans(parsed: _Collect) -> list[dict]:
    return [a for t, a in parsed.tags if t == "span" and "overlay" in (a.get("class") or "").split()]


def test_each_image_is_inlined_once_in_the_encoding_its_reader_handles_best(audit_dpath):
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 40, (150, 150, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(audit_dpath / "thumbnails" / "0003.png")  # many colours
    result = load_audit(audit_dpath)
    screen = build_report_data(result, audit_dpath)
    ruler = _cards(screen)["probe:malignant:7"]
    by_instance = dict(zip([0, 3, 6, 9, 12, 1], ruler.thumbnails))
    # Browsers get WebP: lossy for a photo, lossless (pixel for pixel) for a flat picture.
    assert _encoding(by_instance[3].src) == "webp-lossy"
    assert _encoding(by_instance[0].src) == "webp-lossless"
    with Image.open(audit_dpath / "thumbnails" / "0000.png") as original:
        original.thumbnail((ReportConfig().thumbnail_px,) * 2)
        assert _decode_data_uri(by_instance[0].src).convert("RGB").tobytes() == \
            original.convert("RGB").tobytes()
    # weasyprint would decode a WebP and store its pixels losslessly: the PDF gets JPEG or PNG.
    paper = _cards(build_report_data(result, audit_dpath, print_mode=True))["probe:malignant:7"]
    paper_by_instance = dict(zip([0, 3, 6, 9, 12, 1], paper.thumbnails))
    assert _encoding(paper_by_instance[3].src) == "jpeg"
    assert _encoding(paper_by_instance[0].src) == "png"
    assert {_encoding(t.overlay) for t in paper.thumbnails if t.overlay} <= {"png", "jpeg"}

    # Component 7 is a finding of both heads: its overlays show on 8 figures; every image
    # is in the page once, identical ones (these test overlays) under one CSS class.
    page = render_html(screen)
    spans = _overlay_spans(_parse(page))
    assert len(spans) == 8
    images = {t.src for c in _cards(screen).values() for t in c.thumbnails if t.src}
    images |= {t.overlay for c in _cards(screen).values() for t in c.thumbnails if t.overlay}
    assert len(images) >= 3 and all(page.count(uri) == 1 for uri in images)
    keys = re.findall(r"\.(im-\d+)\{background-image:url\(data:image/webp;base64,", page)
    assert len(keys) == len(set(keys)) == len(images)
    assert {a["class"].split()[1] for a in spans} <= set(keys)


def test_the_report_says_why_an_audit_has_no_heatmaps(audit_dpath):
    result = load_audit(audit_dpath)
    why = "heatmaps need a tower with patch tokens; ModifiedResNet has none that clipaudit knows"
    result = dataclasses.replace(
        result, heatmaps=HeatmapsInfo(method=None, note=why),
        components=[dataclasses.replace(c, heatmaps=[]) for c in result.components])
    data = build_report_data(result, audit_dpath)
    assert not data.any_heatmaps and data.heatmap_note == f"No heatmaps: {why}"
    page = render_html(data)
    checkboxes = [a for t, a in _parse(page).tags if t == "input" and a.get("type") == "checkbox"]
    assert f"No heatmaps: {why}" in page and not checkboxes  # no heatmap switches
    older = build_report_data(dataclasses.replace(result, heatmaps=None), audit_dpath)
    assert older.heatmap_note == "" and "heatmap-note" not in render_html(older).split("<body")[1]


def test_an_audit_of_schema_2_still_loads(audit_dpath):
    fpath = audit_dpath / "audit.json"
    doc = json.loads(fpath.read_text())
    doc["schema_version"] = 2
    del doc["result"]["heatmaps"]
    for c in doc["result"]["components"]:
        del c["heatmaps"]
    fpath.write_text(json.dumps(doc))
    result = load_audit(audit_dpath)
    assert result.heatmaps is None and result.components[0].heatmaps == []
    doc["schema_version"] = 1
    fpath.write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["report", str(audit_dpath), "--no-pdf"])
    assert res.exit_code == 2 and "schema version 1" in res.stderr


@pytest.mark.slow
def test_pdf_embeds_each_heatmap_beside_its_image(audit_dpath, tmp_path):
    pdfimages = _poppler("pdfimages")
    with_maps = write_report(audit_dpath, html=False, pdf=True).pdf.read_bytes()
    (tmp_path / "with.pdf").write_bytes(with_maps)
    result = load_audit(audit_dpath)
    save_audit(dataclasses.replace(result, heatmaps=None, components=[
        dataclasses.replace(c, heatmaps=[]) for c in result.components]), audit_dpath)
    write_report(audit_dpath, html=False, pdf=True)

    def images(fpath: Path) -> int:
        listing = subprocess.run([pdfimages, "-list", str(fpath)], check=True,
                                 capture_output=True, text=True).stdout
        return len(listing.strip().splitlines()) - 2  # two header lines

    n_with, n_without = images(tmp_path / "with.pdf"), images(audit_dpath / "report.pdf")
    assert n_without > 0 and n_with >= n_without + 4  # the 8 overlays (identical pairs may share)
