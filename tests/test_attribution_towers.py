"""Attributions from the pooled hook point of every tower family, and at residual hook
points of timm towers, against autograd through the unmodified open_clip model with
the SAE spliced in by forward hooks (written here, independently of clipaudit)."""

from __future__ import annotations

import functools

import pytest
import torch

from clipaudit.attribution.patching import attribute_cls, attribute_images
from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.extraction.hooks import HookPoint, make_tower
from clipaudit.heads import LinearProbe, ZeroShotHead

from conftest import CONFIGS_DPATH, RefTopKSAE, image_tower, images_for

# Where each tiny model's pooled vector sits in the unmodified model, for the reference:
# (module path from model.visual, "out" = a forward hook on its output, "in" = a forward
# pre-hook on its input; the token index, or None for a flat vector)
POOLED_SITE = {
    "tiny-vit-a": ("transformer.resblocks.2", "out", 0),
    "tiny-clipa": ("ln_post", "in", None),
    "tiny-coca": ("attn_pool", "out", 0),
    "tiny-siglip": ("trunk.attn_pool", "out", None),
    "tiny-pe-core": ("trunk.attn_pool", "out", None),
    "tiny-eva02": ("trunk.norm", "in", 0),
    "tiny-convnext": ("trunk.head.global_pool", "out", None),
    "tiny-convnext-mlp": ("trunk.head.global_pool", "out", None),
    "tiny-fastvit": ("trunk.head.global_pool", "out", None),
}


def _head(kind: str, dim: int, n_classes: int = 3):
    g = torch.Generator().manual_seed(1)
    names = [f"class{i}" for i in range(n_classes)]
    if kind == "zero-shot":
        t = torch.randn(n_classes, dim, generator=g)
        return ZeroShotHead(t / t.norm(dim=1, keepdim=True), names)
    return LinearProbe(torch.randn(n_classes, dim, generator=g), torch.randn(n_classes, generator=g),
                       names, "l2" if kind == "probe-l2" else "none")


@functools.cache
def norm_perturbed_tower(name: str) -> Backbone:
    """The tiny model with random gains and shifts in every norm: random-init norms are
    (1, 0), which would hide a gain applied on the wrong side of the centring."""
    backbone = load_backbone(BackboneSpec(config=CONFIGS_DPATH / f"{name}.json",
                                          pretrained="random", seed=3), text=False)
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for m in backbone.model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return backbone


def _frozen_norm_hook(module, inputs, output):
    """Any LayerNorm with its scale held constant (LayerNorm2d normalises dim 1)."""
    x = inputs[0].float()
    dim = 1 if type(module).__name__ == "LayerNorm2d" else -1
    mu = x.mean(dim, keepdim=True)
    sigma = ((x - mu).pow(2).mean(dim, keepdim=True) + module.eps).sqrt().detach()
    shape = [1] * x.dim()
    shape[dim] = -1
    out = (x - mu) / sigma
    if module.weight is not None:
        out = out * module.weight.reshape(shape) + module.bias.reshape(shape)
    return out.to(output.dtype)


def _splice(tensor, sae, holder, token):
    """The tensor with its hook-point part replaced by the SAE's reconstruction + fixed error."""
    part = tensor if token is None else tensor[:, token]
    flat = part.reshape(part.shape[0], -1)
    z = sae.encode_dense(flat).detach().requires_grad_(True)
    h_hat = sae.decode_dense(z)
    holder["z"] = z
    patched = (h_hat + (flat - h_hat).detach()).reshape(part.shape)
    if token is None:
        return patched
    return torch.cat([tensor[:, :token], patched.unsqueeze(1), tensor[:, token + 1:]], 1)


def _reference(backbone, images, sae, head, site, gradient):
    """Dense A[n, j, c] by autograd through model.encode_image."""
    visual = backbone.model.visual
    path, where, token = site
    module = visual.get_submodule(path)
    holder = {}
    if where == "out":
        handles = [module.register_forward_hook(lambda m, i, o: _splice(o, sae, holder, token))]
    else:
        handles = [module.register_forward_pre_hook(
            lambda m, i: (_splice(i[0], sae, holder, token),))]
    if gradient == "frozen":
        handles += [m.register_forward_hook(_frozen_norm_hook) for m in visual.modules()
                    if isinstance(m, torch.nn.LayerNorm)]
    try:
        e = backbone.model.encode_image(images)
    finally:
        for handle in handles:
            handle.remove()
    scale = e.norm(dim=1, keepdim=True)
    if gradient == "frozen":
        scale = scale.detach()
    if isinstance(head, ZeroShotHead):
        scores = (e / scale) @ head.text_dirs.T
    elif head.normalisation == "l2":
        scores = (e / scale) @ head.weight.T + head.bias
    else:
        scores = e @ head.weight.T + head.bias
    z = holder["z"]
    per_class = []
    for c in range(scores.shape[1]):
        (grad,) = torch.autograd.grad(scores[:, c].sum(), z, retain_graph=True)
        per_class.append((z * grad).detach())
    return torch.stack(per_class, -1), scores.detach()


def _sae(d: int, scale: float = 1.3) -> RefTopKSAE:
    return RefTopKSAE(d, 3 * d, k=6, scale=scale)


