"""The bundled tiny CLIP: shipped files, loading, reproducible training and quality.

Quality is measured on freshly generated world images of a seed the model was not
trained on (training batches use seeds (train seed, step, i); these use (424242, i)).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from clipaudit.artifacts import read_json, read_tensor_meta, sha256_file
from clipaudit.extraction.backbone import TINY_MODEL_NAME, BackboneSpec, load_backbone
from clipaudit.resources import package_data_dpath
from clipaudit.synthetic import ARTIFACTS, CLASSES, measure_quality
from clipaudit.synthetic.quality import (
    ARTIFACT_WORDS,
    DIAGNOSIS_WORDS,
    centred_text,
    class_embeddings,
    encode_images,
    fresh_scenes,
    text_geometry,
)
from clipaudit.synthetic.train import MODEL_CFG, TrainConfig, train_model

TINY_DPATH = package_data_dpath() / "tiny_derm_clip"
FRESH_SEED = 424242


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec.bundled())


@pytest.fixture(scope="module")
def quality(tiny):
    return measure_quality(tiny, seed=FRESH_SEED, n=800)


def test_bundled_files_are_small_and_carry_provenance():
    weights = TINY_DPATH / "model.safetensors"
    assert weights.stat().st_size <= 8 * 2**20
    assert read_tensor_meta(weights)["kind"] == "tiny-clip"
    config = json.loads((TINY_DPATH / "config.json").read_text())
    assert config["model_cfg"] == MODEL_CFG
    prov = read_json(TINY_DPATH / "provenance.json", "tiny-clip")
    assert prov["weights_sha256"] == sha256_file(weights)
    assert prov["train_config"]["seed"] == 0 and prov["train_config"]["steps"] >= 1
    # CPU seconds: wall time on a shared machine says little; on 2 dedicated cores the
    # run takes at most its CPU time.
    assert prov["training_cpu_seconds"] < 15 * 60 and prov["torch_threads"] <= 2


def test_loads_through_the_backbone_loader(tiny):
    assert tiny.provenance["model"] == TINY_MODEL_NAME
    assert tiny.id.startswith(f"{TINY_MODEL_NAME}@")
    assert tiny.model.visual.transformer is not None
    # fp16 on disk, fp32 in memory; the embedding of a fixed input is finite.
    assert next(tiny.model.parameters()).dtype == torch.float32
    assert torch.isfinite(tiny.encode_text(["a ruler"])).all()


def test_training_is_reproducible_from_the_seed():
    cfg = TrainConfig(steps=2, batch_size=8, warmup_steps=1)
    a, b = train_model(cfg).state_dict(), train_model(cfg).state_dict()
    c = train_model(TrainConfig(steps=2, batch_size=8, warmup_steps=1, seed=1)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_zero_shot_skin_tone_and_lesion_colour(quality):
    assert quality.skin_tone >= 0.9, quality
    assert quality.lesion_colour >= 0.9, quality


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_zero_shot_artifact_presence(quality, artifact):
    assert quality.artifacts[artifact] >= 0.9, quality


def test_zero_shot_diagnosis(quality):
    assert quality.diagnosis >= 0.8, quality


def test_diagnosis_with_the_shipped_prompt_set(tiny):
    # The prompt set the demo audits: its wording is not the training captions'.
    doc = yaml.safe_load((package_data_dpath() / "prompts" / "dermatology.yaml").read_text())
    prompts = [[t.format(name) for t in doc["templates"] for name in doc["classes"][c]["names"]]
               for c in CLASSES]
    scenes, images = fresh_scenes(FRESH_SEED + 1, 400)
    pred = (encode_images(tiny, images) @ class_embeddings(tiny, prompts).T).argmax(1)
    truth = torch.tensor([CLASSES.index(s.diagnosis) for s in scenes])
    assert float((pred == truth).float().mean()) >= 0.8


def test_text_tower_keeps_artifact_words_apart_from_diagnosis_words(tiny, quality):
    # Measured, like the audit's alignment, relative to the empty prompt. Criteria:
    # synonyms of one diagnosis nearly coincide (>= 0.8), the two diagnoses point
    # apart (< 0), no artifact word comes near a diagnosis word (<= 0.35), and each
    # artifact's own words are closer to each other than to any diagnosis word.
    diag_words = [w for ws in DIAGNOSIS_WORDS.values() for w in ws]
    diag = centred_text(tiny, diag_words)
    for words in DIAGNOSIS_WORDS.values():
        assert float((centred_text(tiny, words) @ centred_text(tiny, words).T).min()) >= 0.8
    benign_vs_malignant = centred_text(tiny, ["benign nevus"]) @ centred_text(
        tiny, ["malignant melanoma"]).T
    assert float(benign_vs_malignant) < 0
    for artifact, words in ARTIFACT_WORDS.items():
        own = centred_text(tiny, words)
        to_diagnosis = float((own @ diag.T).max())
        assert to_diagnosis <= 0.35, (artifact, to_diagnosis)
        assert float(own[0] @ own[1]) > to_diagnosis, artifact
    within, across = text_geometry(tiny)
    assert quality.text_separation == pytest.approx(within - across, abs=1e-5)
    assert quality.text_separation >= 0.4
