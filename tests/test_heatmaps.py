"""Heatmaps: where a component's activation comes from, and whether it points at the truth.

Tiny random-weight ViTs check the machinery (the linearisation leaves values unchanged
and makes the maps complete, towers plug in, the audit step writes its files); the
bundled tiny CLIP with components built from counterfactual pairs checks that a map of
a known component lands on its artifact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clipaudit.artifacts import read_tensor_meta
from clipaudit.attribution.heatmap_files import HeatmapConfig, add_heatmaps, load_heatmap_values
from clipaudit.attribution.heatmaps import (
    _TOKEN_SOURCES,
    NoSpatialTokensError,
    SpatialTokens,
    component_heatmaps,
    linearised,
    list_heatmap_methods,
    register_token_source,
    why_not_linearisable,
)
from clipaudit.attribution.localization import mask_area, mass_inside, patch_coverage, pointing_hit
from clipaudit.attribution.overlays import model_view, render_map, render_overlay, view_mask
from clipaudit.attribution.patching import frozen_layernorms
from clipaudit.errors import InputError
from clipaudit.extraction.hooks import HookPoint, VisionTower
from clipaudit.results import ComponentInfo
from clipaudit.sae.model import TopKSAE

from conftest import RefTopKSAE, tiny_backbone

CLS = HookPoint(-1, "cls")


def _images(backbone, n: int, seed: int = 0) -> torch.Tensor:
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the linearisation


@pytest.mark.parametrize("name", ["tiny-vit-a", "tiny-vit-b"])
def test_the_linearised_tower_computes_the_same_values(name):
    backbone = tiny_backbone(name)
    tower = VisionTower(backbone.model)
    x = tower.embed(_images(backbone, 3))
    with torch.no_grad():
        plain = tower.run_blocks(x, 0, tower.n_blocks)
        with frozen_layernorms(tower.visual), linearised(tower.visual):
            frozen = tower.run_blocks(x, 0, tower.n_blocks)
        again = tower.run_blocks(x, 0, tower.n_blocks)  # patches are undone on exit
    assert torch.allclose(plain, frozen, atol=1e-5, rtol=1e-4)
    assert torch.equal(plain, again)
    assert all("forward" not in vars(m) for m in tower.visual.modules())


def _without_biases(backbone) -> None:
    """Zero every bias and the class token's input: the tower becomes homogeneous in its
    patch tokens once normalisations, attention weights and gates are frozen."""
    visual = backbone.model.visual
    with torch.no_grad():
        for name, p in visual.transformer.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        visual.class_embedding.zero_()
        visual.positional_embedding[0].zero_()
        visual.ln_pre.bias.zero_()


def test_relevance_maps_add_up_to_the_activation():
    backbone = tiny_backbone("tiny-vit-a")
    _without_biases(backbone)
    width = VisionTower(backbone.model).width
    sae = RefTopKSAE(width, 24, 4, seed=1)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    images = _images(backbone, 6)
    h = VisionTower(backbone.model).capture(images, CLS).acts
    active = sae.encode(h).indices[:, 0]  # each image's strongest component
    maps = component_heatmaps(images, active, sae, backbone.model, CLS, method="relevance")
    assert maps.method == "relevance" and maps.grid == (4, 4) and maps.maps.shape == (6, 4, 4)
    assert (maps.activations > 0).all()
    # complete: the patches explain the whole activation, nothing is left over
    assert torch.allclose(maps.maps.flatten(1).sum(1), maps.activations, rtol=1e-3, atol=1e-5)
    assert (maps.rest.abs() < 1e-3 * maps.activations).all()
    # the plain gradient is only a local slope: the same sum misses part of the activation
    slope = component_heatmaps(images, active, sae, backbone.model, CLS, method="gradient")
    assert (slope.rest.abs() > 1e-2 * slope.activations).any()


def test_every_method_gives_one_map_per_image_and_component():
    backbone = tiny_backbone("tiny-vit-b")
    sae = RefTopKSAE(VisionTower(backbone.model).width, 16, 4)
    images = _images(backbone, 3)
    comps = sae.encode(VisionTower(backbone.model).capture(images, CLS).acts).indices[:, 0]
    for method in list_heatmap_methods():
        maps = component_heatmaps(images, comps, sae, backbone.model, CLS, method=method, batch_size=2)
        assert maps.maps.shape == (3, *maps.grid) and torch.isfinite(maps.maps).all(), method
        assert torch.equal(maps.components, comps)
        assert maps.peaks().shape == (3, 2)
    with pytest.raises(InputError, match="Available: relevance"):
        component_heatmaps(images, comps, sae, backbone.model, CLS, method="saliency")


def test_spatial_hook_points_sum_the_component_over_tokens():
    backbone = tiny_backbone("tiny-vit-a")
    tower = VisionTower(backbone.model)
    sae = RefTopKSAE(tower.width, 16, 4, seed=2)
    hook = HookPoint(1, "spatial")
    images = _images(backbone, 2)
    tokens = tower.capture(images, hook).acts  # [n, t, d]
    j = int(sae.encode(tokens.reshape(-1, tower.width)).indices[0, 0])
    maps = component_heatmaps(images, [j, j], sae, backbone.model, hook, method="activation")
    codes = sae.encode(tokens.reshape(-1, tower.width))
    per_token = (codes.values * (codes.indices == j)).sum(-1).reshape(2, -1)
    assert torch.allclose(maps.maps.flatten(1), per_token, atol=1e-5)
    assert torch.allclose(maps.activations, per_token.sum(1), atol=1e-5)


def test_an_attention_clipaudit_cannot_linearise_falls_back_to_the_gradient(caplog):
    backbone = tiny_backbone("tiny-vit-a")
    block = backbone.model.visual.transformer.resblocks[0]

    class OwnAttention(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    block.attn = OwnAttention(block.attn)
    assert "OwnAttention" in why_not_linearisable(backbone.model.visual)
    sae = RefTopKSAE(VisionTower(backbone.model).width, 8, 2)
    maps = component_heatmaps(_images(backbone, 1), [0], sae, backbone.model, CLS)
    assert maps.method == "gradient"
    assert "instead of 'relevance'" in caplog.text


def test_towers_without_patch_tokens_say_so_and_new_towers_plug_in():
    class Pooled(torch.nn.Module):  # a tower with nothing spatial clipaudit knows
        def forward(self, x):
            return x.mean(dim=(2, 3))

    model = Pooled()
    sae = RefTopKSAE(3, 4, 1)
    with pytest.raises(NoSpatialTokensError, match="Pooled has none"):
        component_heatmaps(torch.zeros(1, 3, 4, 4), [0], sae, model, CLS)

    def pixels_as_tokens(m, images, hook):  # each pixel a token, the mean the "CLS"
        if not isinstance(m, Pooled):
            return None
        tokens = images.flatten(2).transpose(1, 2)
        return SpatialTokens(tokens, 0, (images.shape[2], images.shape[3]), (1, 1),
                             lambda x: x.mean(1), lambda x: x, m)

    register_token_source(pixels_as_tokens)
    try:
        image = torch.zeros(1, 3, 4, 4)
        image[0, :, 1, 2] = 8.0  # one bright pixel
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.W_enc[0] = torch.tensor([1.0, 1.0, 1.0])
        maps = component_heatmaps(image, [0], sae, model, CLS, method="gradient")
        assert maps.peaks().tolist() == [[1, 2]]
    finally:
        _TOKEN_SOURCES.remove(pixels_as_tokens)


# ------------------------------------------------------------------ a known component


def _counterfactual_batch(backbone, artifacts, n, seed):
    """Scenes with ``artifacts`` drawn, and the same scenes without each of them."""
    from clipaudit.synthetic import ARTIFACTS, render_scene_with_masks, sample_scene

    with_all, without, masks = [], {a: [] for a in artifacts}, {a: [] for a in artifacts}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, artifact_probs={a: 0.0 for a in ARTIFACTS},
                             forced_artifacts={a: True for a in artifacts})
        full = render_scene_with_masks(scene, np.random.default_rng([seed, i, 1]))
        with_all.append(backbone.preprocess(Image.fromarray(full.image)))
        for a in artifacts:
            less = render_scene_with_masks(scene, np.random.default_rng([seed, i, 1]), omit=[a])
            without[a].append(backbone.preprocess(Image.fromarray(less.image)))
            masks[a].append(full.masks[a])
    return torch.stack(with_all), {a: torch.stack(v) for a, v in without.items()}, masks


@pytest.fixture(scope="module")
def tiny_clip():
    from clipaudit.extraction.backbone import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec.bundled())


@pytest.mark.slow
def test_the_map_of_a_known_component_lands_on_its_artifact(tiny_clip):
    """Two components built from counterfactual pairs on the bundled tiny CLIP (the
    change a ruler makes to the class token, the change a band-aid makes): on images
    holding both artifacts, each component's map points at its own artifact."""
    tower = VisionTower(tiny_clip.model)
    artifacts = ("ruler", "band_aid")
    train_with, train_without, _ = _counterfactual_batch(tiny_clip, artifacts, 24, seed=5)
    with torch.no_grad():
        h_with = tower.capture(train_with, CLS).acts
        directions = torch.stack([(h_with - tower.capture(train_without[a], CLS).acts).mean(0)
                                  for a in artifacts])
    directions = directions / directions.norm(dim=1, keepdim=True)
    sae = TopKSAE(tower.width, 2, 2)  # component 0 reads rulers, component 1 band-aids
    with torch.no_grad():
        offset = -(h_with @ directions.T).min(0).values + 1.0  # active on every test image
        sae.set_weights(directions, offset, directions.T.clone(), torch.zeros(tower.width))
    images, _, masks = _counterfactual_batch(tiny_clip, artifacts, 16, seed=6)
    n = len(images)
    maps = component_heatmaps(images.repeat(2, 1, 1, 1), [0] * n + [1] * n, sae, tiny_clip.model, CLS)
    assert (maps.activations > 0).all()
    for k, artifact in enumerate(artifacts):
        own = [view_mask(tiny_clip.preprocess, m) for m in masks[artifact]]
        other = [view_mask(tiny_clip.preprocess, m) for m in masks[artifacts[1 - k]]]
        heat = maps.maps[k * n:(k + 1) * n].numpy()
        hits = np.mean([pointing_hit(h, m, maps.patch_px) for h, m in zip(heat, own)])
        mass_own = np.mean([mass_inside(h, m, maps.patch_px) for h, m in zip(heat, own)])
        mass_other = np.mean([mass_inside(h, m, maps.patch_px) for h, m in zip(heat, other)])
        assert hits >= 0.85, (artifact, hits)
        assert mass_own > 2 * np.mean([mask_area(m) for m in own]), artifact
        assert mass_own > mass_other, (artifact, mass_own, mass_other)


