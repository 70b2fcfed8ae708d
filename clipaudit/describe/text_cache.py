"""Text embeddings computed once per model: an on-disk cache for concept vocabularies
and class texts.

Labelling components against a vocabulary of tens of thousands of concepts (the paper
uses ImageNet-21k lemmas) costs one text-encoder pass per phrasing and template. The
cache keeps every text's embedding keyed by the reference model's id (its name and
weights hash, ``Backbone.id``) and the exact text, so a vocabulary is encoded once per
model and later audits only encode texts they have not seen.

Layout: ``<root>/<sha256(model id)[:16]>/part-<random>.safetensors``, each part a
versioned clipaudit file (kind ``text-embeddings``) holding ``embeds`` [n, D] float32
and, in its header, the model id and the n texts. New texts are added as a new part
(written atomically), so concurrent audits never corrupt the cache; a part that cannot
be read is skipped with a warning (its texts are encoded again). ``root`` defaults to
``$XDG_CACHE_HOME/clipaudit/text-embeddings`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from clipaudit.errors import ClipAuditError

log = logging.getLogger(__name__)

KIND = "text-embeddings"
BATCH = 512
"""Texts per encoder call when filling the cache."""


def default_text_cache_dpath() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipaudit" / "text-embeddings"


def resolve_text_cache(setting: str | Path | None) -> Path | None:
    """``auto`` (or None): the default folder; ``off``: no cache; else a folder."""
    if setting is None or str(setting) == "auto":
        return default_text_cache_dpath()
    if str(setting) == "off":
        return None
    return Path(setting)


class TextEmbeddingCache:
    """The cached embeddings of one model's texts."""

    def __init__(self, root: Path | str, model_id: str) -> None:
        self.model_id = model_id
        self.dpath = Path(root) / hashlib.sha256(model_id.encode()).hexdigest()[:16]
        self._rows: dict[str, torch.Tensor] = {}
        self._loaded = False

    def _load(self) -> None:
        from clipaudit.artifacts import load_tensors

        self._loaded = True
        for fpath in sorted(self.dpath.glob("part-*.safetensors")):
            try:
                f = load_tensors(fpath, KIND)
            except ClipAuditError as e:
                log.warning("text cache: skipping %s (%s)", fpath, e)
                continue
            texts, embeds = f.meta.get("texts"), f.tensors.get("embeds")
            if f.meta.get("model_id") != self.model_id or not isinstance(texts, list) \
                    or embeds is None or len(texts) != embeds.shape[0]:
                log.warning("text cache: skipping %s (not this model's, or malformed)", fpath)
                continue
            for text, row in zip(texts, embeds):
                self._rows.setdefault(text, row)

    def __len__(self) -> int:
        if not self._loaded:
            self._load()
        return len(self._rows)

    def encode(self, texts: Sequence[str], encoder: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings [len(texts), D] (float32): cached rows, the rest encoded (in batches
        of ``BATCH``) and added to the cache as one new part."""
        if not self._loaded:
            self._load()
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            new = torch.cat([encoder(missing[s:s + BATCH]).detach().float().cpu()
                             for s in range(0, len(missing), BATCH)])
            self._save(missing, new)
            for text, row in zip(missing, new):
                self._rows[text] = row
            log.info("text cache: encoded %d new texts for %s (%d cached)", len(missing),
                     self.model_id, len(texts) - len(missing))
        if not texts:
            return torch.empty(0, 0)
        return torch.stack([self._rows[t] for t in texts])

    def _save(self, texts: list[str], embeds: torch.Tensor) -> None:
        from clipaudit.artifacts import save_tensors

        try:
            self.dpath.mkdir(parents=True, exist_ok=True)
            save_tensors(self.dpath / f"part-{uuid.uuid4().hex[:16]}.safetensors", KIND,
                         {"embeds": embeds.contiguous()}, {"model_id": self.model_id, "texts": texts},
                         provenance={"model_id": self.model_id})
        except OSError as e:  # a read-only or full cache folder must not fail the audit
            log.warning("text cache: could not write to %s (%s); continuing without it", self.dpath, e)


def cached_text_encoder(encoder: Callable[[list[str]], torch.Tensor], model_id: str,
                        root: Path | None) -> Callable[[list[str]], torch.Tensor]:
    """``encoder`` with its results cached under ``root`` for ``model_id`` (None: no cache)."""
    if root is None:
        return encoder
    cache = TextEmbeddingCache(root, model_id)

    def encode(texts: list[str]) -> torch.Tensor:
        out = cache.encode(list(texts), encoder)
        return out if len(texts) else encoder(list(texts))

    return encode
