"""A model is always named explicitly; random weights only when asked for; nothing
loads what a step does not need, and a missing optional package is named in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import (
    BackboneSpec,
    MissingExtraError,
    load_backbone,
    spec_from_provenance,
)
from clipaudit.extraction.cache import ExtractConfig, extract

from conftest import CONFIGS_DPATH

runner = CliRunner()
CONFIG = str(CONFIGS_DPATH / "tiny-vit-a.json")


@pytest.fixture
def images(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(tmp_path / "imgs" / label / f"{i}.png")
    return tmp_path / "imgs"


def _extract(images, out, *args):
    return runner.invoke(app, ["extract", str(images), "--out", str(out), "--workers", "0", "-q", *args])


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_extract_without_a_model_lists_the_ways_to_name_one(images, tmp_path):
    line = _one_line_error(_extract(images, tmp_path / "c"))
    for way in ("--model NAME --pretrained TAG", "--checkpoint FILE --model-config CONFIG.json",
                "--model tiny-derm-clip", "--pretrained random"):
        assert way in line, line
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "ViT-B-32"], "--model ViT-B-32 without --pretrained"),
    (["--model-config", CONFIG], "a model config without weights"),
    (["--pretrained", "random"], "--pretrained random needs --model NAME"),
    (["--model", "tiny-derm-clip", "--pretrained", "random"], "brings its own weights"),
    (["--checkpoint", CONFIG], "needs its open_clip model config"),
])
def test_incomplete_model_names_are_refused_in_one_line(images, tmp_path, args, message):
    line = _one_line_error(_extract(images, tmp_path / "c", *args))
    assert message in line, line


def test_random_weights_only_when_asked_and_provenance_says_so(images, tmp_path):
    res = _extract(images, tmp_path / "c", "--model-config", CONFIG, "--pretrained", "random")
    assert res.exit_code == 0, res.output
    assert "RANDOM weights (--pretrained random)" in res.stdout
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    backbone = manifest["provenance"]["backbone"]
    assert backbone["pretrained"] == "random" and backbone["weights"] == "random-seed0"
    assert spec_from_provenance(backbone).random


def test_the_bundled_model_says_so(images, tmp_path):
    res = _extract(images, tmp_path / "c", "--model", "tiny-derm-clip")
    assert res.exit_code == 0, res.output
    assert "the bundled demo model" in res.stdout


def test_the_library_names_no_model_by_default(images, tmp_path):
    with pytest.raises(InputError, match="no model named"):
        load_backbone(BackboneSpec())
    with pytest.raises(InputError, match="no model named"):
        extract(images, tmp_path / "c", ExtractConfig(num_workers=0))
    assert BackboneSpec.bundled().model == "tiny-derm-clip"
    from clipaudit.demo import DemoConfig

    assert DemoConfig().backbone == BackboneSpec.bundled()


def _siglip_like(tmp_path):
    """tests/configs/tiny-siglip.json with SigLIP's Hugging Face tokenizer."""
    cfg = json.loads((CONFIGS_DPATH / "tiny-siglip.json").read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    fpath = tmp_path / "siglip-hf-tokenizer.json"
    fpath.write_text(json.dumps(cfg))
    return fpath


def test_extraction_builds_no_tokenizer_and_text_names_the_missing_package(images, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    config = _siglip_like(tmp_path)
    res = _extract(images, tmp_path / "c", "--model-config", str(config), "--pretrained", "random")
    assert res.exit_code == 0, res.output
    backbone = load_backbone(BackboneSpec(config=config, pretrained="random"))
    assert backbone.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    with pytest.raises(MissingExtraError, match=r"transformers: pip install 'clipaudit\[hf\]'"):
        backbone.encode_text(["a photo"])


def test_a_missing_timm_is_named_in_one_line(images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    line = _one_line_error(_extract(images, tmp_path / "c", "--model-config",
                                    str(CONFIGS_DPATH / "tiny-convnext.json"),
                                    "--pretrained", "random"))
    assert "needs the optional package timm: pip install 'clipaudit[timm]'" in line


def test_an_hf_text_tower_is_not_built_to_extract_images(images, tmp_path, monkeypatch):
    """A Hugging Face text tower (mt5, roberta, nllb, ...) needs transformers and the hub;
    extraction reads images only, so it needs neither."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    cfg = json.loads((CONFIGS_DPATH / "tiny-vit-a.json").read_text())
    cfg["text_cfg"] = {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base",
                       "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler"}
    fpath = tmp_path / "hf-text.json"
    fpath.write_text(json.dumps(cfg))
    res = _extract(images, tmp_path / "c", "--model-config", str(fpath), "--pretrained", "random")
    assert res.exit_code == 0, res.output
    with pytest.raises(MissingExtraError, match="text tower xlm-roberta-base needs the optional"):
        load_backbone(BackboneSpec(config=fpath, pretrained="random"))
