"""Every image-tower family: the pooled hook point, residual hook points and the rest of
the tower reproduce encode_image, on one tiny random-weight model per architecture."""

from __future__ import annotations

import open_clip
import pytest
import torch

from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.hooks import (
    HookPoint,
    cache_readout,
    list_tower_families,
    make_tower,
)
from clipaudit.extraction.readout import frozen_norms

from conftest import CONFIGS_DPATH, image_tower, images_for

FAMILY_OF = {
    "tiny-vit-a": "open_clip-vit", "tiny-clipa": "open_clip-vit", "tiny-coca": "open_clip-vit",
    "tiny-resnet": "open_clip-resnet",
    "tiny-siglip": "timm-vit", "tiny-eva02": "timm-vit", "tiny-pe-core": "timm-vit",
    "tiny-convnext": "timm-pooled-head", "tiny-convnext-mlp": "timm-pooled-head",
    "tiny-fastvit": "timm-pooled-head",
}
TRANSFORMERS = ["tiny-vit-a", "tiny-clipa", "tiny-coca", "tiny-siglip", "tiny-eva02", "tiny-pe-core"]
CLS_IS_POOLED = {"tiny-vit-a": True, "tiny-eva02": True, "tiny-clipa": False, "tiny-coca": False,
                 "tiny-siglip": False, "tiny-pe-core": False}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.parametrize("name", list(FAMILY_OF))
