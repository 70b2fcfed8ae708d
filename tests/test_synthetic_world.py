"""The synthetic world: determinism, metadata consistency, planted rates, ground truth."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from clipaudit.errors import ArtifactError, InputError
from clipaudit.synthetic import (
    ARTIFACTS,
    CLASSES,
    IMAGE_SIZE,
    LESION_COLOURS,
    MANIFEST_COLUMNS,
    PHRASES,
    SKIN_TONES,
    Scene,
    caption_scene,
    diagnosis_of,
    load_planted_dataset,
    make_planted_dataset,
    render_scene,
    sample_scene,
)


def _scene_and_image(seed: int, i: int, **kw) -> tuple[Scene, np.ndarray, str]:
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng, **kw)
    return scene, render_scene(scene, rng), caption_scene(scene, rng)


def test_rendering_is_a_pure_function_of_the_seed():
    a = [_scene_and_image(3, i) for i in range(20)]
    b = [_scene_and_image(3, i) for i in range(20)]
    c = [_scene_and_image(4, i) for i in range(20)]
    for (sa, ia, ca), (sb, ib, cb) in zip(a, b):
        assert sa == sb and ca == cb
        assert np.array_equal(ia, ib)
    assert any(not np.array_equal(ia, ic) for (_, ia, _), (_, ic, _) in zip(a, c))
    assert a[0][1].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a[0][1].dtype == np.uint8


def test_diagnosis_depends_on_the_lesion_only():
    for colour in LESION_COLOURS:
        for border in ("regular", "irregular"):
            want = "malignant" if border == "irregular" and colour in ("brown", "black") \
                else "benign"
            assert diagnosis_of(colour, border) == want
            for tone in SKIN_TONES:
                for arts in (frozenset(), frozenset(ARTIFACTS)):
                    assert Scene(tone, colour, border, "small", arts).diagnosis == want


@pytest.mark.parametrize("diagnosis", CLASSES)
def test_sampling_a_class_gives_that_class(diagnosis):
    for i in range(50):
        scene = sample_scene(np.random.default_rng(i), diagnosis=diagnosis)
        assert scene.diagnosis == diagnosis


def test_forced_artifacts_override_the_draw():
    for i in range(30):
        rng = np.random.default_rng(i)
        scene = sample_scene(rng, artifact_probs={a: 1.0 for a in ARTIFACTS},
                             forced_artifacts={"ruler": False, "hair": True})
        assert "ruler" not in scene.artifacts and "hair" in scene.artifacts
        assert {"band_aid", "ink_marker", "vignette"} <= scene.artifacts


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_every_artifact_changes_the_image(artifact):
    # Same scene and layout seed, with and without the artifact: pixels must differ.
    base = Scene("olive", "brown", "irregular", "medium")
    with_it = Scene("olive", "brown", "irregular", "medium", frozenset({artifact}))
    changed = []
    for seed in range(5):
        a = render_scene(base, np.random.default_rng(seed)).astype(int)
        b = render_scene(with_it, np.random.default_rng(seed)).astype(int)
        changed.append((np.abs(a - b).sum(-1) > 30).mean())
    assert min(changed) > 0.01


def test_caption_names_what_the_scene_shows():
    # Over many captions of one scene each present attribute is named, and absent
    # artifacts are only ever named as absent.
    scene = Scene("dark", "black", "irregular", "large", frozenset({"ruler", "hair"}))
    captions = [caption_scene(scene, np.random.default_rng(i)) for i in range(200)]
    text = " | ".join(captions)
    for key in ("dark", "black", "irregular", "large", "malignant", "ruler", "hair"):
        assert any(p in text for p in PHRASES[key]), key
    for key in ("benign", "band_aid"):
        named = [c for c in captions for p in PHRASES[key] if p in c]
        assert not named or all("no band-aid" in c for c in named), key


def _read_manifest(data) -> list[dict[str, str]]:
    with open(data.manifest_fpath, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    return make_planted_dataset(out, artifact="ruler", target_class="malignant", rate=0.9,
                                n=400, seed=7)


def test_planted_dataset_layout_and_metadata(planted):
    rows = _read_manifest(planted)
    assert tuple(rows[0].keys()) == MANIFEST_COLUMNS
    assert len(rows) == 400
    for row in rows:
        img = Image.open(planted.dpath / row["path"])
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"
        assert row["label"] == diagnosis_of(row["lesion_colour"], row["lesion_border"])
        assert row["skin_tone"] in SKIN_TONES
    # A rendered file is exactly what the world draws for that (seed, index).
    first = np.asarray(Image.open(planted.dpath / rows[0]["path"]))
    rng = np.random.default_rng([7, 0])
    scene = sample_scene(rng, diagnosis=rows[0]["label"], artifact_probs={a: 0.2 for a in ARTIFACTS},
                         forced_artifacts={"ruler": rows[0]["has_ruler"] == "True"})
    assert np.array_equal(first, render_scene(scene, rng))


def test_planted_rate_and_balance_are_honoured(planted):
    rows = _read_manifest(planted)
    with_ruler = [r for r in rows if r["has_ruler"] == "True"]
    without = [r for r in rows if r["has_ruler"] == "False"]
    assert len(with_ruler) == 200
    assert sum(r["label"] == "malignant" for r in with_ruler) == 180
    assert sum(r["label"] == "malignant" for r in without) == 20
    assert sum(r["label"] == "malignant" for r in rows) == 200
    # The other artifacts are independent of the class at the base rate.
    for a in ("band_aid", "ink_marker", "hair", "vignette"):
        has = [r for r in rows if r[f"has_{a}"] == "True"]
        assert 0.1 < len(has) / len(rows) < 0.3
        assert 0.3 < sum(r["label"] == "malignant" for r in has) / len(has) < 0.7


def test_ground_truth_is_recorded_and_reloads(planted):
    truth = json.loads(planted.ground_truth_fpath.read_text())
    assert truth["kind"] == "synthetic-dataset"
    assert (truth["artifact"], truth["target_class"], truth["rate"]) == ("ruler", "malignant", 0.9)
    assert truth["shortcut"] is True
    assert truth["measured"]["ruler"]["p_target_given_artifact"] == 0.9
    assert truth["measured"]["ruler"]["p_target_given_no_artifact"] == 0.1
    again = load_planted_dataset(planted.dpath)
    assert again.ground_truth == planted.ground_truth and again.n == 400


def test_same_seed_same_dataset(tmp_path):
    a = make_planted_dataset(tmp_path / "a", artifact="band_aid", rate=1.0, n=40, seed=1)
    b = make_planted_dataset(tmp_path / "b", artifact="band_aid", rate=1.0, n=40, seed=1)
    assert a.manifest_fpath.read_bytes() == b.manifest_fpath.read_bytes()
    rows = _read_manifest(a)
    assert all((r["has_band_aid"] == "True") == (r["label"] == "malignant") for r in rows)
    assert (a.dpath / rows[5]["path"]).read_bytes() == (b.dpath / rows[5]["path"]).read_bytes()


def test_clean_control_has_artifacts_independent_of_class(tmp_path):
    data = make_planted_dataset(tmp_path, artifact=None, n=60, seed=2)
    rows = _read_manifest(data)
    assert data.ground_truth["artifact"] is None and data.ground_truth["shortcut"] is False
    assert sum(r["label"] == "benign" for r in rows) == 30
    assert any(r[f"has_{a}"] == "True" for r in rows for a in ARTIFACTS)


@pytest.mark.parametrize("kwargs, message", [
    ({"artifact": "scalpel"}, "unknown artifact 'scalpel'"),
    ({"artifact": "ruler", "target_class": "cancer"}, "unknown class 'cancer'"),
    ({"artifact": "ruler", "rate": 1.5}, "rate must be between 0 and 1"),
    ({"artifact": "ruler", "n": 1}, "at least 2 images"),
])
def test_bad_arguments_are_input_errors(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        make_planted_dataset(tmp_path, **kwargs)


def test_existing_dataset_is_not_overwritten_silently(tmp_path):
    make_planted_dataset(tmp_path, artifact="hair", n=4)
    with pytest.raises(InputError, match="already exists"):
        make_planted_dataset(tmp_path, artifact="hair", n=4)
    again = make_planted_dataset(tmp_path, artifact="vignette", n=6, overwrite=True)
    assert len(list((tmp_path / "images").iterdir())) == 6 == again.n


def test_loading_a_folder_without_ground_truth_fails(tmp_path):
    with pytest.raises(ArtifactError, match="ground_truth.json"):
        load_planted_dataset(tmp_path)
