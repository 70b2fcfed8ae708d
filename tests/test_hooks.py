import pytest
import torch

from clipaudit.errors import InputError
from clipaudit.extraction.hooks import HookPoint, VisionTower, replace_tokens, select_tokens


def _images(backbone, n=5, seed=0):
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer", [0, 1, -2, -1])
@pytest.mark.parametrize("token", ["cls", "spatial"])
def test_capture_and_rest_of_tower_reproduce_encode_image(any_tiny_backbone, layer, token):
    model = any_tiny_backbone.model
    tower = VisionTower(model)
    images = _images(any_tiny_backbone)
    with torch.no_grad():
        expected = model.encode_image(images)
        cap = tower.capture(images, HookPoint(layer, token), keep_resid=True)
        # the rest of the tower from the captured residual, with the hook-point
        # tokens spliced back in, is the image embedding again
        resid = replace_tokens(cap.resid, token, cap.acts)
        rest = tower.rest(resid, layer)
    torch.testing.assert_close(cap.embeds, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest, expected, rtol=1e-5, atol=1e-5)
    n_tokens = cap.resid.shape[1]
    expected_shape = (5, tower.width) if token == "cls" else (5, n_tokens - 1, tower.width)
    assert tuple(cap.acts.shape) == expected_shape


def test_rest_of_tower_depends_on_the_hook_tokens(tiny_a):
    tower = VisionTower(tiny_a.model)
    images = _images(tiny_a)
    with torch.no_grad():
        cap = tower.capture(images, HookPoint(-2, "cls"), keep_resid=True)
        edited = replace_tokens(cap.resid, "cls", cap.acts + torch.randn_like(cap.acts))
        assert not torch.allclose(tower.rest(edited, -2), cap.embeds, atol=1e-4)


def test_cls_readout_matches_default_hook_point(any_tiny_backbone):
    tower = VisionTower(any_tiny_backbone.model)
    images = _images(any_tiny_backbone)
    with torch.no_grad():
        cap = tower.capture(images, HookPoint())
        torch.testing.assert_close(tower.readout_cls(cap.acts), cap.embeds, rtol=1e-5, atol=1e-5)


def test_select_tokens_shapes():
    resid = torch.randn(2, 5, 3)
    assert select_tokens(resid, "cls").shape == (2, 3)
    assert select_tokens(resid, "spatial").shape == (2, 4, 3)


@pytest.mark.parametrize("layer", [3, -4, 10])
def test_layer_out_of_range_is_a_user_error(tiny_a, layer):
    with pytest.raises(InputError, match="out of range"):
        HookPoint(layer, "cls").resolve(VisionTower(tiny_a.model).n_blocks)
