"""Attribution patching against plain autograd through the unmodified open_clip model."""

import pytest
import torch

from clipaudit.attribution.ablation import ablated_scores, ablation_effect, deletion_curves
from clipaudit.attribution.patching import attribute_cls, attribute_images, class_relevance
from clipaudit.extraction.hooks import HookPoint, VisionTower
from clipaudit.heads import LinearProbe, ZeroShotHead

from conftest import RefTopKSAE, tiny_backbone

N = 6


def _images(backbone, n=N, seed=0):
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _head(kind: str, dim: int, n_classes: int = 3):
    g = torch.Generator().manual_seed(1)
    names = [f"class{i}" for i in range(n_classes)]
    if kind == "zero-shot":
        t = torch.randn(n_classes, dim, generator=g)
        return ZeroShotHead(t / t.norm(dim=1, keepdim=True), names)
    if kind == "probe-std":
        return LinearProbe(torch.randn(n_classes, dim, generator=g), torch.randn(n_classes, generator=g),
                           names, "standardize", torch.randn(dim, generator=g),
                           torch.rand(dim, generator=g) + 0.5)
    norm = "none" if kind == "probe-none" else "l2"
    return LinearProbe(torch.randn(n_classes, dim, generator=g), torch.randn(n_classes, generator=g),
                       names, norm)


def _frozen_ln_hook(module, inputs, output):
    x = inputs[0].float()
    mu = x.mean(-1, keepdim=True)
    sigma = ((x - mu).pow(2).mean(-1, keepdim=True) + module.eps).sqrt().detach()
    return ((x - mu) / sigma * module.weight + module.bias).to(output.dtype)


def _independent_attributions(model, images, sae, head, layer, token):
    """Dense A[n, j, c] by autograd through model.encode_image with forward hooks:
    one inserting the SAE (error fixed) at block `layer`, others freezing LayerNorm
    scales; the head's normalisation is frozen in the score itself."""
    visual = model.visual
    block = visual.transformer.resblocks[layer]
    holder = {}

    def insert_sae(module, inputs, output):
        tokens = output[:, :1] if token == "cls" else output[:, 1:]
        z = sae.encode_dense(tokens).detach().requires_grad_(True)
        h_hat = sae.decode_dense(z)
        patched = h_hat + (tokens - h_hat).detach()
        holder["z"] = z
        rest = output[:, 1:] if token == "cls" else output[:, :1]
        return torch.cat([patched, rest], 1) if token == "cls" else torch.cat([rest, patched], 1)

    handles = [block.register_forward_hook(insert_sae)]
    handles += [m.register_forward_hook(_frozen_ln_hook) for m in visual.modules()
                if isinstance(m, torch.nn.LayerNorm)]
    try:
        e = model.encode_image(images)
    finally:
        for hd in handles:
            hd.remove()
    if isinstance(head, ZeroShotHead):
        scores = (e / e.norm(dim=1, keepdim=True).detach()) @ head.text_dirs.T
    elif head.normalisation == "l2":
        scores = (e / e.norm(dim=1, keepdim=True).detach()) @ head.weight.T + head.bias
    else:
        scores = e @ head.weight.T + head.bias
    z = holder["z"]
    per_class = []
    for c in range(scores.shape[1]):
        (grad,) = torch.autograd.grad(scores[:, c].sum(), z, retain_graph=True)
        a = (z * grad).detach()
        per_class.append(a.sum(1) if a.dim() == 3 else a)  # sum over tokens
    return torch.stack(per_class, -1), scores.detach()


