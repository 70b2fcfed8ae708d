"""Any open_clip tower family through the CLI: extract -> train-sae -> fit-probe -> audit
at the pooled hook point; earlier caches (last block, cls) still audit with the same
numbers; one record of what ran, whichever way the model was named."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clipaudit.artifacts import read_json, write_json
from clipaudit.attribution.patching import attribute_cls
from clipaudit.cli import app
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.cache_reader import open_cache
from clipaudit.extraction.hooks import HookPoint, make_tower
from clipaudit.heads import fit_probe_on_cache, save_probe
from clipaudit.results import load_audit
from clipaudit.sae import SAETrainConfig, load_sae, train_sae_on_cache
from clipaudit.synthetic import make_planted_dataset

from conftest import CONFIGS_DPATH

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return make_planted_dataset(root / "data", artifact="ruler", rate=1.0, n=48, seed=7).manifest_fpath


def _ok(res) -> None:
    assert res.exit_code == 0, res.output


def _pipeline(root: Path, data: Path, model_args: list[str], audit_args: tuple[str, ...] = ()) -> Path:
    cache, sae, probe, out = root / "cache", root / "sae.safetensors", root / "probe.safetensors", root / "a"
    _ok(runner.invoke(app, ["extract", str(data), "--out", str(cache), *model_args, "--workers", "0",
                            "--batch-size", "16", "-q"]))
    _ok(runner.invoke(app, ["train-sae", str(cache), "--out", str(sae), "--expansion", "2", "--k", "4",
                            "--steps", "20", "--batch-size", "16", "-q"]))
    _ok(runner.invoke(app, ["fit-probe", str(cache), "--out", str(probe)]))
    res = runner.invoke(app, ["audit", str(cache), "--sae", str(sae), "--probe", str(probe),
                              "--rules", "default", "--top-m", "5", "--no-pdf", "--out", str(out),
                              "--json", *audit_args])
    assert res.exit_code in (0, 1), res.output
    assert json.loads(res.stdout)["exit_code"] == res.exit_code
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, family", [
    ("tiny-siglip", "timm-vit"),
    ("tiny-eva02", "timm-vit"),
    ("tiny-resnet", "open_clip-resnet"),
    ("tiny-convnext", "timm-pooled-head"),
])
def test_probe_audit_runs_end_to_end_at_the_pooled_hook(tmp_path, data, name, family):
    out = _pipeline(tmp_path, data, ["--model-config", str(CONFIGS_DPATH / f"{name}.json"),
                                     "--pretrained", "random"], ("--attributions",))
    cache = open_cache(tmp_path / "cache")
    assert cache.provenance["hook"] == {"layer": None, "token": "pooled"}
    assert cache.manifest["tower"] == family
    result = load_audit(out)
    assert result.provenance["hook"]["token"] == "pooled" and result.provenance["gradient"] == "frozen"
    probe = result.head("probe")
    assert {c.class_name for c in probe.classes} == {"benign", "malignant"}
    assert {c.method for c in probe.faithfulness} >= {"act_x_grad", "act_x_grad_exact"}
    assert (out / "report.html").is_file() and any((out / "attributions-probe").glob("*.parquet"))
    # one image explained at the SAE's hook point, the model found from the SAE's record,
    # with either gradient
    image = str(cache.ok_index["path"].iloc[0])
    for gradient in ("frozen", "exact"):
        res = runner.invoke(app, ["explain", image, "--sae", str(tmp_path / "sae.safetensors"),
                                  "--probe", str(tmp_path / "probe.safetensors"),
                                  "--gradient", gradient, "--json"])
        assert res.exit_code == 0, res.output
        (explanation,) = json.loads(res.stdout)
        assert explanation["prediction"] in {"benign", "malignant"} and explanation["classes"][0]["top"]


@pytest.mark.slow
def test_a_tower_whose_rest_is_not_affine_is_explained_but_not_audited(tmp_path, data):
    """convnext_large_d's MLP projection: no closed form, so the streaming audit refuses it
    in one line (exit 2) and explain attributes its images by autograd."""
    cache, sae, probe = tmp_path / "cache", tmp_path / "sae.safetensors", tmp_path / "probe.safetensors"
    _ok(runner.invoke(app, ["extract", str(data), "--out", str(cache), "--model-config",
                            str(CONFIGS_DPATH / "tiny-convnext-mlp.json"), "--pretrained", "random",
                            "--workers", "0", "--batch-size", "16", "-q"]))
    _ok(runner.invoke(app, ["train-sae", str(cache), "--out", str(sae), "--expansion", "2", "--k", "4",
                            "--steps", "20", "--batch-size", "16", "-q"]))
    _ok(runner.invoke(app, ["fit-probe", str(cache), "--out", str(probe)]))
    res = runner.invoke(app, ["audit", str(cache), "--sae", str(sae), "--probe", str(probe),
                              "--no-pdf", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "not affine" in res.output, res.output
    assert not (tmp_path / "a").exists()
    image = str(open_cache(cache).ok_index["path"].iloc[0])
    res = runner.invoke(app, ["explain", image, "--sae", str(sae), "--probe", str(probe),
                              "--gradient", "exact", "--json"])
    assert res.exit_code == 0, res.output


def test_the_audit_refuses_the_exact_gradient_in_one_line(tmp_path):
    res = runner.invoke(app, ["audit", str(tmp_path / "cache"), "--sae", "s", "--probe", "p",
                              "--gradient", "exact", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2
    assert "explain --gradient exact" in res.output and len(res.output.strip().splitlines()) == 1


def _as_earlier_cache(dpath: Path) -> None:
    """Make a cache look like one an earlier clipaudit wrote (schema 1, created_with)."""
    manifest = read_json(dpath / "manifest.json", "activation-cache")
    payload = {k: v for k, v in manifest.items()
               if k not in ("kind", "schema_version", "clipaudit_version", "created", "provenance", "tower")}
    payload["created_with"] = {"backbone": {"model": "tiny-derm-clip"}}
    write_json(dpath / "manifest.json", "activation-cache", payload, provenance=manifest["provenance"])
    doc = json.loads((dpath / "manifest.json").read_text())
    doc["schema_version"] = 1
    (dpath / "manifest.json").write_text(json.dumps(doc))


def test_an_earlier_last_block_cls_cache_audits_with_the_same_numbers(tmp_path, data):
    spec = BackboneSpec(config=CONFIGS_DPATH / "tiny-vit-a.json", pretrained="random")
    backbone = load_backbone(spec)
    old = extract(data, tmp_path / "old", ExtractConfig(backbone=spec, hook=HookPoint(-1, "cls"),
                                                        num_workers=0), backbone=backbone).dpath
    new = extract(data, tmp_path / "new", ExtractConfig(backbone=spec, num_workers=0),
                  backbone=backbone).dpath
    _as_earlier_cache(old)
    old_cache, new_cache = open_cache(old), open_cache(new)
    assert old_cache.provenance["hook"] == {"layer": 2, "token": "cls"}
    torch.testing.assert_close(old_cache.load_acts(), new_cache.load_acts())
    sae_fpath = tmp_path / "sae.safetensors"
    train_sae_on_cache(old, sae_fpath, SAETrainConfig(expansion=2, k=4, steps=20, batch_size=16))
    save_probe(fit_probe_on_cache(old).probe, tmp_path / "probe.safetensors")
    res = runner.invoke(app, ["audit", str(old), "--sae", str(sae_fpath), "--probe",
                              str(tmp_path / "probe.safetensors"), "--top-m", "5", "--no-pdf",
                              "--out", str(tmp_path / "audit")])
    assert res.exit_code in (0, 1), res.output
    sae = load_sae(sae_fpath)
    head = fit_probe_on_cache(old).probe
    assert load_audit(tmp_path / "audit").provenance["hook"] == {"layer": 2, "token": "cls"}
    tower = make_tower(backbone.model)
    a_old = attribute_cls(old_cache.load_acts(), torch.arange(old_cache.n_ok), sae, head, tower)
    a_new = attribute_cls(new_cache.load_acts(), torch.arange(new_cache.n_ok), sae, head, tower)
    torch.testing.assert_close(a_old.values, a_new.values)


# ------------------------------------------------------------------ one record of what ran


@pytest.fixture
def named_tiny(tmp_path):
    """tests/configs/tiny-vit-a.json registered as an open_clip model name."""
    cfg_dpath = tmp_path / "open_clip_configs"
    cfg_dpath.mkdir()
    (cfg_dpath / "tiny-named.json").write_text((CONFIGS_DPATH / "tiny-vit-a.json").read_text())
    open_clip.add_model_config(cfg_dpath)
    yield "tiny-named"
    open_clip.factory._MODEL_CONFIGS.pop("tiny-named", None)


def _weights_file(tmp_path: Path) -> Path:
    source = load_backbone(BackboneSpec(config=CONFIGS_DPATH / "tiny-vit-a.json",
                                        pretrained="random", seed=9))
    fpath = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(fpath))
    return fpath


@pytest.mark.slow
@pytest.mark.parametrize("way", ["bundled", "name+random", "config+checkpoint", "name+weights-file"])
def test_one_record_of_what_ran_whichever_way_the_model_is_named(tmp_path, data, named_tiny, way):
    weights = _weights_file(tmp_path) if way in ("config+checkpoint", "name+weights-file") else None
    model_args = {
        "bundled": ["--model", "tiny-derm-clip"],
        "name+random": ["--model", named_tiny, "--pretrained", "random"],
        "config+checkpoint": ["--checkpoint", str(weights), "--model-config",
                              str(CONFIGS_DPATH / "tiny-vit-a.json")],
        "name+weights-file": ["--model", named_tiny, "--pretrained", str(weights)],
    }[way]
    out = _pipeline(tmp_path, data, model_args)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    recorded = manifest["provenance"]["backbone"]
    sae_meta = load_sae(tmp_path / "sae.safetensors").meta
    result = load_audit(out)
    report = (out / "report.html").read_text()
    # every artifact records the same model, and nothing else in them names one
    assert sae_meta["backbone"] == recorded
    assert result.provenance["backbone"] == recorded
    assert result.provenance["sae"]["backbone_id"] == recorded["id"]
    assert recorded["id"] in report
    assert "created_with" not in manifest
    expected_model = {"bundled": "tiny-derm-clip", "name+random": named_tiny,
                      "config+checkpoint": "tiny-vit-a", "name+weights-file": named_tiny}[way]
    assert recorded["model"] == expected_model
    assert recorded["pretrained"] == {"name+random": "random",
                                      "name+weights-file": str(weights)}.get(way)
    assert recorded["weights"].startswith("random-seed" if way == "name+random" else "sha256:")
    text = json.dumps(manifest) + json.dumps(result.provenance)
    others = {"tiny-derm-clip", named_tiny, "tiny-vit-a"} - {expected_model}
    assert not any(f'"{name}' in text for name in others)
