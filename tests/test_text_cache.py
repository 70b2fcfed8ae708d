"""The text-embedding cache: a vocabulary is encoded once per model."""

from __future__ import annotations

import logging

import torch

from clipaudit.describe.text_cache import (
    TextEmbeddingCache,
    cached_text_encoder,
    default_text_cache_dpath,
    resolve_text_cache,
)


class CountingEncoder:
    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.seed = seed
        self.dim = dim

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(hash((self.seed, t)) % 2**31))
                for t in texts]
        return torch.stack(rows) if rows else torch.empty(0, self.dim)


def test_texts_are_encoded_once_per_model_and_come_back_identical(tmp_path):
    vocab = [f"concept {i}" for i in range(1200)]
    enc = CountingEncoder()
    first = cached_text_encoder(enc, "model-a@sha256:1", tmp_path)(vocab)
    assert sum(map(len, enc.calls)) == 1200 and max(map(len, enc.calls)) <= 512  # batched
    torch.testing.assert_close(first, enc(vocab))
    enc.calls.clear()
    again = cached_text_encoder(enc, "model-a@sha256:1", tmp_path)(["concept 7", "new", *vocab[:3]])
    assert enc.calls == [["new"]]  # a later audit (new process) encodes only what is new
    torch.testing.assert_close(again[0], first[7])
    other = CountingEncoder(seed=1)
    cached_text_encoder(other, "model-b@sha256:2", tmp_path)(vocab[:5])
    assert sum(map(len, other.calls)) == 5  # another model's embeddings are not reused
    assert len(list(tmp_path.iterdir())) == 2


def test_a_damaged_part_is_skipped_and_its_texts_encoded_again(tmp_path, caplog):
    enc = CountingEncoder()
    cached_text_encoder(enc, "m", tmp_path)(["a", "b"])
    (part,) = list(TextEmbeddingCache(tmp_path, "m").dpath.glob("part-*.safetensors"))
    part.write_bytes(b"not a safetensors file")
    enc.calls.clear()
    with caplog.at_level(logging.WARNING):
        out = cached_text_encoder(enc, "m", tmp_path)(["a", "b"])
    assert enc.calls == [["a", "b"]] and out.shape == (2, 8)
    assert "skipping" in caplog.text


def test_an_unwritable_cache_does_not_fail_the_encoding(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    enc = CountingEncoder()
    with caplog.at_level(logging.WARNING):
        out = cached_text_encoder(enc, "m", blocker / "cache")(["a"])
    assert out.shape == (1, 8) and "could not write" in caplog.text


def test_settings_name_the_default_folder_none_or_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_text_cache_dpath() == tmp_path / "clipaudit" / "text-embeddings"
    assert resolve_text_cache("auto") == default_text_cache_dpath()
    assert resolve_text_cache("off") is None
    assert resolve_text_cache(str(tmp_path / "x")) == tmp_path / "x"
    enc = CountingEncoder()
    assert cached_text_encoder(enc, "m", None) is enc
