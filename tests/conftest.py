"""Shared fixtures: tiny open_clip ViTs built from configs with random weights.

Nothing here touches the network; every model is a few hundred kB of random weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipaudit.backbone import Backbone, BackboneSpec, load_backbone

CONFIGS_DPATH = Path(__file__).parent / "configs"
TINY_CONFIGS = ("tiny-vit-a", "tiny-vit-b")


def tiny_backbone(name: str = "tiny-vit-a", seed: int = 0) -> Backbone:
    """A tiny random-weight ViT CLIP from tests/configs/<name>.json."""
    return load_backbone(BackboneSpec(model=name, config=CONFIGS_DPATH / f"{name}.json", seed=seed))


@pytest.fixture(params=TINY_CONFIGS)
def any_tiny_backbone(request) -> Backbone:
    return tiny_backbone(request.param)


@pytest.fixture
def tiny_a() -> Backbone:
    return tiny_backbone("tiny-vit-a")


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
