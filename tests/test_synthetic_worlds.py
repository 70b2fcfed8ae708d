"""The world registry: the data-set factories serve any registered world, not only dermatology."""

from __future__ import annotations

import csv
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

import clipaudit.synthetic.worlds as worlds
from clipaudit.errors import InputError
from clipaudit.extraction.columns import find_column_roles
from clipaudit.synthetic import (
    Rendering,
    World,
    causal_reliance,
    get_world,
    list_worlds,
    load_artifact_mask,
    make_counterfactual_dataset,
    make_planted_dataset,
    register_world,
)

SIZE = 24  # another geometry than the dermatology world's 64 px


@dataclass(frozen=True)
class Shape:
    kind: str  # the label: "square" or "disc"
    artifacts: frozenset[str] = field(default_factory=frozenset)

    def metadata(self) -> dict:
        return {"label": self.kind, "has_dot": "dot" in self.artifacts,
                "has_tint": "tint" in self.artifacts}


def _sample(rng, *, label=None, artifact_probs=None, forced_artifacts=None) -> Shape:
    kind = label or ("square", "disc")[int(rng.integers(2))]
    probs = {"dot": 0.2, "tint": 0.2} | dict(artifact_probs or {})
    present = {a for a, u in zip(("dot", "tint"), rng.random(2)) if u < probs[a]}
    for a, on in (forced_artifacts or {}).items():
        present = present | {a} if on else present - {a}
    return Shape(kind, frozenset(present))


def _render(scene: Shape, rng, *, omit: Collection[str] = ()) -> Rendering:
    img = np.full((SIZE, SIZE, 3), 128, np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    body = (np.abs(yy - 12) < 6) & (np.abs(xx - 12) < 6) if scene.kind == "square" \
        else (yy - 12) ** 2 + (xx - 12) ** 2 < 36
    img[body] = (200, 40, 40)
    masks = {}
    if "tint" in scene.artifacts:
        masks["tint"] = yy < 4
        if "tint" not in omit:
            img[masks["tint"]] = (0, 0, 200)
    if "dot" in scene.artifacts:
        y, x = rng.integers(0, SIZE - 3, 2)  # drawn whether painted or not: same layout
        masks["dot"] = (yy >= y) & (yy < y + 3) & (xx >= x) & (xx < x + 3)
        if "dot" not in omit:
            img[masks["dot"]] = (255, 255, 0)
    if "tint" in masks and "dot" in masks and "dot" not in omit:
        masks["tint"] = masks["tint"] & ~masks["dot"]
    return Rendering(img, {a: m for a, m in masks.items() if a not in omit})


SHAPES = World(
    name="shapes", description="toy shapes", classes=("square", "disc"), artifacts=("dot", "tint"),
    localised_artifacts=("dot",), diffuse_artifacts=("tint",), image_size=SIZE,
    sample_scene=_sample, render_scene=_render,
    caption_scene=lambda scene, rng: f"a {scene.kind}", metadata_columns=("has_dot", "has_tint"),
    protected_columns=(), label_rule="the shape", clip_model="none", default_artifact="dot",
    default_target_class="disc", phrases={})


@pytest.fixture
def shapes_world(monkeypatch):
    monkeypatch.setattr(worlds, "_WORLDS", dict(worlds._WORLDS))
    return register_world(SHAPES)


def test_dermatology_is_the_default_world():
    assert "dermatology" in list_worlds()
    derm = get_world("dermatology")
    assert derm.image_size == 64 and derm.clip_model == "tiny-derm-clip"
    assert derm.default_artifact == "ruler" and derm.default_target_class == "malignant"
    with pytest.raises(InputError, match="unknown world 'mars'. Available: birds, dermatology"):
        get_world("mars")


def test_a_registered_world_gets_planted_sets_masks_and_roles(shapes_world, tmp_path):
    assert list_worlds() == ["birds", "dermatology", "shapes"]
    data = make_planted_dataset(tmp_path, artifact=None, n=20, seed=1, base_rate=0.5,
                                world="shapes")
    assert data.world == "shapes" and data.ground_truth["target_class"] == "disc"
    with open(data.manifest_fpath, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ("path", "label", "caption", "has_dot", "has_tint")
    assert data.ground_truth["masks"]["bits"] == {"dot": 0, "tint": 1}
    roles = find_column_roles(data.manifest_fpath, rows[0].keys())
    assert roles.artifact == ("has_dot", "has_tint") and roles.protected == ()
    for row in rows:
        assert Image.open(tmp_path / row["path"]).size == (SIZE, SIZE)
        dot = load_artifact_mask(tmp_path, row["path"], "dot")
        assert dot.shape == (SIZE, SIZE) and dot.sum() == (9 if row["has_dot"] == "True" else 0)
    with pytest.raises(InputError, match="unknown artifact 'ruler' in the shapes world"):
        make_planted_dataset(tmp_path / "x", artifact="ruler", world="shapes")


def test_a_registered_world_gets_counterfactual_pairs(shapes_world, tmp_path):
    pairs = make_counterfactual_dataset(tmp_path, artifact="dot", n=10, seed=2, world=SHAPES)
    with open(pairs.manifest_fpath, newline="") as f:
        rows = list(csv.DictReader(f))
    for clean, art in zip(rows[::2], rows[1::2]):
        changed = (np.asarray(Image.open(tmp_path / clean["path"]))
                   != np.asarray(Image.open(tmp_path / art["path"]))).any(-1)
        assert np.array_equal(changed, load_artifact_mask(tmp_path, art["path"], "dot"))
    # A classifier that calls every dotted shape a disc, measured on those pairs.
    predictions = ["disc" if r["variant"] == "artifact" else r["label"] for r in rows]
    result = causal_reliance(predictions, pairs)
    assert result.target_class == "disc" and result.accuracy_artifact == 0 and result.drop == 1