# ------------------------------------------------------------------ scoring and drawing


def test_pointing_game_and_mass_inside_the_mask():
    mask = np.zeros((16, 16), bool)
    mask[0:3, 0:16] = True  # a "ruler" along the top: patch row 0 at 4 px patches
    heat = np.zeros((4, 4))
    heat[0, 2] = 1.0
    assert pointing_hit(heat, mask, (4, 4))
    heat[0, 2], heat[1, 2] = 0.0, 1.0  # one patch below the mask: within the tolerance
    assert pointing_hit(heat, mask, (4, 4)) and not pointing_hit(heat, mask, (4, 4), tolerance=0)
    heat[1, 2], heat[3, 3] = 0.0, 1.0
    assert not pointing_hit(heat, mask, (4, 4))
    assert not pointing_hit(np.zeros((4, 4)), mask, (4, 4))  # an empty map never scores
    tied = np.zeros((4, 4))
    tied[0, 0] = tied[3, 3] = 1.0
    assert not pointing_hit(tied, mask, (4, 4))  # a tie scores only if every maximum is inside
    assert patch_coverage(mask, (4, 4), (4, 4))[0].tolist() == [0.75] * 4
    even = np.ones((4, 4))
    assert mass_inside(even, mask, (4, 4)) == pytest.approx(mask_area(mask))
    assert mass_inside(-even, mask, (4, 4)) == 0.0
    with pytest.raises(ValueError, match="does not cover"):
        mass_inside(even, mask[:15], (4, 4))