@pytest.mark.parametrize("config", ["tiny-vit-a", "tiny-vit-b"])
@pytest.mark.parametrize("layer,token", [(-1, "cls"), (-2, "cls"), (0, "cls"), (-1, "spatial"), (1, "spatial")])
@pytest.mark.parametrize("head_kind", ["probe-none", "probe-l2", "zero-shot"])
def test_attributions_equal_independent_autograd(config, layer, token, head_kind):
    backbone = tiny_backbone(config)
    model, tower = backbone.model, VisionTower(backbone.model)
    sae = RefTopKSAE(tower.width, 4 * tower.width, k=8, scale=1.7)
    head = _head(head_kind, backbone.embed_dim)
    images = _images(backbone)
    expected, expected_scores = _independent_attributions(model, images, sae, head, layer, token)
    ids = torch.arange(100, 100 + N)
    attr = attribute_images(images, ids, sae, head, tower, HookPoint(layer, token))
    torch.testing.assert_close(attr.dense(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attr.scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert attr.ids.tolist() == ids.tolist()
    if (layer, token) == (-1, "cls"):
        with torch.no_grad():
            acts = tower.capture(images, HookPoint()).acts
        cached = attribute_cls(acts, ids, sae, head, tower, batch_size=4)
        torch.testing.assert_close(cached.dense(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_kind", ["probe-none", "probe-l2", "probe-std", "zero-shot"])
def test_attributions_are_complete_at_the_default_hook_point(any_tiny_backbone, head_kind):
    tower = VisionTower(any_tiny_backbone.model)
    with torch.no_grad():  # a non-zero ln_post bias exercises the constant term
        tower.visual.ln_post.bias.normal_(generator=torch.Generator().manual_seed(3))
    sae = RefTopKSAE(tower.width, 3 * tower.width, k=5, scale=0.8)
    head = _head(head_kind, any_tiny_backbone.embed_dim)
    with torch.no_grad():
        acts = tower.capture(_images(any_tiny_backbone, n=9), HookPoint()).acts
    attr = attribute_cls(acts, torch.arange(9), sae, head, tower, batch_size=4)
    total = attr.dense().sum(1) + attr.error + attr.bias
    torch.testing.assert_close(total, attr.scores - attr.head_bias, rtol=1e-4, atol=1e-5)
    # the SAE explains part of the evidence: the error term is not everything
    assert attr.dense().abs().sum() > attr.error.abs().sum() * 0.1


def test_patched_model_reproduces_scores_and_ablation_changes_them(tiny_a):
    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 256, k=8)
    head = _head("probe-l2", tiny_a.embed_dim)
    images = _images(tiny_a)
    with torch.no_grad():
        acts = tower.capture(images, HookPoint()).acts
        original = head.scores(tiny_a.model.encode_image(images))
    torch.testing.assert_close(ablated_scores(acts, sae, head, tower, []), original, rtol=1e-5, atol=1e-5)
    active = int(sae.encode(acts).indices[0, 0])
    changed = ablated_scores(acts, sae, head, tower, [active])
    assert not torch.allclose(changed[0], original[0], atol=1e-6)
    inactive_rows = (sae.encode_dense(acts)[:, active] == 0)
    torch.testing.assert_close(changed[inactive_rows], original[inactive_rows])


def test_ablation_effect_reports_slices(tiny_a):
    import pandas as pd

    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 256, k=8)
    head = _head("probe-l2", tiny_a.embed_dim, n_classes=2)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=8), HookPoint()).acts
    j = int(sae.encode(acts).indices[0, 0])
    labels = ["class0", "class1"] * 4
    meta = pd.DataFrame({"has_ruler": [True, False] * 4})
    effect = ablation_effect(acts, sae, head, tower, j, "class0", labels, meta)
    assert effect.component == j and {s.value for s in effect.slices} == {"True", "False"}
    assert sum(s.n for s in effect.slices) == 8
    assert effect.accuracy_before is not None


def test_relevance_shares_by_label_and_by_prediction(tiny_a):
    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 128, k=6)
    head = _head("probe-none", tiny_a.embed_dim, n_classes=2)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=10), HookPoint()).acts
    attr = attribute_cls(acts, torch.arange(10), sae, head, tower)
    labels = ["class0"] * 4 + ["class1"] * 6
    rel = class_relevance(attr, labels)
    dense = attr.dense()
    torch.testing.assert_close(rel.mean[:, 0], dense[:4, :, 0].mean(0))
    torch.testing.assert_close(rel.mean[:, 1], dense[4:, :, 1].mean(0))
    torch.testing.assert_close(rel.share.abs().sum(0), torch.ones(2))
    assert rel.by == "label" and rel.n_instances.tolist() == [4, 6]
    by_pred = class_relevance(attr, None)
    assert by_pred.by == "prediction"
    assert by_pred.n_instances.sum() == 10
    assert ((rel.unexplained_share >= 0) & (rel.unexplained_share <= 1)).all()