def test_pooled_vector_and_rest_of_tower_reproduce_encode_image(name):
    backbone = image_tower(name)
    tower = make_tower(backbone.model)
    assert tower.family == FAMILY_OF[name]
    images = images_for(backbone)
    with torch.no_grad():
        expected = backbone.encode_image(images)
        cap = tower.capture(images, HookPoint())
        readout = tower.pooled_readout
        assert cap.acts.shape == (4, tower.pooled_dim)
        assert_close(cap.embeds, expected)
        assert_close(readout(cap.acts), expected)
        assert readout.is_affine == (name != "tiny-convnext-mlp")
        if readout.affine is not None:
            weight, bias = readout.affine
            normed = readout.norm(cap.acts) if readout.norm is not None else cap.acts
            assert_close(normed @ weight + bias, expected)
        # the embedding depends on the pooled vector (a readout that ignored it would pass above
        # only by accident)
        moved = readout(cap.acts + torch.randn_like(cap.acts))
        assert not torch.allclose(moved, expected, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_residual_hook_points_and_rest_of_tower_reproduce_encode_image(name):
    backbone = image_tower(name)
    tower = make_tower(backbone.model)
    images = images_for(backbone)
    assert tower.n_blocks >= 2 and tower.hook_tokens[0] == "pooled"
    with torch.no_grad():
        expected = backbone.encode_image(images)
        for token in tower.hook_tokens[1:]:
            for layer in (0, -1):
                cap = tower.capture(images, HookPoint(layer, token), keep_resid=True)
                assert_close(cap.embeds, expected)
                resolved = tower.resolve(HookPoint(layer, token))
                rest = tower.forward_edited(images, resolved,
                                            lambda r, a=cap.acts, t=token: tower.replace(r, t, a))
                assert_close(rest, expected)
                if layer == 0:  # after the last block, only the tokens the pooling reads matter
                    noisy = cap.acts + torch.randn_like(cap.acts)
                    edited = tower.forward_edited(images, resolved, lambda r, a=noisy, t=token:
                                                  tower.replace(r, t, a))
                    assert not torch.allclose(edited, expected,
                                              atol=1e-4 * float(expected.abs().max()))
                n_spatial = cap.resid.shape[1] - tower.n_prefix
                want = (4, tower.width) if token == "cls" else (4, n_spatial, tower.width)
                assert tuple(cap.acts.shape) == want


def test_layer_scaled_blocks_carry_patch_edits_as_open_clips_own_forward_does():
    """ViT-M-16-alt's blocks multiply their attention and MLP outputs by LayerScale, which
    open_clip starts at 1e-4: at that init the patch tokens reach the class token (the
    pooled vector) only through a scaled-down attention, so an edit of them barely moves the
    embedding and no check can tell a correct rest of the tower from one that drops a block.
    With layer scales of a trained model's size (how benchmarks/model_coverage.py checks
    every tower), the edit moves the embedding, and clipaudit's rest of the tower moves it
    exactly as the same edit made inside open_clip's own forward does."""
    # a private copy: this test changes the weights
    backbone = load_backbone(BackboneSpec(config=CONFIGS_DPATH / "tiny-vit-ls.json",
                                          pretrained="random", seed=3), text=False)
    visual = backbone.model.visual
    tower = make_tower(backbone.model)
    assert tower.hook_tokens == ("pooled", "cls", "spatial") and tower.cls_is_pooled
    gammas = [m.gamma for m in visual.modules() if isinstance(m, open_clip.transformer.LayerScale)]
    assert len(gammas) == 2 * tower.n_blocks
    images = images_for(backbone)
    hook = HookPoint(0, "spatial")

    @torch.no_grad()
    def edit_moves_embedding_by() -> float:
        expected = backbone.encode_image(images)
        acts = tower.capture(images, hook).acts
        noisy = acts + torch.randn(acts.shape, generator=torch.Generator().manual_seed(1))
        ours = tower.forward_edited(images, tower.resolve(hook),
                                    lambda r: tower.replace(r, "spatial", noisy))

        def same_edit(module, args, out):  # open_clip's blocks are batch-first, class token 0
            return torch.cat([out[:, :1], noisy], dim=1)

        handle = visual.transformer.resblocks[0].register_forward_hook(same_edit)
        try:
            theirs = backbone.encode_image(images)
        finally:
            handle.remove()
        assert_close(ours, theirs)
        return float((ours - expected).abs().max() / expected.abs().max())

    at_init = edit_moves_embedding_by()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for gamma in gammas:
            gamma.copy_(torch.rand(gamma.shape, generator=generator) + 0.5)
    trained = edit_moves_embedding_by()
    assert trained > 1e-2
    assert 0 < at_init < trained / 100


@pytest.mark.parametrize("name", list(FAMILY_OF))
def test_the_image_tower_alone_is_the_full_models_image_tower(name):
    """Extraction builds the image tower alone; the audit loads the whole CLIP. Random
    weights from one seed must be the same in both."""
    alone = image_tower(name)
    full = load_backbone(BackboneSpec(config=CONFIGS_DPATH / f"{name}.json", pretrained="random",
                                      seed=3))
    assert full.id == alone.id
    images = images_for(alone)
    with torch.no_grad():
        torch.testing.assert_close(full.encode_image(images), alone.encode_image(images))
    with pytest.raises(InputError, match="without its text tower"):
        alone.encode_text(["a photo"])
    assert full.encode_text(["a photo"]).shape == (1, full.embed_dim)


@pytest.mark.parametrize("name", list(CLS_IS_POOLED))
def test_last_block_class_token_audits_only_where_it_is_the_pooled_vector(name):
    tower = make_tower(image_tower(name).model)
    assert tower.cls_is_pooled == CLS_IS_POOLED[name]
    assert cache_readout(tower, {"layer": None, "token": "pooled"}) is tower.pooled_readout
    old_cache = {"layer": tower.n_blocks - 1, "token": "cls"}
    if CLS_IS_POOLED[name]:
        assert cache_readout(tower, old_cache) is tower.pooled_readout
        images = images_for(image_tower(name))
        with torch.no_grad():
            torch.testing.assert_close(tower.capture(images, HookPoint(-1, "cls")).acts,
                                       tower.capture(images, HookPoint()).acts)
    else:
        with pytest.raises(InputError, match="pooled hook point"):
            cache_readout(tower, {"layer": tower.n_blocks - 1, "token": "spatial"})
    with pytest.raises(InputError, match="layer 0, token spatial"):
        cache_readout(tower, {"layer": 0, "token": "spatial"})


def test_hook_points_a_tower_does_not_have_are_user_errors():
    siglip = make_tower(image_tower("tiny-siglip").model)
    with pytest.raises(InputError, match="no class token"):
        siglip.resolve(HookPoint(-1, "cls"))
    resnet = make_tower(image_tower("tiny-resnet").model)
    assert resnet.hook_tokens == ("pooled",)
    with pytest.raises(InputError, match="residual stream"):
        resnet.resolve(HookPoint(0, "spatial"))
    with pytest.raises(InputError, match="not one of"):
        HookPoint(0, "mean").resolve(4)  # type: ignore[arg-type]


def test_tower_registry_names_the_families_and_refuses_others():
    families = list_tower_families()
    assert families == ["open_clip-vit", "open_clip-resnet", "timm-vit", "timm-pooled-head"]
    with pytest.raises(InputError) as info:
        make_tower(torch.nn.Linear(3, 3))
    assert all(f in str(info.value) for f in families) and "Linear" in str(info.value)


@pytest.mark.parametrize("name", ["tiny-vit-a", "tiny-convnext", "tiny-eva02"])
def test_frozen_norms_keep_values_and_drop_the_scale_from_the_gradient(name):
    backbone = image_tower(name)
    images = images_for(backbone, n=2).requires_grad_(True)
    exact = backbone.model.encode_image(images)
    (grad_exact,) = torch.autograd.grad(exact.sum(), images)
    with frozen_norms(backbone.model):
        frozen = backbone.model.encode_image(images)
        (grad_frozen,) = torch.autograd.grad(frozen.sum(), images)
    torch.testing.assert_close(frozen, exact, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grad_frozen, grad_exact, rtol=1e-3, atol=1e-6)
    again = backbone.model.encode_image(images)  # the patch is gone after the block
    (grad_again,) = torch.autograd.grad(again.sum(), images)
    torch.testing.assert_close(grad_again, grad_exact)
