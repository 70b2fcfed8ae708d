"""The birds world: determinism, the label rule, masks, planted and counterfactual data sets."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from clipaudit.describe.concepts import load_vocabulary
from clipaudit.extraction.columns import find_column_roles
from clipaudit.synthetic import (
    causal_reliance,
    get_world,
    list_worlds,
    load_artifact_mask,
    load_artifact_masks,
    make_counterfactual_dataset,
    make_planted_dataset,
)
from clipaudit.synthetic.birds import (
    ALL_SPECIES,
    ARTIFACTS,
    CLASSES,
    FILTER_ARTIFACTS,
    IMAGE_SIZE,
    SPECIES,
    TIMES_OF_DAY,
    BirdScene,
    kind_of,
    render_scene,
    render_scene_with_masks,
    sample_scene,
)
from clipaudit.synthetic.birds_captions import PHRASES, caption_scene

OBJECTS = tuple(a for a in ARTIFACTS if a not in FILTER_ARTIFACTS)


def _scene(seed: int, i: int, **forced: bool) -> tuple[BirdScene, dict]:
    rng = np.random.default_rng([seed, i])
    scene = sample_scene(rng, artifact_probs={a: 0.5 for a in ARTIFACTS}, forced_artifacts=forced)
    return scene, rng.bit_generator.state


def _rng(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def _rows(data) -> list[dict[str, str]]:
    with open(data.manifest_fpath, newline="") as f:
        return list(csv.DictReader(f))


def test_the_world_is_registered_with_its_own_geometry_model_prompts_and_vocabulary():
    birds = get_world("birds")
    assert list_worlds() == ["birds", "dermatology"]
    assert birds.image_size == IMAGE_SIZE == 72 != get_world("dermatology").image_size
    assert birds.classes == CLASSES and birds.artifacts == ARTIFACTS
    assert birds.clip_model == "tiny-birds-clip" and birds.protected_columns == ("time_of_day",)
    assert set(birds.localised_artifacts) | set(birds.diffuse_artifacts) == set(ARTIFACTS)
    assert not set(birds.localised_artifacts) & set(birds.diffuse_artifacts)
    assert (birds.default_artifact, birds.default_target_class) == ("water", "waterbird")
    vocabulary = load_vocabulary(birds.vocabularies[0])
    for words in (("water", "boat", "branch", "film grain", "photo frame", "watermark"), CLASSES):
        assert set(words) <= set(vocabulary.concepts)
    assert birds.prompts_fpath is not None and birds.prompts_fpath.is_file()


def test_rendering_is_a_pure_function_of_the_seed():
    def draw(seed: int, i: int):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        return scene, render_scene(scene, rng), caption_scene(scene, rng)

    a, b, c = ([draw(s, i) for i in range(20)] for s in (3, 3, 4))
    for (sa, ia, ca), (sb, ib, cb) in zip(a, b):
        assert sa == sb and ca == cb and np.array_equal(ia, ib)
    assert any(not np.array_equal(ia, ic) for (_, ia, _), (_, ic, _) in zip(a, c))
    assert a[0][1].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a[0][1].dtype == np.uint8


def test_the_label_is_the_species_kind_and_nothing_else():
    assert {kind_of(s) for s in SPECIES["landbird"]} == {"landbird"}
    assert {kind_of(s) for s in SPECIES["waterbird"]} == {"waterbird"}
    for species in ALL_SPECIES:
        for time in TIMES_OF_DAY:
            for arts in (frozenset(), frozenset(ARTIFACTS)):
                scene = BirdScene(species, time, "left", arts)
                assert scene.kind == scene.metadata()["label"] == kind_of(species)
    # Plumage alone cannot tell the kind: brown and black birds exist in both.
    plumage = {kind: {BirdScene(s, "day", "left").plumage for s in SPECIES[kind]} for kind in CLASSES}
    assert {"brown", "black"} <= plumage["landbird"] & plumage["waterbird"]


@pytest.mark.parametrize("kind", CLASSES)
def test_sampling_a_class_gives_that_class_and_every_species(kind):
    scenes = [sample_scene(np.random.default_rng(i), label=kind) for i in range(80)]
    assert {s.kind for s in scenes} == {kind}
    assert {s.species for s in scenes} == set(SPECIES[kind])
    assert {s.time_of_day for s in scenes} == set(TIMES_OF_DAY)


def test_forced_artifacts_override_the_draw():
    for i in range(30):
        scene = sample_scene(np.random.default_rng(i), artifact_probs={a: 1.0 for a in ARTIFACTS},
                             forced_artifacts={"water": False, "grain": True})
        assert "water" not in scene.artifacts and "grain" in scene.artifacts
        assert {"boat", "branch", "frame", "watermark"} <= scene.artifacts


def _names(caption: str, key: str) -> bool:
    # Whole words: "waterbird" does not name the water.
    return any(re.search(rf"\b{re.escape(p)}\b", caption) for p in PHRASES[key])


def test_captions_name_what_the_scene_shows():
    scene = BirdScene("heron", "dusk", "left", frozenset({"water", "boat", "watermark"}))
    captions = [caption_scene(scene, np.random.default_rng(i)) for i in range(200)]
    for key in ("heron", "waterbird", "grey", "dusk", "water", "boat", "watermark"):
        assert any(_names(c, key) for c in captions), key
    for key in ("landbird", "land", "branch", "frame"):  # absent: unnamed, or named as absent
        named = [c for c in captions if _names(c, key)]
        assert not named or all(f"no {key}" in c for c in named), key
    on_land = [caption_scene(BirdScene("heron", "day", "left"), np.random.default_rng(i))
               for i in range(100)]
    assert not any(_names(c, "water") for c in on_land)
    assert sum(_names(c, "land") for c in on_land) > 50


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_an_artifact_changes_only_the_pixels_of_its_mask(artifact):
    changed_share = []
    for i in range(50):
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
    assert len(changed_share) > 40 and min(changed_share) > 0.99


def test_omitting_the_last_painted_artifact_draws_the_rest_as_if_it_were_absent():
    for i in range(30):
        scene, state = _scene(2, i, watermark=True)
        plain = BirdScene(scene.species, scene.time_of_day, scene.facing,
                          scene.artifacts - {"watermark"})
        omitted = render_scene_with_masks(scene, _rng(state), omit=["watermark"])
        assert np.array_equal(omitted.image, render_scene(plain, _rng(state)))


def test_objects_partition_their_pixels_and_grain_overlaps_as_a_filter():
    for i in range(60):
        scene, state = _scene(3, i)
        rendering = render_scene_with_masks(scene, _rng(state))
        assert np.array_equal(rendering.image, render_scene(scene, _rng(state)))
        assert set(rendering.masks) == set(scene.artifacts)
        objects = [m for a, m in rendering.masks.items() if a in OBJECTS]
        if objects:
            assert np.stack(objects).sum(0).max() <= 1  # a pixel shows at most one object
        if "grain" in rendering.masks:  # everywhere but under the frame and the watermark
            overlays = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
            for a in ("frame", "watermark"):
                overlays |= rendering.masks.get(a, overlays)
            assert not (rendering.masks["grain"] & overlays).any()
            assert rendering.masks["grain"][~overlays].mean() > 0.8


def test_localised_artifacts_sit_in_one_place_and_diffuse_ones_spread():
    for i in range(40):
        scene, state = _scene(4, i, frame=True, watermark=True, water=True, boat=True)
        masks = render_scene_with_masks(scene, _rng(state)).masks
        frame = masks["frame"]
        assert frame[0].all() and frame[-1].all() and frame[:, 0].all() and frame[:, -1].all()
        assert not frame[5:-5, 5:-5].any()  # a border at most 4 px wide
        ys, xs = np.nonzero(masks["watermark"])
        assert np.ptp(ys) <= 6 and np.ptp(xs) <= 24  # one line of text ...
        corner_y, corner_x = ys.mean() < IMAGE_SIZE / 2, xs.mean() < IMAGE_SIZE / 2
        assert abs(ys.mean() - (0 if corner_y else IMAGE_SIZE)) < 16  # ... in a corner
        assert abs(xs.mean() - (0 if corner_x else IMAGE_SIZE)) < 24
        ys, xs = np.nonzero(masks["boat"])
        assert ys.size and np.ptp(xs) <= 21 and np.ptp(ys) <= 20  # hull, mast and sail
        # Water is the ground below the horizon: bottom rows, never the top ones.
        assert not masks["water"][: int(0.3 * IMAGE_SIZE)].any()
        assert masks["water"][int(0.45 * IMAGE_SIZE):].mean() > 0.5  # less the bird and objects


# ---------------------------------------------------------------- data sets


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("birds"), artifact="water",
                                target_class="waterbird", rate=0.9, n=60, seed=7, world="birds")


def test_planted_dataset_layout_metadata_roles_and_rates(planted):
    rows = _rows(planted)
    birds = get_world("birds")
    assert tuple(rows[0]) == birds.manifest_columns and len(rows) == 60
    assert planted.world == "birds" and planted.ground_truth["label_rule"] == birds.label_rule
    for row in rows:
        assert Image.open(planted.dpath / row["path"]).size == (IMAGE_SIZE, IMAGE_SIZE)
        assert row["label"] == kind_of(row["species"]) and row["time_of_day"] in TIMES_OF_DAY
    water = [r for r in rows if r["has_water"] == "True"]
    assert len(water) == 30 and sum(r["label"] == "waterbird" for r in water) == 27
    assert sum(r["label"] == "waterbird" for r in rows) == 30
    roles = find_column_roles(planted.manifest_fpath, rows[0].keys())
    assert roles.artifact == tuple(f"has_{a}" for a in ARTIFACTS)
    assert roles.protected == ("time_of_day",) and "caption" in roles.ignore
    assert planted.ground_truth["masks"]["bits"] == {a: i for i, a in enumerate(ARTIFACTS)}
    assert set(planted.ground_truth["masks"]["diffuse"]) == {"water", "grain"}
    assert planted.ground_truth["masks"]["filters"] == ["grain"]


def test_stored_masks_are_those_the_world_renders(planted):
    for i, row in enumerate(_rows(planted)[:20]):
        rng = np.random.default_rng([7, i])
        scene = sample_scene(rng, label=row["label"], artifact_probs={a: 0.2 for a in ARTIFACTS},
                             forced_artifacts={"water": row["has_water"] == "True"})
        rendering = render_scene_with_masks(scene, rng)
        assert np.array_equal(np.asarray(Image.open(planted.dpath / row["path"])), rendering.image)
        masks = load_artifact_masks(planted.dpath, row["path"])
        for a in ARTIFACTS:
            want = rendering.masks.get(a, np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool))
            assert np.array_equal(masks[a], want), (i, a)
            assert masks[a].any() == (row[f"has_{a}"] == "True")


@pytest.mark.parametrize("artifact", ["water", "branch"])
def test_counterfactual_pairs_differ_only_in_the_artifact(tmp_path, artifact):
    pairs = make_counterfactual_dataset(tmp_path, artifact=artifact, n=12, seed=4, base_rate=0.4,
                                        world="birds")
    rows = _rows(pairs)
    assert pairs.ground_truth["target_class"] == "waterbird"
    assert pairs.ground_truth["other_class"] == "landbird"
    for clean, art in zip(rows[::2], rows[1::2]):
        assert (clean[f"has_{artifact}"], art[f"has_{artifact}"]) == ("False", "True")
        for column in ("label", "species", "time_of_day", "facing"):
            assert clean[column] == art[column]
        changed = (np.asarray(Image.open(tmp_path / clean["path"]))
                   != np.asarray(Image.open(tmp_path / art["path"]))).any(-1)
        mask = load_artifact_mask(tmp_path, art["path"], artifact)
        assert changed.any() and not (changed & ~mask).any()
        assert not load_artifact_mask(tmp_path, clean["path"], artifact).any()
    # A classifier that calls every bird on water a waterbird relies on the water only.
    predictions = ["waterbird" if r["has_water"] == "True" else r["label"] for r in rows]
    result = causal_reliance(predictions, pairs)
    if artifact == "water":
        assert result.accuracy_clean == 1.0 and result.accuracy_artifact == 0.0
    assert result.relied_on == (artifact == "water")
