import time

import pytest
import torch
from safetensors.torch import save_file

from clipaudit.errors import InputError, ModelUnavailableError
from clipaudit.extraction import weights as wt
from clipaudit.extraction.backbone import BackboneSpec, load_backbone, load_backbone_for, spec_from_provenance

from conftest import CONFIGS_DPATH, tiny_backbone


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_offline_named_model_fails_fast_with_one_clear_line(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_backbone(BackboneSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "HF_HUB_OFFLINE" in message
    assert "--checkpoint" in message and "\n" not in message


def test_unreachable_hub_fails_fast(empty_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(wt, "_HUB_HOST", ("127.0.0.1", 9))  # nothing listens there
    with pytest.raises(ModelUnavailableError, match="unreachable"):
        load_backbone(BackboneSpec(model="ViT-B-32", pretrained="openai"))


def test_hf_hub_id_offline_names_the_repo(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="org/some-clip"):
        load_backbone(BackboneSpec(model="hf-hub:org/some-clip"))


def test_unknown_model_and_tag_are_user_errors():
    with pytest.raises(InputError, match="unknown open_clip model"):
        load_backbone(BackboneSpec(model="ViT-Nope", pretrained="random"))
    with pytest.raises(InputError, match="unknown pretrained tag 'nope'"):
        load_backbone(BackboneSpec(model="ViT-B-32", pretrained="nope"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip_records_its_hash(tmp_path, suffix):
    source = tiny_backbone("tiny-vit-a", seed=7)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    ckpt = tmp_path / f"mine{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(ckpt))
    else:
        torch.save(state, ckpt)
    loaded = load_backbone(BackboneSpec(model="mine", checkpoint=ckpt,
                                        config=CONFIGS_DPATH / "tiny-vit-a.json"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), source.model.encode_image(images))
    assert loaded.provenance["weights"].startswith("sha256:")
    assert loaded.id != source.id
    again = load_backbone_for(loaded.provenance)
    assert again.id == loaded.id


def test_provenance_round_trips_to_a_spec():
    b = tiny_backbone("tiny-vit-b", seed=3)
    spec = spec_from_provenance(b.provenance)
    assert spec.seed == 3 and spec.config.name == "tiny-vit-b.json"
    assert load_backbone(spec).id == b.id


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"embed_dim": 8}', "missing vision_cfg, text_cfg"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_model_config_is_a_user_error(tmp_path, content, match):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    with pytest.raises(InputError, match=match):
        load_backbone(BackboneSpec(model="x", config=cfg, pretrained="random"))


def test_checkpoint_that_does_not_fit_the_config_is_a_user_error(tmp_path):
    save_file({"nonsense": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(InputError, match="cannot load these weights"):
        load_backbone(BackboneSpec(model="x", checkpoint=tmp_path / "w.safetensors",
                                   config=CONFIGS_DPATH / "tiny-vit-a.json"))


def test_cli_offline_model_exits_2_with_one_line(tmp_path, empty_caches, monkeypatch):
    from typer.testing import CliRunner

    from clipaudit.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "x.png")
    res = CliRunner().invoke(app, ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "c"),
                                   "--model", "ViT-B-32", "--pretrained", "openai"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "ViT-B-32" in res.output
