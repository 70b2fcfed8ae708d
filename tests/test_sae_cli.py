"""train-sae and sae-info on a real (tiny, random-weight) activation cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract, open_cache
from clipaudit.sae import load_sae

from conftest import CONFIGS_DPATH

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cache(root: Path, model: str, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    images = root / "images" / "all"
    images.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    spec = BackboneSpec(model=model, config=CONFIGS_DPATH / f"{model}.json", pretrained="random")
    config = ExtractConfig(backbone=spec, batch_size=16, num_workers=0, device="cpu")
    return extract(root / "images", root / "cache", config).dpath


@pytest.fixture(scope="module")
def cache_a(tmp_path_factory) -> Path:
    return _cache(tmp_path_factory.mktemp("a"), "tiny-vit-a")


@pytest.fixture(scope="module")
def trained(cache_a, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "sae.safetensors"
    result = runner.invoke(app, ["train-sae", str(cache_a), "--out", str(out), "--expansion", "2",
                                 "--k", "8", "--steps", "60", "--batch-size", "16", "--json"])
    return out, result


def test_train_sae_prints_metrics_and_writes_a_file_that_reloads(cache_a, trained):
    out, result = trained
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["d"], doc["n_latents"], doc["k"], doc["steps"]) == (64, 128, 8, 60)
    metrics = doc["metrics"]
    assert 0 <= metrics["fvu"] < 1 and metrics["l0"] <= 8 and metrics["n_rows"] == 48
    assert 0 < metrics["embed_cosine"] <= 1  # the default hook point: the check runs
    cache = open_cache(cache_a)
    sae = load_sae(out, expect_backbone_id=cache.provenance["backbone"]["id"],
                   expect_hook=cache.provenance["hook"], expect_d=cache.d)
    assert sae.meta["metrics"] == metrics
    assert sae.meta["data"]["cache"] == str(cache_a)
    acts = cache.load_acts()
    with torch.no_grad():
        a, b = sae.encode(acts), load_sae(out).encode(acts)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_train_sae_human_output(cache_a, tmp_path):
    out = tmp_path / "sae.safetensors"
    result = runner.invoke(app, ["train-sae", str(cache_a), "-o", str(out), "--n-latents", "32",
                                 "--k", "4", "--steps", "5", "--batch-size", "16", "-q",
                                 "--no-embed-check"])
    assert result.exit_code == 0, result.output
    for word in ("FVU", "cosine", "L0", "dead fraction", "embed cosine   n/a", str(out)):
        assert word in result.stdout


def test_sae_info_describes_the_file_and_measures_it_on_a_cache(cache_a, trained):
    out, _ = trained
    result = runner.invoke(app, ["sae-info", str(out)])
    assert result.exit_code == 0, result.output
    for word in ("format clipaudit", "TopK SAE, k=8", "d=64", "128 latents", "tiny-vit-a", "hook pooled",
                 "stored metrics"):
        assert word in result.stdout
    result = runner.invoke(app, ["sae-info", str(out), "--cache", str(cache_a), "--json", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["source_format"] == "clipaudit" and doc["cache_metrics"]["n_rows"] == 48
    assert doc["cache_metrics"]["fvu"] == pytest.approx(doc["stored_metrics"]["fvu"], rel=1e-5)


def test_sae_info_refuses_a_cache_of_another_model(trained, tmp_path):
    out, _ = trained
    other = _cache(tmp_path, "tiny-vit-b", n=8)
    result = runner.invoke(app, ["sae-info", str(out), "--cache", str(other), "-q"])
    assert result.exit_code == 2
    assert "mismatch" in result.output and "48" in result.output and "64" in result.output


def test_bad_input_exits_with_code_2(tmp_path, cache_a):
    result = runner.invoke(app, ["train-sae", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(app, ["train-sae", str(cache_a), "--out", str(tmp_path / "s"),
                                 "--k", "0", "--steps", "1"])
    assert result.exit_code == 2 and "k must be" in result.output
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing")
    result = runner.invoke(app, ["sae-info", str(junk)])
    assert result.exit_code == 2 and "not an SAE file" in result.output
