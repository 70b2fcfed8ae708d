"""Shared fixtures: tiny open_clip ViTs built from configs with random weights.

Nothing here touches the network; every model is a few hundred kB of random weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone

CONFIGS_DPATH = Path(__file__).parent / "configs"
TINY_CONFIGS = ("tiny-vit-a", "tiny-vit-b")


def tiny_backbone(name: str = "tiny-vit-a", seed: int = 0) -> Backbone:
    """A tiny random-weight ViT CLIP from tests/configs/<name>.json."""
    return load_backbone(BackboneSpec(model=name, config=CONFIGS_DPATH / f"{name}.json", seed=seed))


@pytest.fixture(autouse=True, scope="session")
def _private_cache_home(tmp_path_factory):
    """Tests never write to the user's ~/.cache (the text-embedding cache lives there)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    patch.undo()


@pytest.fixture(params=TINY_CONFIGS)
def any_tiny_backbone(request) -> Backbone:
    return tiny_backbone(request.param)


@pytest.fixture
def tiny_a() -> Backbone:
    return tiny_backbone("tiny-vit-a")


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class RefTopKSAE(torch.nn.Module):
    """A straightforward TopK SAE with the interface the attribution code expects
    (W_enc [m, d], b_enc, W_dec [d, m] with unit columns, b_dec, scale), written
    independently of clipaudit.sae so attribution tests check against plain maths."""

    def __init__(self, d: int, n_latents: int, k: int, seed: int = 0, scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d, self.n_latents, self.k = d, n_latents, k
        w_dec = torch.randn(d, n_latents, generator=g)
        self.W_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=0, keepdim=True))
        self.W_enc = torch.nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.randn(n_latents, generator=g) * 0.01)
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=g) * 0.1)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def encode_dense(self, h: torch.Tensor) -> torch.Tensor:
        pre = (h * self.scale - self.b_dec) @ self.W_enc.T + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def encode(self, h: torch.Tensor):
        from types import SimpleNamespace

        pre = (h * self.scale - self.b_dec) @ self.W_enc.T + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        return SimpleNamespace(indices=idx, values=torch.relu(vals))

    def decode(self, codes) -> torch.Tensor:
        z = torch.zeros(*codes.indices.shape[:-1], self.n_latents).scatter(
            -1, codes.indices, codes.values)
        return self.decode_dense(z)

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec.T + self.b_dec) / self.scale