def test_masks_follow_the_preprocessing_into_the_model_view():
    backbone = tiny_backbone("tiny-vit-a")  # 32 px: resize the short side, crop the centre
    mask = np.zeros((48, 96), bool)
    mask[:, :8] = True  # a band on the left edge, cropped away by the centre crop
    mask[20:28, 44:52] = True  # a square in the middle
    view = view_mask(backbone.preprocess, mask)
    assert view.shape == (32, 32)
    assert not view[:, :4].any() and view[14:18, 14:18].all() and view.sum() < 60
    image = Image.new("RGB", (96, 48), (200, 30, 30))
    tensor, picture = model_view(backbone.preprocess, image)
    assert tensor.shape == (3, 32, 32) and picture.size == (32, 32)
    assert np.abs(np.asarray(picture, int) - (200, 30, 30)).max() <= 2  # un-normalised


def test_overlay_and_map_pictures():
    view = Image.new("RGB", (32, 32), (120, 120, 120))
    heat = np.zeros((4, 4), np.float32)
    heat[1, 3], heat[2, 0] = 2.0, -1.0
    overlay = render_overlay(view, heat, 64, peak=(1, 3))
    assert overlay.size == (64, 64)
    pixels = np.asarray(overlay, int)
    assert pixels[24, 56].sum() > pixels[56, 8].sum() + 100  # bright at the peak, dim elsewhere
    assert tuple(pixels[16, 48]) == (0, 230, 255)  # the peak patch's outline
    raw = np.asarray(render_map(heat, 64), int)
    assert raw[24, 56, 0] > 150 and raw[24, 56, 2] < 80  # red where it adds
    assert raw[40, 8, 2] > raw[40, 8, 0]  # blue where it takes away
    assert tuple(raw[0, 0]) == (255, 255, 255)


