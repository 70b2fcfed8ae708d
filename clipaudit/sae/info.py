"""What an SAE file is, and (given activations) how well it reconstructs them."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipaudit.errors import ModelUnavailableError
from clipaudit.extraction.sources import ActivationSource
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.files import check_sae_matches
from clipaudit.sae.formats import import_sae
from clipaudit.sae.metrics import FVU_WARN, SAEMetrics, evaluate_sae
from clipaudit.sae.model import TopKSAE

log = logging.getLogger(__name__)

_SCALE_PROBE_ROWS = 8192


@dataclass(frozen=True)
class SAEInfo:
    path: str
    source_format: str
    d: int
    n_latents: int
    k: int
    relu: bool
    scale: float
    normalisation: str
    backbone: dict[str, Any] | None
    hook: dict[str, Any] | None
    seed: int | None
    stored_metrics: SAEMetrics | None
    """Metrics written with the SAE at training time (None for converted checkpoints)."""
    cache_metrics: SAEMetrics | None
    """Metrics on the activations asked about (``source``), if any."""
    notes: tuple[str, ...]
    """Assumptions and approximations made while converting a foreign checkpoint."""
    warnings: tuple[str, ...]
    created: str | None = None
    clipaudit_version: str | None = None
    activation: str = "topk"
    """``topk`` or ``threshold`` (ReLU, JumpReLU, BatchTopK inference)."""
    threshold: float | None = None
    """The threshold of a ``threshold`` activation (its mean when there is one per latent)."""
    input_norm: str = "none"
    """Per-row input normalisation undone after decoding (none, constant_norm_rescale,
    layer_norm)."""
    architecture: str = ""
    """What the source calls the SAE (BatchTopKSAE, Prisma topk, ...)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sae_info(path: Path | str, *, fmt: str | None = None, k: int | None = None,
             scale: float | None = None, source: ActivationSource | None = None,
             embed_readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
             reporter: Reporter = NULL_REPORTER) -> SAEInfo:
    """Describe an SAE file of any supported format. With ``source``, also refuse a
    mismatched SAE, measure it on those activations and warn when FVU > ``FVU_WARN``."""
    sae = import_sae(path, fmt, k=k, scale=scale)
    meta = sae.meta
    cache_metrics, warnings = None, []
    if source is not None:
        backbone_id = (source.provenance.get("backbone") or {}).get("id")
        check_sae_matches(sae, path, expect_backbone_id=backbone_id,
                          expect_hook=source.provenance.get("hook"), expect_d=source.d)
        cache_metrics = evaluate_sae(sae, source, embed_readout=embed_readout, reporter=reporter)
        if not cache_metrics.fvu <= FVU_WARN:
            warnings.append(_poor_fvu_warning(sae, source, cache_metrics.fvu))
    stored = meta.get("metrics") or None
    return SAEInfo(
        path=str(path), source_format=str(meta.get("source_format", "clipaudit")),
        d=sae.d, n_latents=sae.n_latents, k=sae.k, relu=sae.relu, scale=float(sae.scale),
        normalisation=str(meta.get("normalisation", "")),
        backbone=meta.get("backbone"), hook=meta.get("hook"), seed=meta.get("seed"),
        stored_metrics=SAEMetrics.from_dict(stored) if stored else None,
        cache_metrics=cache_metrics, notes=tuple(meta.get("notes") or ()),
        warnings=tuple(warnings), created=meta.get("created"),
        clipaudit_version=meta.get("clipaudit_version"),
        activation=sae.activation,
        threshold=float(sae.threshold.float().mean()) if sae.activation == "threshold" else None,
        input_norm=sae.input_norm, architecture=str(meta.get("architecture") or ""),
    )


def _poor_fvu_warning(sae: TopKSAE, source: ActivationSource, fvu: float) -> str:
    """Say how poor, and whether scaling the inputs to a mean squared norm of d (the
    usual SAE input normalisation, often missing from published checkpoints) helps."""
    text = (f"FVU {fvu:.3f} on these activations is above {FVU_WARN}: the SAE explains them "
            "poorly (another model or layer, or an input normalisation the checkpoint does "
            "not store)")
    suggested = _norm_d_scale(source) * float(sae.scale)
    if not math.isfinite(suggested) or suggested <= 0:
        return text
    original = float(sae.scale)
    with torch.no_grad():
        sae.scale.fill_(suggested)
        try:
            trial = evaluate_sae(sae, source, max_rows=_SCALE_PROBE_ROWS)
        finally:
            sae.scale.fill_(original)
    if trial.fvu < fvu:
        text += (f"; with inputs scaled to a mean squared norm of d (scale {suggested:.4g}) "
                 f"FVU is {trial.fvu:.3f}: pass --scale {suggested:.4g}")
    return text


def _norm_d_scale(source: ActivationSource) -> float:
    """sqrt(d / mean ||h||^2) over the first rows of ``source``."""
    total, n = 0.0, 0
    for batch in source.iter_batches(1024):
        acts = batch["acts"].double()
        total += float(acts.pow(2).sum())
        n += acts.shape[0]
        if n >= _SCALE_PROBE_ROWS:
            break
    return math.sqrt(source.d * n / total) if total > 0 else float("nan")


def embed_readout_for(provenance: dict[str, Any],
                      device: str | torch.device = "cpu"
                      ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """h -> image embedding for activations recorded at the pooled hook point (or the
    last block's class token of a class-token ViT), from the backbone the provenance
    names; None elsewhere or when that backbone cannot be loaded here."""
    from clipaudit.errors import InputError
    from clipaudit.extraction.backbone import load_backbone_for
    from clipaudit.extraction.hooks import cache_readout

    hook, backbone_prov = provenance.get("hook") or {}, provenance.get("backbone")
    if hook.get("token") not in ("pooled", "cls") or not isinstance(backbone_prov, dict):
        return None
    try:
        backbone = load_backbone_for(backbone_prov, device, text=False)
        return cache_readout(backbone.model, hook)
    except ModelUnavailableError as e:
        log.warning("no embedding check: %s", e)
    except InputError:  # a class token that is not the pooled vector
        pass
    return None
