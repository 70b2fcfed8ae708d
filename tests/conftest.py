"""Shared fixtures: tiny open_clip models (one per image-tower family in tests/configs/)
built from configs with random weights.

Nothing here touches the network; every model is a few hundred kB of random weights.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone

CONFIGS_DPATH = Path(__file__).parent / "configs"
TINY_CONFIGS = ("tiny-vit-a", "tiny-vit-b")


def tiny_backbone(name: str = "tiny-vit-a", seed: int = 0) -> Backbone:
    """A tiny random-weight ViT CLIP from tests/configs/<name>.json."""
    return load_backbone(BackboneSpec(model=name, config=CONFIGS_DPATH / f"{name}.json",
                                       pretrained="random", seed=seed))


@functools.cache
def image_tower(name: str) -> Backbone:
    """The image tower alone of tests/configs/<name>.json, random weights (built once)."""
    return load_backbone(BackboneSpec(config=CONFIGS_DPATH / f"{name}.json", pretrained="random",
                                      seed=3), text=False)


def images_for(backbone: Backbone, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = backbone.provenance["preprocess"]["size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


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


# ---------------------------------------------------------------- container inputs

LABELS = ("benign", "malignant")


def png_bytes(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def image_samples(n: int) -> list[dict]:
    return [{"key": f"{i:06d}", "png": png_bytes(i), "label": LABELS[i % 2],
             "caption": f"image number {i}", "meta": {"width": 48, "source": f"s{i % 3}",
                                                       "nested": {"a": i}}}
            for i in range(n)]


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tars(dpath: Path, samples: list[dict], per_tar: int) -> list[Path]:
    dpath.mkdir(parents=True, exist_ok=True)
    out = []
    for t in range(0, len(samples), per_tar):
        fpath = dpath / f"{t // per_tar:05d}.tar"
        with tarfile.open(fpath, "w") as tf:
            for s in samples[t:t + per_tar]:
                add_member(tf, f"{s['key']}.png", s["png"])
                add_member(tf, f"{s['key']}.cls", s["label"].encode())
                add_member(tf, f"{s['key']}.txt", s["caption"].encode())
                add_member(tf, f"{s['key']}.json", json.dumps(s["meta"]).encode())
        out.append(fpath)
    return out


def write_manifest(dpath: Path, samples: list[dict]) -> Path:
    (dpath / "files").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        (dpath / "files" / f"{s['key']}.png").write_bytes(s["png"])
        rows.append({"path": f"files/{s['key']}.png", "label": s["label"]})
    pd.DataFrame(rows).to_csv(dpath / "manifest.csv", index=False)
    return dpath / "manifest.csv"


def write_hf_parquet(fpath: Path, samples: list[dict], row_group_size: int = 4) -> Path:
    """A Hugging Face ``datasets``-style file: image structs and a ClassLabel column."""
    table = pa.table({
        "image": pa.array([{"bytes": s["png"], "path": f"{s['key']}.png"} for s in samples],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([LABELS.index(s["label"]) for s in samples], pa.int64()),
        "source": pa.array([s["meta"]["source"] for s in samples]),
        "tags": pa.array([[s["key"]] for s in samples]),
    })
    features = {"image": {"_type": "Image"},
                "label": {"names": list(LABELS), "_type": "ClassLabel"},
                "source": {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    fpath.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, fpath, row_group_size=row_group_size)
    return fpath
def topk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    idx = pre.topk(k, dim=-1).indices
    return torch.zeros_like(pre).scatter(-1, idx, 1.0)


class ReferenceTopKSAE(torch.nn.Module):
    """maxdreyer/attributing-clip model_training/sae.py, the parts that matter."""

    def __init__(self, input_dim: int, hidden_dim: int, k: int, parametrizations: bool = False):
        super().__init__()
        self.k = k
        linear_enc = torch.nn.Linear(input_dim, hidden_dim)
        linear_dec = torch.nn.Linear(hidden_dim, input_dim, bias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates the old weight_norm
            if parametrizations:
                from torch.nn.utils.parametrizations import weight_norm
            else:
                from torch.nn.utils import weight_norm
            self.encoder = torch.nn.Sequential(weight_norm(linear_enc))
            self.decoder = weight_norm(linear_dec, dim=1)

    def forward(self, x):
        z = self.encoder(x)
        z_bar = z * topk_mask(z, self.k)
        return self.decoder(z_bar), z, z_bar