# ------------------------------------------------------------------ the audit's files


def test_the_audit_step_writes_overlays_maps_and_values(tmp_path):
    backbone = tiny_backbone("tiny-vit-a")
    paths = []
    for i in range(3):
        fpath = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(fpath)
        paths.append(str(fpath))
    index = pd.DataFrame({"id": [10, 11, 12], "path": paths})
    (tmp_path / "gone.png").write_bytes(b"not an image")
    index.loc[3] = [13, str(tmp_path / "gone.png")]
    sae = RefTopKSAE(VisionTower(backbone.model).width, 8, 8)
    comps = [ComponentInfo(component=2, concept="ruler", concept_score=0.1, clarity=0.5,
                           top_instances=[11, 13, 10]),
             ComponentInfo(component=5, concept="hair", concept_score=0.1, clarity=0.5,
                           top_instances=[12])]
    out = tmp_path / "audit"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "stale.png").write_bytes(b"old")
    updated, info = add_heatmaps(comps, index, backbone.model, backbone.preprocess, sae,
                                 {"layer": 2, "token": "cls"}, out, HeatmapConfig(image_px=48))
    assert info.method == "relevance" and info.grid == [4, 4] and "relevance" in info.note
    assert not (out / "heatmaps" / "stale.png").exists()
    assert [h.instance for h in updated[0].heatmaps] == [11, 10]  # the unreadable one is skipped
    assert [h.instance for h in updated[1].heatmaps] == [12]
    for c in updated:
        for h in c.heatmaps:
            for rel in (h.overlay, h.map):
                with Image.open(out / rel) as img:
                    assert img.size == (48, 48)
    values = load_heatmap_values(out)
    assert set(values) == {(2, 11), (2, 10), (5, 12)}
    first = updated[0].heatmaps[0]
    assert list(np.unravel_index(values[(2, 11)].argmax(), (4, 4))) == first.peak
    assert read_tensor_meta(out / info.file)["method"] == "relevance"
    # turned off: nothing is computed or written
    again, none = add_heatmaps(comps, index, backbone.model, backbone.preprocess, sae,
                               {"layer": 2, "token": "cls"}, tmp_path / "off",
                               HeatmapConfig(enabled=False))
    assert none is None and again == comps and not (tmp_path / "off").exists()


def test_the_audit_step_records_why_a_tower_has_no_heatmaps(tmp_path):
    fpath = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(fpath)
    index = pd.DataFrame({"id": [0], "path": [str(fpath)]})
    comps = [ComponentInfo(component=0, concept="x", concept_score=0.0, clarity=0.5, top_instances=[0])]

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    updated, info = add_heatmaps(comps, index, Pooled(), lambda img: torch.zeros(3, 8, 8),
                                 RefTopKSAE(3, 2, 1), {"layer": -1, "token": "cls"}, tmp_path)
    assert info.method is None and "Pooled has none" in info.note
    assert updated == comps
