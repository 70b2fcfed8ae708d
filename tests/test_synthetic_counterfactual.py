"""Counterfactual pairs differ only in the planted artifact; causal_reliance measures the drop."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from clipaudit.errors import InputError
from clipaudit.extraction.columns import find_column_roles
from clipaudit.synthetic import (
    ARTIFACTS,
    causal_reliance,
    diagnosis_of,
    load_artifact_masks,
    load_planted_dataset,
    make_counterfactual_dataset,
    make_planted_dataset,
)


def _rows(data) -> list[dict[str, str]]:
    with open(data.manifest_fpath, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_counterfactual_dataset(tmp_path_factory.mktemp("cf"), artifact="band_aid",
                                       target_class="benign", n=30, seed=4, base_rate=0.4)


def test_pairs_differ_only_in_the_planted_artifact(pairs):
    rows = _rows(pairs)
    assert len(rows) == 60 == pairs.n and pairs.ground_truth["n_pairs"] == 30
    assert [r["variant"] for r in rows] == ["clean", "artifact"] * 30
    others_seen = set()
    for clean, art in zip(rows[::2], rows[1::2]):
        assert clean["pair_id"] == art["pair_id"]
        assert (clean["has_band_aid"], art["has_band_aid"]) == ("False", "True")
        same = [c for c in clean if c not in ("path", "caption", "variant", "has_band_aid")]
        assert all(clean[c] == art[c] for c in same)  # label, lesion, skin, other artifacts
        assert clean["label"] == diagnosis_of(clean["lesion_colour"], clean["lesion_border"])
        others_seen |= {a for a in ARTIFACTS if art[f"has_{a}"] == "True"}
        a_img = np.asarray(Image.open(pairs.dpath / clean["path"])).astype(int)
        b_img = np.asarray(Image.open(pairs.dpath / art["path"])).astype(int)
        changed = (a_img != b_img).any(-1)
        clean_masks = load_artifact_masks(pairs.dpath, clean["path"])
        art_masks = load_artifact_masks(pairs.dpath, art["path"])
        assert changed.any() and not (changed & ~art_masks["band_aid"]).any()
        assert not clean_masks["band_aid"].any()
        for a in ARTIFACTS:  # other artifacts: same place, minus what the band-aid covers
            if a != "band_aid":
                assert np.array_equal(art_masks[a], clean_masks[a] & ~art_masks["band_aid"])
    assert others_seen >= {"ruler", "hair"}


def test_pairs_are_balanced_over_the_classes_and_declared(pairs):
    rows = _rows(pairs)
    labels = [r["label"] for r in rows if r["variant"] == "clean"]
    assert labels.count("benign") == 15 == labels.count("malignant")
    truth = pairs.ground_truth
    assert (truth["dataset"], truth["artifact"], truth["target_class"], truth["other_class"]) \
        == ("counterfactual", "band_aid", "benign", "malignant")
    roles = find_column_roles(pairs.manifest_fpath, rows[0].keys())
    assert {"variant", "pair_id", "caption"} <= set(roles.ignore)
    assert "has_band_aid" in roles.artifact
    again = load_planted_dataset(pairs.dpath)
    assert again.ground_truth == truth and again.masks_dpath is not None


def test_same_seed_same_pairs(tmp_path, pairs):
    again = make_counterfactual_dataset(tmp_path, artifact="band_aid", target_class="benign",
                                        n=30, seed=4, base_rate=0.4)
    assert again.manifest_fpath.read_bytes() == pairs.manifest_fpath.read_bytes()
    row = _rows(pairs)[7]
    assert (again.dpath / row["path"]).read_bytes() == (pairs.dpath / row["path"]).read_bytes()


def test_causal_reliance_counts_what_the_artifact_flips(pairs):
    rows = _rows(pairs)
    other = [i for i, r in enumerate(rows) if r["variant"] == "artifact" and r["label"] == "malignant"]
    fooled = set(other[::3])  # a classifier fooled by the band-aid on a third of those images
    predictions = ["benign" if i in fooled else r["label"] for i, r in enumerate(rows)]
    result = causal_reliance(predictions, pairs)
    assert result.n_pairs == 15 and result.accuracy_clean == 1.0
    assert result.accuracy_artifact == pytest.approx(1 - len(fooled) / 15)
    assert result.drop == pytest.approx(len(fooled) / 15) and result.relied_on
    assert result.accuracy_clean_target == result.accuracy_artifact_target == 1.0
    # Keyed by path (as in the manifest, or absolute), the same figures.
    by_path = {str((pairs.dpath / r["path"]).resolve()): p for r, p in zip(rows, predictions)}
    assert causal_reliance(by_path, pairs.dpath) == result
    truthful = causal_reliance({r["path"]: r["label"] for r in rows}, pairs)
    assert truthful.drop == 0 and not truthful.relied_on


@pytest.mark.parametrize("predictions, message", [
    (["benign"] * 3, "3 predictions for the 60 images"),
    ({"images/000000-clean.png": "benign"}, "no prediction for 59 images"),
    (["melanoma"] * 60, "'melanoma', which are not classes"),
])
def test_causal_reliance_refuses_predictions_that_do_not_fit(pairs, predictions, message):
    with pytest.raises(InputError, match=message):
        causal_reliance(predictions, pairs)


def test_causal_reliance_needs_a_counterfactual_set(tmp_path):
    data = make_planted_dataset(tmp_path, artifact="ruler", n=4)
    with pytest.raises(InputError, match="not a counterfactual data set"):
        causal_reliance(["benign"] * 4, data)


def test_counterfactual_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="unknown artifact 'scalpel'"):
        make_counterfactual_dataset(tmp_path, artifact="scalpel")
    with pytest.raises(InputError, match="unknown class 'cancer'"):
        make_counterfactual_dataset(tmp_path, artifact="ruler", target_class="cancer")


@pytest.mark.slow
def test_a_probe_trained_on_a_planted_shortcut_relies_on_it_causally(tmp_path):
    # A real learned classifier (logistic regression on 16 px thumbnails): trained where
    # the ruler marks every malignant image, it fails when the ruler sits on benign
    # lesions. Trained on a clean control it is far less moved (a pixel probe is not
    # blind to a bright strip, so its drop need not be zero: that is what "causal" means).
    from sklearn.linear_model import LogisticRegression

    def features(data):
        rows = _rows(data)
        x = np.stack([np.asarray(Image.open(data.dpath / r["path"]).resize((16, 16), Image.BILINEAR),
                                 np.float32).ravel() / 255 for r in rows])
        return x, [r["label"] for r in rows]

    pairs = make_counterfactual_dataset(tmp_path / "cf", artifact="ruler", n=80, seed=3)
    x_cf, _ = features(pairs)
    drops = {}
    for name, artifact, rate in (("planted", "ruler", 1.0), ("control", None, 0.5)):
        data = make_planted_dataset(tmp_path / name, artifact=artifact, rate=rate, n=240, seed=4)
        probe = LogisticRegression(max_iter=2000).fit(*features(data))
        drops[name] = causal_reliance(list(probe.predict(x_cf)), pairs)
    assert drops["planted"].relied_on and drops["planted"].drop > 0.3
    assert drops["planted"].accuracy_clean > 0.85  # it does classify the clean lesions
    assert drops["planted"].drop - drops["control"].drop > 0.2
