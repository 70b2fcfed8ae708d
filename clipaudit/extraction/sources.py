"""What the SAE trainer and the attribution code read activations from.

``ActivationSource`` is the contract between the activation cache (disk, sharded,
streamed) and its consumers. ``InMemorySource`` implements it over tensors, for
tests and small experiments; ``clipaudit.extraction.cache_reader.ActivationCache`` implements it
over an extracted cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ActivationSource(Protocol):
    @property
    def d(self) -> int:
        """Width of the residual stream at the hook point."""

    @property
    def n_rows(self) -> int:
        """Number of activation rows (instances; instances x tokens for ``spatial``)."""

    @property
    def provenance(self) -> dict[str, Any]:
        """At least ``backbone`` (the backbone provenance dict, with its ``id``) and
        ``hook`` ({"layer": int >= 0 or None, "token": "pooled" | "cls" | "spatial"})."""

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     fields: Sequence[str] = ("acts",)) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of rows as float32 tensors, ``acts`` [b, d] (spatial tokens flattened
        into rows) and, for pooled and cls caches, optionally ``embeds`` [b, D]. Shuffled
        deterministically from ``seed``; memory bounded by a shard, not the data set.

        Optional keywords a source may take (the SAE trainer passes them only when it
        needs them): ``window_rows`` (shuffle within windows of that many rows) and
        ``skip_batches`` (start after that many batches of the same order)."""


@dataclass
class InMemorySource:
    """An ActivationSource over tensors held in memory."""

    acts: torch.Tensor
    embeds: torch.Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.acts.shape[-1])

    @property
    def n_rows(self) -> int:
        return int(self.acts.reshape(-1, self.d).shape[0])

    def iter_batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                     fields: Sequence[str] = ("acts",), window_rows: int | None = None,
                     skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """As the protocol says; ``window_rows`` is ignored (the rows are in memory)."""
        rows = {"acts": self.acts.reshape(-1, self.d).float()}
        if "embeds" in fields:
            if self.embeds is None or self.acts.dim() != 2:
                raise ValueError("embeds are only available for cls activations")
            rows["embeds"] = self.embeds.float()
        order = (torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(seed))
                 if shuffle else torch.arange(self.n_rows))
        for start in range(skip_batches * batch_size, self.n_rows, batch_size):
            idx = order[start:start + batch_size]
            yield {k: rows[k][idx] for k in fields}
