"""End to end on a tiny random-weight ViT: extract -> SAE -> probe -> audit -> gate."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.heads import fit_probe_on_cache, save_probe
from clipaudit.results import load_audit
from clipaudit.sae import SAETrainConfig, train_sae_on_cache
from clipaudit.synthetic import make_planted_dataset

from conftest import CONFIGS_DPATH

SPEC = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json", pretrained="random")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    data = make_planted_dataset(root / "data", artifact="ruler", rate=1.0, n=160, seed=3)
    cache = extract(data.manifest_fpath, root / "cache", ExtractConfig(backbone=SPEC, num_workers=0,
                                                                      batch_size=32)).dpath
    train_sae_on_cache(cache, root / "sae.safetensors", SAETrainConfig(expansion=4, k=8, steps=60,
                                                                      batch_size=64))
    save_probe(fit_probe_on_cache(cache).probe, root / "probe.safetensors")
    prompts = root / "prompts.yaml"
    prompts.write_text("classes:\n  benign: {names: [a benign nevus]}\n"
                       "  malignant: {names: [a malignant melanoma]}\n")
    return {"root": root, "cache": cache, "sae": root / "sae.safetensors",
            "probe": root / "probe.safetensors", "prompts": prompts, "data": data.dpath}


@pytest.mark.slow
def test_audit_writes_a_complete_folder_and_exits_by_the_rules(pipeline):
    out = pipeline["root"] / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["audit", str(pipeline["cache"]), "--sae", str(pipeline["sae"]),
                              "--probe", str(pipeline["probe"]), "--prompts", str(pipeline["prompts"]),
                              "--rules", "dermatology", "--vocab", "dermatology", "--no-pdf",
                              "--top-m", "50", "--out", str(out), "--json", "--attributions"])
    assert res.exit_code in (0, 1), res.output
    result = load_audit(out)
    assert [h.name for h in result.heads] == ["probe", "zero-shot"]
    assert {c.class_name for c in result.head("probe").classes} == {"benign", "malignant"}
    for name in ("audit.json", "junit.xml", "summary.md", "report.html"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the scratch codes are gone
    for head in ("probe", "zero-shot"):  # per-instance tables on request: label and prediction
        table = pd.read_parquet(out / f"attributions-{head}")
        assert set(table["instance_id"]) <= set(range(160)) and table["is_pred"].any()
        assert (table.groupby("instance_id")["class"].nunique() <= 2).all()
    assert res.exit_code == (1 if result.verdict == "fail" else 0)
    probe = result.head("probe")
    assert probe.faithfulness and {c.method for c in probe.faithfulness} >= {"act_x_grad", "random"}
    for cls in probe.classes:
        assert 0.0 <= cls.unexplained_share <= 1.0 and cls.components
    for f in probe.findings:  # every finding carries its evidence and its statistics
        assert f.ablation is not None and "has_ruler" in f.metadata_auc
        assert f.share >= 0.05 and f.top_instances
        assert f.share_ci[0] <= f.share <= f.share_ci[1] and f.chance_share is not None
    assert result.permutation is not None and result.permutation.n_failing >= 0
    assert result.provenance["sae"]["sha256"] and result.provenance["data_sha256"]
    assert result.provenance["top_m"] == 50


@pytest.mark.slow
def test_audit_refuses_an_sae_for_another_model(pipeline, tmp_path):
    other = BackboneSpec(model="tiny-vit-b", config=CONFIGS_DPATH / "tiny-vit-b.json", pretrained="random")
    cache_b = extract(pipeline["data"] / "manifest.csv", tmp_path / "cache-b",
                      ExtractConfig(backbone=other, num_workers=0)).dpath
    res = CliRunner().invoke(app, ["audit", str(cache_b), "--sae", str(pipeline["sae"]),
                                   "--probe", str(pipeline["probe"]), "--no-pdf",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "mismatch" in res.output and "Traceback" not in res.output


def test_audit_without_a_head_is_a_usage_error(pipeline, tmp_path):
    res = CliRunner().invoke(app, ["audit", str(pipeline["cache"]), "--sae", str(pipeline["sae"]),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nothing to audit" in res.output


def test_explain_prints_components_per_class(pipeline):
    image = next((pipeline["data"] / "images").glob("*.png"))
    res = CliRunner().invoke(app, ["explain", str(image), "--sae", str(pipeline["sae"]),
                                   "--probe", str(pipeline["probe"]), "--json"])
    assert res.exit_code == 0, res.output
    import json

    (explanation,) = json.loads(res.stdout)
    assert {c["class_name"] for c in explanation["classes"]} == {"benign", "malignant"}
    assert all(len(c["top"]) == 5 for c in explanation["classes"])


def test_explain_draws_the_predicted_class_heatmaps(pipeline, tmp_path):
    import json

    from PIL import Image

    images = sorted((pipeline["data"] / "images").glob("*.png"))[:2]
    base = ["explain", "--sae", str(pipeline["sae"]), "--probe", str(pipeline["probe"])]
    res = CliRunner().invoke(app, [*base[:1], str(images[0]), *base[1:], "--heatmap",
                                   str(tmp_path / "one.png"), "--heatmap-components", "2", "--json"])
    assert res.exit_code == 0, res.output
    (explanation,) = json.loads(res.stdout)
    assert explanation["heatmap"] == str(tmp_path / "one.png")
    predicted = next(c for c in explanation["classes"] if c["class_name"] == explanation["prediction"])
    drawn = [c for c in predicted["top"] if c["heatmap"] is not None]
    assert 1 <= len(drawn) <= 2 and all(c["attribution"] > 0 for c in drawn)
    assert all(len(c["heatmap"]) == 4 and len(c["heatmap"][0]) == 4 for c in drawn)  # 32 px / 8 px
    with Image.open(tmp_path / "one.png") as panel:
        assert panel.width > (1 + len(drawn)) * 160 and panel.height > 160
    # several images: one file each; a file that is not PNG or an unknown method: exit 2
    res = CliRunner().invoke(app, [*base[:1], *map(str, images), *base[1:], "--heatmap",
                                   str(tmp_path / "many.png")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.glob("many-*.png")) == [
        f"many-{i}-{p.stem}.png" for i, p in enumerate(images)]
    for bad in (["--heatmap", str(tmp_path / "x.jpg")],
                ["--heatmap", str(tmp_path / "x.png"), "--heatmap-method", "saliency"]):
        res = CliRunner().invoke(app, [*base[:1], str(images[0]), *base[1:], *bad])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "x.jpg").exists() and not (tmp_path / "x.png").exists()


def test_fit_probe_cli_reports_per_class_accuracy(pipeline, tmp_path):
    res = CliRunner().invoke(app, ["fit-probe", str(pipeline["cache"]), "--out",
                                   str(tmp_path / "p.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    import json

    metrics = json.loads(res.stdout)
    assert set(metrics["heldout_accuracy_per_class"]) == {"benign", "malignant"}
    bad = CliRunner().invoke(app, ["fit-probe", str(pipeline["cache"]), "--out", str(tmp_path / "q"),
                                   "--label-column", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


@pytest.mark.slow
def test_a_registered_head_type_is_audited_and_descriptions_are_reused(pipeline):
    """docs/architecture.md's example: a new head type is one module registered in one
    place; the audit then runs it beside a probe, and a second audit reuses the first's
    component descriptions (and refuses ones made with another vocabulary)."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from clipaudit.audit import AuditConfig, OutputConfig, run_audit
    from clipaudit.describe.config import DescribeConfig
    from clipaudit.errors import MismatchError
    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.heads import HeadType, LinearForm, list_heads, load_head, register_head_type

    @dataclasses.dataclass
    class CentroidHead:
        centroids: torch.Tensor
        class_names: list[str]
        name: str = "centroid"
        kind: str = "centroid"

        def linear_form(self, e_nD):
            return LinearForm(self.centroids.to(e_nD), torch.zeros(e_nD.shape[1]),
                              e_nD.detach().norm(dim=1).clamp_min(1e-12), torch.zeros(len(self.class_names)))

        def scores(self, e_nD):
            return torch.nn.functional.normalize(e_nD, dim=1) @ self.centroids.T

        def class_texts(self):
            return {name: [name] for name in self.class_names}

        def provenance(self):
            return {"name": self.name, "kind": self.kind}

    def load(fpath, backbone):
        names = ["benign", "malignant"]
        return CentroidHead(torch.nn.functional.normalize(
            torch.stack([load_file_tensors(fpath)[n] for n in names]), dim=1), names)

    def load_file_tensors(fpath):
        from safetensors.torch import load_file
        return load_file(str(fpath))

    register_head_type(HeadType("centroid", "class centroids (test)", load))
    assert "centroid" in list_heads()
    cache = open_cache(pipeline["cache"])
    embeds, labels = cache.load_embeds(), cache.ok_index["label"].tolist()
    means = {n: embeds[[lab == n for lab in labels]].mean(0) for n in ("benign", "malignant")}
    save_file(means, str(pipeline["root"] / "centroids.safetensors"))
    from clipaudit.extraction.backbone import load_backbone
    head = load_head("centroid", pipeline["root"] / "centroids.safetensors", load_backbone(SPEC))

    config = AuditConfig(rules="dermatology", outputs=OutputConfig(html=False, pdf=False),
                         describe=DescribeConfig(vocabularies=("dermatology",), top_m=50))
    first = run_audit(pipeline["cache"], pipeline["sae"], pipeline["root"] / "reg1",
                      probe=pipeline["probe"], heads=[head], config=config)
    assert [h.kind for h in first.result.heads] == ["linear-probe", "centroid"]
    assert (pipeline["root"] / "reg1" / "descriptions.safetensors").is_file()
    again = run_audit(pipeline["cache"], pipeline["sae"], pipeline["root"] / "reg2",
                      prompts=pipeline["prompts"], config=dataclasses.replace(
                          config, describe=dataclasses.replace(config.describe,
                                                               reuse=pipeline["root"] / "reg1")))
    assert again.result.heads[0].kind == "zero-shot"
    with pytest.raises(MismatchError, match="vocabularies"):
        run_audit(pipeline["cache"], pipeline["sae"], pipeline["root"] / "reg3", probe=pipeline["probe"],
                  config=dataclasses.replace(config, describe=DescribeConfig(
                      vocabularies=("general",), top_m=50, reuse=pipeline["root"] / "reg1")))


@pytest.mark.slow
def test_the_report_the_audit_renders_from_memory_is_the_one_audit_json_gives(pipeline, tmp_path):
    """The audit renders report.html from the result it holds rather than reading
    audit.json back; `clipaudit report` reads the file. Both must show the same thing."""
    from clipaudit.report.build import build_report_data
    from clipaudit.report.model import ReportConfig
    from clipaudit.report.render import render_html

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["audit", str(pipeline["cache"]), "--sae", str(pipeline["sae"]),
                                   "--probe", str(pipeline["probe"]), "--prompts", str(pipeline["prompts"]),
                                   "--rules", "dermatology",
                                   "--no-pdf", "--top-m", "50", "--out", str(out)])
    assert res.exit_code in (0, 1), res.output
    from_file = render_html(build_report_data(load_audit(out), out, ReportConfig()))
    assert (out / "report.html").read_text(encoding="utf-8") == from_file
