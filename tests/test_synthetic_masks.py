"""Artifact masks: they cover exactly what each artifact changed, and data sets store them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from clipaudit.errors import InputError
from clipaudit.synthetic import (
    ARTIFACTS,
    IMAGE_SIZE,
    Scene,
    load_artifact_mask,
    load_artifact_masks,
    load_planted_dataset,
    make_planted_dataset,
    render_scene,
    render_scene_with_masks,
    sample_scene,
)

OBJECTS = ("ruler", "band_aid", "ink_marker", "hair")


def _scene(seed: int, i: int, **forced: bool) -> tuple[Scene, dict]:
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng, artifact_probs={a: 0.5 for a in ARTIFACTS}, forced_artifacts=forced)
    return scene, rng.bit_generator.state


def _rng(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_an_artifact_changes_only_the_pixels_of_its_mask(artifact):
    # The same scene and random state, painted with and without the artifact: every
    # changed pixel lies in the mask, and (nearly) every mask pixel changed.
    changed_share = []
    for i in range(60):
        scene, state = _scene(1, i, **{artifact: True})
        full = render_scene_with_masks(scene, _rng(state))
        without = render_scene_with_masks(scene, _rng(state), omit=[artifact])
        changed = (full.image != without.image).any(-1)
        mask = full.masks[artifact]
        assert mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and mask.dtype == bool
        assert not (changed & ~mask).any(), (artifact, i)
        assert artifact not in without.masks
        if mask.any():
            changed_share.append((changed & mask).sum() / mask.sum())
    assert len(changed_share) > 50
    # Drawn objects replace their pixels; the vignette's faintest rim may round to no change.
    assert min(changed_share) > (0.99 if artifact in OBJECTS else 0.9)


def test_omitting_an_artifact_draws_the_rest_as_if_it_were_absent():
    # The band-aid is painted last: a scene without it renders exactly like the same
    # scene with it omitted, which checks omit against the plain renderer.
    for i in range(30):
        scene, state = _scene(2, i, band_aid=True)
        plain = Scene(scene.skin_tone, scene.lesion_colour, scene.lesion_border,
                      scene.lesion_size, scene.artifacts - {"band_aid"})
        omitted = render_scene_with_masks(scene, _rng(state), omit=["band_aid"])
        assert np.array_equal(omitted.image, render_scene(plain, _rng(state)))


def test_masks_keep_the_images_and_partition_the_artifacts():
    for i in range(80):
        scene, state = _scene(3, i)
        rendering = render_scene_with_masks(scene, _rng(state))
        assert np.array_equal(rendering.image, render_scene(scene, _rng(state)))
        assert set(rendering.masks) == set(scene.artifacts)
        stacked = np.stack(list(rendering.masks.values()) or [np.zeros((1, 1), bool)])
        assert stacked.sum(0).max() <= 1  # a pixel shows at most one artifact


def test_localised_artifacts_sit_in_one_place_and_diffuse_ones_spread():
    for i in range(40):
        scene, state = _scene(4, i, ruler=True, vignette=True, band_aid=False)
        masks = render_scene_with_masks(scene, _rng(state)).masks
        ys, xs = np.nonzero(masks["ruler"])
        # A ruler is a strip along one edge, at most 8 px deep.
        assert min(np.ptp(ys), np.ptp(xs)) < 8 and max(np.ptp(ys), np.ptp(xs)) == IMAGE_SIZE - 1
        # The vignette darkens the four corners (where no object lies on them), never the centre.
        others = np.any([m for a, m in masks.items() if a != "vignette"], axis=0)
        corner_ys, corner_xs = [0, 0, -1, -1], [0, -1, 0, -1]
        assert (masks["vignette"] | others)[corner_ys, corner_xs].all()
        assert not masks["vignette"][IMAGE_SIZE // 2, IMAGE_SIZE // 2]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("masks"), artifact="ink_marker",
                                rate=1.0, n=40, seed=5, base_rate=0.5)


def _rows(data) -> list[dict[str, str]]:
    with open(data.manifest_fpath, newline="") as f:
        return list(csv.DictReader(f))


def test_planted_dataset_stores_the_masks_of_its_images(planted):
    truth = planted.ground_truth
    assert truth["masks"]["dir"] == "masks" and planted.masks_dpath == planted.dpath / "masks"
    assert truth["masks"]["bits"] == {a: i for i, a in enumerate(ARTIFACTS)}
    assert set(truth["masks"]["localised"]) | set(truth["masks"]["diffuse"]) == set(ARTIFACTS)
    assert {"hair", "vignette"} == set(truth["masks"]["diffuse"])
    for i, row in enumerate(_rows(planted)):
        png = Image.open(planted.dpath / "masks" / f"{i:06d}.png")
        assert png.mode == "L" and png.size == (IMAGE_SIZE, IMAGE_SIZE)
        # The stored masks are those of the image as the world renders it.
        rng = np.random.default_rng([5, i])
        scene = sample_scene(rng, diagnosis=row["label"], artifact_probs={a: 0.5 for a in ARTIFACTS},
                             forced_artifacts={"ink_marker": row["has_ink_marker"] == "True"})
        rendering = render_scene_with_masks(scene, rng)
        assert np.array_equal(np.asarray(Image.open(planted.dpath / row["path"])), rendering.image)
        masks = load_artifact_masks(planted.dpath, row["path"])
        for a in ARTIFACTS:
            want = rendering.masks.get(a, np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool))
            assert np.array_equal(masks[a], want), (i, a)
            assert np.array_equal(load_artifact_mask(planted.dpath, row["path"], a), want)
            if row[f"has_{a}"] == "False":
                assert not masks[a].any()


def test_mask_lookup_takes_absolute_paths_and_refuses_others(planted, tmp_path):
    row = _rows(planted)[3]
    absolute = (planted.dpath / row["path"]).resolve()
    assert np.array_equal(load_artifact_mask(planted.dpath, absolute, "ink_marker"),
                          load_artifact_mask(planted.dpath, row["path"], "ink_marker"))
    with pytest.raises(InputError, match="unknown artifact 'scalpel'.*Available: ruler"):
        load_artifact_mask(planted.dpath, row["path"], "scalpel")
    with pytest.raises(InputError, match="not an image of the data set"):
        load_artifact_mask(planted.dpath, tmp_path / "images" / "000003.png", "ruler")
    with pytest.raises(InputError, match="no mask for this image"):
        load_artifact_mask(planted.dpath, "images/999999.png", "ruler")


def test_a_dataset_from_before_masks_still_loads_and_says_it_has_none(tmp_path):
    # Rewrite a new data set as clipaudit wrote them at schema version 1.
    data = make_planted_dataset(tmp_path, artifact="ruler", n=6, seed=1)
    doc = json.loads(data.ground_truth_fpath.read_text())
    for key in ("world", "dataset", "masks", "columns", "label_rule"):
        del doc[key]
    doc["schema_version"] = 1
    data.ground_truth_fpath.write_text(json.dumps(doc))
    for fpath in (tmp_path / "masks").iterdir():
        fpath.unlink()
    (tmp_path / "masks").rmdir()
    (tmp_path / "columns.yaml").unlink()
    old = load_planted_dataset(tmp_path)
    assert old.masks_dpath is None and old.column_roles_fpath is None
    assert old.n == 6 and old.ground_truth["artifact"] == "ruler" and old.world == "dermatology"
    with pytest.raises(InputError, match="has no artifact masks.*schema version 1"):
        load_artifact_mask(tmp_path, "images/000000.png", "ruler")