def test_deletion_curves_act_x_grad_removes_evidence_at_least_as_fast_as_random(tiny_a):
    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 256, k=12)
    head = _head("probe-none", tiny_a.embed_dim, n_classes=2)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=16), HookPoint()).acts
    target = head.scores(tower.readout_cls(acts)).argmax(1)
    curves = {c.method: c for c in deletion_curves(acts, sae, head, tower, target, steps=6)}
    assert set(curves) == {"act_x_grad", "act_x_grad_exact", "logit_lens", "act_x_logit_lens",
                           "activation", "random"}
    for curve in curves.values():
        assert len(curve.scores) == 7 and curve.steps[0] == 0
        assert curve.scores[0] == pytest.approx(curves["random"].scores[0])
    assert curves["act_x_grad"].auc <= curves["random"].auc + 1e-6


@pytest.mark.parametrize("gradient", ["frozen", "exact"])
def test_deletion_rankings_are_the_target_class_attributions(tiny_a, gradient):
    """The deletion curves rank by each instance's attribution to its target class; the
    exact ranking takes one backward pass of the targets' scores, and must equal the
    target's column of every class's autograd attributions (``attribute_cls``)."""
    from clipaudit.attribution.ablation import _act_x_grad

    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 256, k=12)
    head = _head("probe-l2", tiny_a.embed_dim, n_classes=5)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=16), HookPoint()).acts
    target = torch.arange(16) % 5
    idx = sae.encode(acts).indices
    got = _act_x_grad(acts, idx, sae, head, tower.pooled_readout, target, gradient)
    attr = attribute_cls(acts, torch.arange(16), sae, head, tower, gradient=gradient)
    want = torch.zeros(idx.shape)
    for r, j, v in zip(attr.rows.tolist(), attr.components.tolist(), attr.values):
        want[r, idx[r].tolist().index(j)] = v[target[r]]
    assert got.abs().sum() > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("affine", [True, False])
def test_logit_lens_of_the_active_components_equals_the_full_lens(tiny_a, affine):
    """The deletion curves' Logit Lens is computed for each instance's active components
    and target class only; it must be those entries of every component x class."""
    import dataclasses

    from clipaudit.attribution.ablation import _logit_lens

    tower = VisionTower(tiny_a.model)
    readout = tower.pooled_readout
    if not affine:  # an MLP projection, as convnext_large_d's
        g = torch.Generator().manual_seed(1)
        mlp = (torch.nn.Linear(tower.width, 32), torch.nn.GELU(), torch.nn.Linear(32, tiny_a.embed_dim))
        for layer in (mlp[0], mlp[2]):
            layer.weight.data = torch.randn(layer.weight.shape, generator=g) * 0.2
        readout = dataclasses.replace(readout, steps=mlp, affine=None)
    sae = RefTopKSAE(tower.width, 256, k=12)
    head = _head("probe-l2", tiny_a.embed_dim, n_classes=5)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=8), HookPoint()).acts
        idx = sae.encode(acts).indices
        target = torch.arange(8) % 5
        atoms = sae.W_dec.detach().float().T
        directed = readout.norm.linear_part(atoms) if readout.norm is not None else atoms
        dirs = readout.post(directed) - readout.post(torch.zeros(1, atoms.shape[1]))
        full = dirs @ head.linear_form(torch.ones(1, dirs.shape[1])).weight.T  # [m, C]
        got = _logit_lens(sae, head, readout, idx, target)
    torch.testing.assert_close(got, full[idx, target[:, None]], atol=1e-4, rtol=1e-4)


def test_parquet_round_trip(tmp_path, tiny_a):
    from clipaudit.artifacts import read_parquet

    tower = VisionTower(tiny_a.model)
    sae = RefTopKSAE(tower.width, 64, k=4)
    head = _head("zero-shot", tiny_a.embed_dim, n_classes=2)
    with torch.no_grad():
        acts = tower.capture(_images(tiny_a, n=5), HookPoint()).acts
    attr = attribute_cls(acts, torch.arange(10, 15), sae, head, tower)
    attr.to_parquet(tmp_path / "a.parquet")
    df, meta = read_parquet(tmp_path / "a.parquet", "attributions")
    assert len(df) == len(attr.rows) * 2 and meta["class_names"] == ["class0", "class1"]
    row = df[(df.instance_id == 10) & (df["class"] == "class1")].sort_values("component")
    dense = attr.dense()[0, :, 1]
    for comp, value in zip(row.component, row.attribution):
        assert value == pytest.approx(float(dense[comp]), abs=1e-6)
