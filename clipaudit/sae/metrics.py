"""How good an SAE is on a set of activations: one streaming pass, constant memory."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipaudit.extraction.sources import ActivationSource
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.model import TopKSAE

FVU_WARN = 0.3
"""Above this FVU an SAE explains too little of the data to audit with (often: the
input normalisation it was trained with is missing)."""


@dataclass(frozen=True)
class SAEMetrics:
    fvu: float
    """Fraction of variance unexplained: sum ||h - h_hat||^2 / sum ||h - mean(h)||^2."""
    cosine: float
    """Mean cosine between each row and its reconstruction."""
    l0: float
    """Mean number of non-zero codes per row."""
    dead_fraction: float
    """Share of latents that never fired over the ``n_rows`` rows evaluated."""
    embed_cosine: float | None
    """Mean cosine between the image embedding from h and the one from h_hat (the
    downstream check); None without a readout."""
    n_rows: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SAEMetrics:
        return cls(**{f.name: doc.get(f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, source: ActivationSource, *,
                 embed_readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 batch_size: int = 1024, max_rows: int | None = None,
                 reporter: Reporter = NULL_REPORTER) -> SAEMetrics:
    """FVU, cosine, L0, dead fraction and (with ``embed_readout``: h -> image embedding)
    the embedding cosine of ``sae`` on the rows of ``source``."""
    acc = _Accumulator(sae.d, sae.n_latents)
    total = math.ceil(min(source.n_rows, max_rows or source.n_rows) / batch_size)
    task = reporter.task("evaluate SAE", total=total)
    try:
        for batch in source.iter_batches(batch_size):
            h_nd = batch["acts"].to(sae.device, torch.float32)
            if max_rows is not None:
                h_nd = h_nd[: max_rows - acc.n]
            codes = sae.encode(h_nd)
            h_hat = sae.decode(codes)
            embed_cos = None
            if embed_readout is not None:
                embed_cos = F.cosine_similarity(embed_readout(h_nd), embed_readout(h_hat), dim=-1)
            acc.add(h_nd, h_hat, codes.indices, codes.values, embed_cos)
            task.advance(1)
            if max_rows is not None and acc.n >= max_rows:
                break
    finally:
        task.close()
    return acc.result()


class _Accumulator:
    def __init__(self, d: int, n_latents: int):
        self.n = 0
        self.sum_sq_err = self.sum_sq = self.sum_cos = self.sum_l0 = self.sum_embed = 0.0
        self.sum_h = torch.zeros(d, dtype=torch.float64)
        self.fired = torch.zeros(n_latents, dtype=torch.bool)
        self.has_embed = False

    def add(self, h_nd: torch.Tensor, h_hat: torch.Tensor, indices_nk: torch.Tensor,
            values_nk: torch.Tensor, embed_cos: torch.Tensor | None) -> None:
        h64, hat64 = h_nd.double(), h_hat.double()
        self.n += h_nd.shape[0]
        self.sum_sq_err += float((h64 - hat64).pow(2).sum())
        self.sum_sq += float(h64.pow(2).sum())
        self.sum_h += h64.sum(0).cpu()
        self.sum_cos += float(F.cosine_similarity(h64, hat64, dim=-1).sum())
        active = values_nk != 0
        self.sum_l0 += float(active.sum())
        self.fired[indices_nk[active].cpu()] = True
        if embed_cos is not None:
            self.has_embed = True
            self.sum_embed += float(embed_cos.double().sum())

    def result(self) -> SAEMetrics:
        n = max(self.n, 1)
        total_var = self.sum_sq - float(self.sum_h.pow(2).sum()) / n
        fvu = self.sum_sq_err / total_var if total_var > 0 else float("nan")
        return SAEMetrics(
            fvu=fvu,
            cosine=self.sum_cos / n,
            l0=self.sum_l0 / n,
            dead_fraction=1.0 - float(self.fired.float().mean()),
            embed_cosine=self.sum_embed / n if self.has_embed else None,
            n_rows=self.n,
        )
