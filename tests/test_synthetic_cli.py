"""clipaudit synthetic make-dataset / train-clip: exit codes, files written, messages."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import clipaudit.cli.cmd_synthetic
import clipaudit.resources
import clipaudit.synthetic
from clipaudit.artifacts import read_json
from clipaudit.cli import app
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.synthetic.birds import ARTIFACTS as BIRD_ARTIFACTS


def test_make_dataset_writes_a_planted_dataset(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path / "d"),
                                   "--artifact", "ink_marker", "--class", "benign",
                                   "--rate", "1.0", "-n", "20", "--seed", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    truth = read_json(tmp_path / "d" / "ground_truth.json", "synthetic-dataset")
    assert doc["ground_truth"]["artifact"] == truth["artifact"] == "ink_marker"
    assert truth["target_class"] == "benign" and truth["rate"] == 1.0
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 20


def test_make_dataset_none_is_a_clean_control(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path),
                                   "--artifact", "none", "-n", "10"])
    assert res.exit_code == 0, res.output
    assert "clean control" in res.stdout
    assert read_json(tmp_path / "ground_truth.json", "synthetic-dataset")["artifact"] is None


@pytest.mark.parametrize("args, message", [
    (["--artifact", "scalpel"], "unknown artifact 'scalpel'"),
    (["--rate", "2"], "rate must be between 0 and 1"),
    (["--class", "cancer"], "unknown class 'cancer'"),
])
def test_make_dataset_bad_input_exits_2_with_one_line(tmp_path, args, message):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path), *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_make_dataset_takes_a_world_and_writes_masks_and_roles(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path),
                                   "--world", "dermatology", "-n", "6", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "6 dermatology images" in res.stdout and "ruler -> malignant" in res.stdout
    truth = read_json(tmp_path / "ground_truth.json", "synthetic-dataset")
    assert truth["world"] == "dermatology" and truth["masks"]["dir"] == "masks"
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6
    assert (tmp_path / "columns.yaml").is_file()


def test_make_dataset_unknown_world_exits_2_with_the_available_ones(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path),
                                   "--world", "mars"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "unknown world 'mars'. Available: birds, dermatology" in res.output
    assert not (tmp_path / "manifest.csv").exists()


def test_make_dataset_of_the_birds_world_plants_its_default_artifact(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path),
                                   "--world", "birds", "-n", "8", "--rate", "1.0"])
    assert res.exit_code == 0, res.output
    assert "8 birds images" in res.stdout and "water -> waterbird at rate 1.0" in res.stdout
    truth = read_json(tmp_path / "ground_truth.json", "synthetic-dataset")
    assert truth["world"] == "birds" and truth["measured"]["water"]["p_target_given_artifact"] == 1
    res = CliRunner().invoke(app, ["synthetic", "make-dataset", "--out", str(tmp_path / "x"),
                                   "--world", "birds", "--artifact", "ruler"])
    assert res.exit_code == 2 and "unknown artifact 'ruler' in the birds world" in res.output


def test_make_counterfactual_of_the_birds_world(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-counterfactual", "--out", str(tmp_path),
                                   "--world", "birds", "--artifact", "watermark", "--class",
                                   "landbird", "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    truth = json.loads(res.stdout)["ground_truth"]
    assert (truth["world"], truth["artifact"], truth["target_class"], truth["other_class"]) == \
        ("birds", "watermark", "landbird", "waterbird")
    assert len(list((tmp_path / "masks").glob("*.png"))) == 8


def test_make_counterfactual_writes_pairs(tmp_path):
    res = CliRunner().invoke(app, ["synthetic", "make-counterfactual", "--out", str(tmp_path),
                                   "--artifact", "hair", "--class", "benign", "-n", "4",
                                   "--json"])
    assert res.exit_code == 0, res.output
    truth = json.loads(res.stdout)["ground_truth"]
    assert (truth["dataset"], truth["artifact"], truth["target_class"], truth["n_pairs"]) == \
        ("counterfactual", "hair", "benign", 4)
    assert len(list((tmp_path / "images").glob("*-clean.png"))) == 4
    assert len(list((tmp_path / "images").glob("*-artifact.png"))) == 4
    res = CliRunner().invoke(app, ["synthetic", "make-counterfactual", "--out", str(tmp_path),
                                   "--artifact", "hair"])
    assert res.exit_code == 2 and "a data set already exists here" in res.output


@pytest.fixture
def quick_training(monkeypatch):
    # The CLI's own defaults train for minutes; these keep its code path, tiny.
    quick = dataclasses.replace(clipaudit.synthetic.TrainConfig(), steps=2, batch_size=8,
                                warmup_steps=1, eval_images=16)
    # Patched where the command looks it up (patching clipaudit.synthetic alone left the
    # command training for the full run of the world's recipe).
    monkeypatch.setattr(clipaudit.cli.cmd_synthetic, "default_train_config",
                        lambda world: quick)


@pytest.mark.slow
def test_train_clip_writes_a_loadable_model(tmp_path, quick_training):
    threads_before = torch.get_num_threads()
    res = CliRunner().invoke(app, ["synthetic", "train-clip", "--out", str(tmp_path),
                                   "--seed", "5", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    prov = json.loads(res.stdout)
    assert prov["train_config"]["seed"] == 5 and prov["torch_threads"] == 1
    assert set(prov["quality"]["artifacts"]) == set(clipaudit.synthetic.ARTIFACTS)
    backbone = load_backbone(BackboneSpec(config=tmp_path / "config.json",
                                          checkpoint=tmp_path / "model.safetensors"))
    assert backbone.provenance["weights"] == f"sha256:{prov['weights_sha256']}"
    assert torch.get_num_threads() == threads_before  # the command restores the setting


@pytest.mark.parametrize("world, folder", [("dermatology", "tiny_derm_clip"),
                                           ("birds", "tiny_birds_clip")])
def test_train_clip_install_writes_into_the_package_data(tmp_path, quick_training, monkeypatch,
                                                         world, folder):
    monkeypatch.setattr(clipaudit.resources, "package_data_dpath", lambda: tmp_path)
    res = CliRunner().invoke(app, ["synthetic", "train-clip", "--install", "--world", world,
                                   "--steps", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.iterdir()] == [folder]  # the other world's model untouched
    prov = read_json(tmp_path / folder / "provenance.json", "tiny-clip")
    assert prov["train_config"]["steps"] == 1 and prov["world"] == world
    assert "zero-shot accuracy" in res.stdout
    assert ("bird kind" in res.stdout) == (world == "birds")


@pytest.mark.slow
def test_train_clip_of_the_birds_world_writes_its_own_model(tmp_path, quick_training):
    res = CliRunner().invoke(app, ["synthetic", "train-clip", "--out", str(tmp_path),
                                   "--world", "birds", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    prov = json.loads(res.stdout)
    assert prov["model"] == "tiny-birds-clip" and prov["world"] == "birds"
    assert set(prov["quality"]["artifacts"]) == set(BIRD_ARTIFACTS)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 72
    backbone = load_backbone(BackboneSpec(config=tmp_path / "config.json",
                                          checkpoint=tmp_path / "model.safetensors"))
    assert backbone.embed_dim == config["model_cfg"]["embed_dim"]


@pytest.mark.parametrize("args", [[], ["--out", "x", "--install"]])
def test_train_clip_needs_exactly_one_destination(args):
    res = CliRunner().invoke(app, ["synthetic", "train-clip", *args])
    assert res.exit_code == 2
    assert "exactly one of --out FOLDER or --install" in res.output