@pytest.mark.parametrize("gradient", ["frozen", "exact"])
@pytest.mark.parametrize("head_kind", ["probe-none", "probe-l2", "zero-shot"])
@pytest.mark.parametrize("name", list(POOLED_SITE))
def test_pooled_attributions_equal_autograd_through_the_model(name, head_kind, gradient):
    backbone = norm_perturbed_tower(name)
    tower = make_tower(backbone.model)
    sae = _sae(tower.pooled_dim)
    head = _head(head_kind, backbone.embed_dim)
    images = images_for(backbone, n=5)
    expected, expected_scores = _reference(backbone, images, sae, head, POOLED_SITE[name], gradient)
    with torch.no_grad():
        pooled = tower.capture(images, HookPoint()).acts
    attr = attribute_cls(pooled, torch.arange(5), sae, head, tower, batch_size=3, gradient=gradient)
    tol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(attr.dense(), expected, rtol=1e-3, atol=tol)
    torch.testing.assert_close(attr.scores, expected_scores, rtol=1e-4, atol=1e-6)
    from_images = attribute_images(images, torch.arange(5), sae, head, tower, HookPoint(),
                                   gradient=gradient)
    torch.testing.assert_close(from_images.dense(), attr.dense())


@pytest.mark.parametrize("name", [n for n in POOLED_SITE if n != "tiny-convnext-mlp"])
def test_frozen_attributions_from_any_pooled_cache_add_up_to_the_score(name):
    backbone = norm_perturbed_tower(name)
    tower = make_tower(backbone.model)
    sae = _sae(tower.pooled_dim, scale=0.7)
    head = _head("probe-l2", backbone.embed_dim)
    with torch.no_grad():
        pooled = tower.capture(images_for(backbone, n=7), HookPoint()).acts
    attr = attribute_cls(pooled, torch.arange(7), sae, head, tower, batch_size=4)
    total = attr.dense().sum(1) + attr.error + attr.bias
    torch.testing.assert_close(total, attr.scores - attr.head_bias, rtol=1e-4, atol=1e-5)
    exact = attribute_cls(pooled, torch.arange(7), sae, head, tower, gradient="exact")
    torch.testing.assert_close(exact.scores, attr.scores)
    # exact gradients differ (norm and |e| are differentiated through) and do not add up
    assert not torch.allclose(exact.dense(), attr.dense(), rtol=1e-3, atol=1e-6)


def test_exact_equals_frozen_when_nothing_is_normalised():
    """SigLIP's pooled vector is its embedding; an unnormalised probe on it is linear."""
    backbone = image_tower("tiny-siglip")
    tower = make_tower(backbone.model)
    assert tower.pooled_readout.norm is None
    sae, head = _sae(tower.pooled_dim), _head("probe-none", backbone.embed_dim)
    with torch.no_grad():
        pooled = tower.capture(images_for(backbone), HookPoint()).acts
    frozen = attribute_cls(pooled, torch.arange(4), sae, head, tower)
    exact = attribute_cls(pooled, torch.arange(4), sae, head, tower, gradient="exact")
    torch.testing.assert_close(exact.dense(), frozen.dense(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gradient", ["frozen", "exact"])
@pytest.mark.parametrize("name, layer, token", [
    ("tiny-siglip", 0, "spatial"), ("tiny-eva02", 0, "cls"), ("tiny-eva02", 1, "spatial"),
    ("tiny-pe-core", 0, "cls"),
])
def test_residual_attributions_on_timm_towers_equal_autograd(name, layer, token, gradient):
    backbone = norm_perturbed_tower(name)
    tower = make_tower(backbone.model)
    sae = _sae(tower.width)
    head = _head("zero-shot", backbone.embed_dim)
    images = images_for(backbone, n=3)
    trunk = backbone.model.visual.trunk
    block = f"trunk.blocks.{layer}"
    if token == "cls":
        site = (block, "out", 0)
        expected, scores = _reference(backbone, images, sae, head, site, gradient)
    else:  # every patch token: splice them as one [n, t, d] tensor, SAE per token
        holder = {}

        def splice_tokens(module, inputs, output):
            prefix, tokens = output[:, :trunk.num_prefix_tokens], output[:, trunk.num_prefix_tokens:]
            z = sae.encode_dense(tokens).detach().requires_grad_(True)
            h_hat = sae.decode_dense(z)
            holder["z"] = z
            return torch.cat([prefix, h_hat + (tokens - h_hat).detach()], 1)

        handles = [backbone.model.visual.get_submodule(block).register_forward_hook(splice_tokens)]
        if gradient == "frozen":
            handles += [m.register_forward_hook(_frozen_norm_hook)
                        for m in backbone.model.visual.modules() if isinstance(m, torch.nn.LayerNorm)]
        try:
            e = backbone.model.encode_image(images)
        finally:
            for handle in handles:
                handle.remove()
        norm = e.norm(dim=1, keepdim=True)
        scores = (e / (norm.detach() if gradient == "frozen" else norm)) @ head.text_dirs.T
        per_class = [(holder["z"] * torch.autograd.grad(scores[:, c].sum(), holder["z"],
                                                        retain_graph=True)[0]).sum(1)
                     for c in range(scores.shape[1])]
        expected, scores = torch.stack(per_class, -1).detach(), scores.detach()
    attr = attribute_images(images, torch.arange(3), sae, head, tower, HookPoint(layer, token),
                            gradient=gradient)
    tol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(attr.dense(), expected, rtol=1e-3, atol=tol)
    torch.testing.assert_close(attr.scores, scores, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in backbone.model.parameters())  # weights left as they were
