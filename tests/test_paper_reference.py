"""``gradient="exact"`` reproduces the paper's own attributions (maxdreyer/attributing-clip,
``experiments/compute_attribution_scores.py`` with ``models/clip_vit.py``): the TopKSAE
spliced into the last block's class token with its error detached, cosine scores of
normalised image and text embeddings, A = z_bar * d y_c / d z_bar by plain autograd,
one backward pass per image and class. The checkpoint is written in the paper's format
and read by clipaudit's ``attributing-clip`` reader."""

from __future__ import annotations

import pytest
import torch

from clipaudit.attribution.patching import attribute_cls, attribute_images
from clipaudit.extraction.hooks import HookPoint, VisionTower
from clipaudit.heads import ZeroShotHead
from clipaudit.sae import detect_sae_format, load_sae

from conftest import ReferenceTopKSAE, tiny_backbone

PROMPTS = ["a photo of a mole", "a photo of a ruler", "a close-up of skin"]
K = 6


def _paper_sae(d: int, tmp_path) -> tuple[ReferenceTopKSAE, object]:
    torch.manual_seed(11)
    ref = ReferenceTopKSAE(d, 4 * d, K)
    with torch.no_grad():
        ref.encoder[0].weight_g.copy_(torch.rand_like(ref.encoder[0].weight_g) + 0.5)
        ref.decoder.weight_g.fill_(1.0)
        ref.encoder[0].bias.copy_(torch.randn(4 * d) * 0.1)
    fpath = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"sae.{k}": v for k, v in ref.state_dict().items()},
                "hyper_parameters": {"sae_k": K, "sae_token": "cls", "sae_layer_idx": -1}}, fpath)
    assert detect_sae_format(fpath) == "attributing-clip"
    return ref.eval(), load_sae(fpath, expect_d=d)


def _paper_attributions(model, sae: ReferenceTopKSAE, images, text_out):
    """The reference code's computation, one image and class at a time."""
    visual = model.visual
    last = len(visual.transformer.resblocks) - 1
    holder = {}

    def forward_transformer(x, attn_mask=None):  # models/clip_vit.py, batch-first
        for i, r in enumerate(visual.transformer.resblocks):
            x = r(x, attn_mask=attn_mask)
            if i == last:
                z = sae.encoder(x[:, 0])
                z_bar = z * torch.zeros_like(z).scatter(1, z.topk(sae.k, dim=1).indices, 1.0)
                holder["z_bar"] = z_bar
                x_recon = sae.decoder(z_bar)
                x_recon = x_recon + (x[:, 0] - x_recon).detach()  # add_residual
                x = x.clone()
                x[:, 0] = x_recon + (x[:, 0] - x_recon).detach()
        return x

    visual.transformer.forward = forward_transformer
    try:
        text = text_out / text_out.norm(dim=-1, keepdim=True)
        out = []
        for image in images:
            vis_out = visual(image[None])
            vis_out = vis_out / vis_out.norm(dim=-1, keepdim=True)
            yc_hat = (vis_out @ text.T).squeeze(0)
            per_class = []
            for c in range(len(text)):
                (grad,) = torch.autograd.grad(yc_hat[c], holder["z_bar"], retain_graph=True)
                per_class.append((holder["z_bar"] * grad)[0].detach())
            out.append(torch.stack(per_class, -1))
        return torch.stack(out)  # [n, m, C]
    finally:
        del visual.transformer.forward


@pytest.mark.parametrize("config", ["tiny-vit-a", "tiny-vit-b"])
def test_exact_gradient_reproduces_the_papers_attributions(tmp_path, config):
    backbone = tiny_backbone(config, seed=5)
    model = backbone.model
    tower = VisionTower(model)
    ref, sae = _paper_sae(tower.width, tmp_path)
    with torch.no_grad():
        text_out = backbone.encode_text(PROMPTS)
    head = ZeroShotHead(torch.nn.functional.normalize(text_out, dim=-1), PROMPTS)
    size = backbone.provenance["preprocess"]["size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))

    expected = _paper_attributions(model, ref, images, text_out)
    assert (expected != 0).sum(1).max() <= K and expected.abs().max() > 0

    from_images = attribute_images(images, torch.arange(4), sae, head, tower, HookPoint(-1, "cls"),
                                   gradient="exact")
    tol = 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(from_images.dense(), expected, rtol=1e-4, atol=tol)
    with torch.no_grad():
        pooled = tower.capture(images, HookPoint()).acts
    from_cache = attribute_cls(pooled, torch.arange(4), sae, head, tower, gradient="exact")
    torch.testing.assert_close(from_cache.dense(), expected, rtol=1e-4, atol=tol)
    # clipaudit's default (frozen) differs from the paper's numbers, as documented
    frozen = attribute_cls(pooled, torch.arange(4), sae, head, tower)
    assert not torch.allclose(frozen.dense(), expected, rtol=1e-3, atol=tol)
