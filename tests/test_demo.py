"""`clipaudit demo` end to end on the bundled tiny CLIP: it must find the planted ruler."""

import re

import pytest
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.results import load_audit


@pytest.mark.slow
def test_demo_finds_the_planted_ruler_and_fails_the_rules(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "FAILED, as intended" in res.output

    audit_dpath = out / "audit"
    for name in ("audit.json", "report.html", "report.pdf", "junit.xml", "summary.md"):
        assert (audit_dpath / name).is_file(), name
    result = load_audit(audit_dpath)
    probe = result.head("probe")
    rulers = [f for f in probe.findings if f.class_name == "malignant" and "ruler" in f.concept]
    assert rulers, [(f.class_name, f.concept) for f in probe.findings]
    ruler = rulers[0]
    assert ruler.rank == 1 and ruler.kind == "forbidden-concept"
    assert ruler.share > 0.15 and ruler.metadata_auc["has_ruler"] > 0.9
    # removing the component moves malignant predictions on ruler images, not elsewhere
    by_value = {s.value: s for s in ruler.ablation.slices if s.column == "has_ruler"}
    assert by_value["True"].flipped > 10 * max(by_value["False"].flipped, 1)
    # the probe relies on the shortcut more than the prompt set does
    spurious = {h.name: {c.class_name: c.spurious_share for c in h.classes} for h in result.heads}
    assert spurious["probe"]["malignant"] > spurious["zero-shot"]["malignant"]
    html = (audit_dpath / "report.html").read_text()
    assert "ruler" in html and "FAIL" in html
    _the_ruler_heatmaps_point_at_the_rulers(result, ruler.component, out, html)


def _the_ruler_heatmaps_point_at_the_rulers(result, component, out, html):
    """The ruler finding's heatmaps peak on the rulers of its top images (their masks
    come from the reference set's ground truth), and the report shows them."""
    import numpy as np

    from clipaudit.attribution.heatmap_files import load_heatmap_values
    from clipaudit.attribution.localization import pointing_hit
    from clipaudit.synthetic import load_artifact_mask

    assert result.heatmaps is not None and result.heatmaps.method == "relevance"
    info = next(c for c in result.components if c.component == component)
    assert [h.instance for h in info.heatmaps] == info.top_instances
    values = load_heatmap_values(out / "audit")
    paths = {i.id: i.path for i in result.instances}
    masks = [load_artifact_mask(out / "reference-data", paths[h.instance], "ruler")
             for h in info.heatmaps]
    with_ruler = [(values[(component, h.instance)], m) for h, m in zip(info.heatmaps, masks) if m.any()]
    assert len(with_ruler) >= 6
    hits = [pointing_hit(v, m, (8, 8)) for v, m in with_ruler]
    assert np.mean(hits) >= 0.8, hits
    overlays = re.findall(r'<span class="thumb-img (im-\d+) overlay" role="img"', html)
    assert len(overlays) >= 6 and 'id="heatmaps-all"' in html
    assert all(re.search(rf"\.{key}\{{background-image:url\(data:image/", html) for key in overlays)


@pytest.mark.slow
def test_demo_on_the_clean_control_names_no_ruler(tmp_path):
    """The same pipeline with rulers independent of the diagnosis (rate 0.5): the ruler
    component is still there (the SAE and the reference set are the same), but no
    classifier relies on it, so no finding may name it."""
    from clipaudit.demo import DemoConfig, run_demo

    outcome = run_demo(DemoConfig(out_dpath=tmp_path / "control", rate=0.5, pdf=False))
    findings = [f for h in outcome.result.heads for f in h.findings]
    assert not [f for f in findings if "ruler" in f.concept], [(f.class_name, f.concept) for f in findings]
    assert not [f for f in findings if f.metadata_auc.get("has_ruler", 0.0) >= 0.9]
    assert outcome.exit_code == 0, [v for v in outcome.result.verdicts if v.status == "fail"]
