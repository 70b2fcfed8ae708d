"""The audit's one pass over the activation cache.

Shard by shard: encode with the SAE once; feed the codes to the top-m accumulator
(component descriptions), to every head's relevance accumulator (each instance's
attribution to its own class) and, when asked, to the attribution table; spill them to
a scratch folder for the later passes (statistics, permutation control, evidence).
Kept per instance: the predicted and assigned class of each head (int64), nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipaudit.attribution.patching import Relevance
from clipaudit.attribution.spill import CodeSpill
from clipaudit.attribution.stream import ClsReadout, RelevanceAccumulator, attribute_batch
from clipaudit.attribution.table import AttributionTableConfig, AttributionTableWriter
from clipaudit.describe.components import TopActivations, TopActivationsAccumulator
from clipaudit.extraction.cache_reader import ActivationCache
from clipaudit.extraction.readout import PooledReadout
from clipaudit.heads import Head
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)

_PREACT_FLOATS = 1 << 25
"""Encoder pre-activations per encoding step ([rows, n_latents] float32: 128 MB)."""


@dataclass
class HeadPass:
    """One head over the whole data: predictions, class assignment and relevance."""

    head: Head
    index: int
    """Position of the head in the audit (names the spilled scalars)."""
    truth: np.ndarray
    """int64 [n]: each instance's label as a class index of the head (-1 unlabelled,
    -2 a label of no class of the head)."""
    by: str
    """``label`` (instances assigned by label, by prediction where it is unknown) or
    ``prediction`` (no labels at all)."""
    pred: np.ndarray
    """int64 [n] predicted class."""
    assign: np.ndarray
    """int64 [n] class each instance's evidence counts for (-1: left out, a label of no
    class)."""
    readout: ClsReadout | None = None
    relevance: Relevance | None = None
    table: Path | None = None

    @property
    def inv_name(self) -> str:
        """The spilled per-instance scalar ``dec`` (``stream.BatchAttribution.dec``)."""
        return f"inv-{self.index}"

    def class_positions(self) -> list[np.ndarray]:
        """Per class, the rows assigned to it (ascending); rows left out (-1) in none."""
        kept = np.flatnonzero(self.assign >= 0)
        order = kept[np.argsort(self.assign[kept], kind="stable")]
        counts = np.bincount(self.assign[kept], minlength=len(self.head.class_names))
        return np.split(order, np.cumsum(counts)[:-1])


@dataclass
class FirstPass:
    heads: list[HeadPass]
    top: TopActivations | None
    fire_counts: torch.Tensor
    """long [n_latents]: rows where each component is non-zero."""
    spill: CodeSpill


def encode_rows(sae: SAE, batch_size: int) -> int:
    """Rows per SAE encoding step: ``batch_size``, fewer for wide SAEs (bounded memory)."""
    return max(1, min(batch_size, _PREACT_FLOATS // max(1, sae.n_latents)))


@torch.no_grad()
def first_pass(cache: ActivationCache, sae: SAE, heads: Sequence[Head], tower: PooledReadout,
               truths: Sequence[np.ndarray], has_labels: bool, spill_dpath: Path, *,
               batch_size: int, top_m: int | None, table: AttributionTableConfig,
               out_dpath: Path, reporter: Reporter = NULL_REPORTER) -> FirstPass:
    """One pass over ``cache`` (rows in ``cache.ok_index`` order); ``truths[i]``: head i's
    label indices per row. ``top_m`` None: no top activations (descriptions reused or
    made on another reference set)."""
    n = cache.n_ok
    by = "label" if has_labels else "prediction"
    passes = [HeadPass(h, i, truths[i], by, np.zeros(n, np.int64), np.zeros(n, np.int64))
              for i, h in enumerate(heads)]
    accs = [RelevanceAccumulator(sae.n_latents, len(h.class_names)) for h in heads]
    spill = CodeSpill(spill_dpath, n, tuple(p.inv_name for p in passes))
    top = TopActivationsAccumulator(sae.n_latents, top_m) if top_m else None
    fire_counts = torch.zeros(sae.n_latents, dtype=torch.long)
    writers = [AttributionTableWriter(out_dpath / f"attributions-{h.name}", h.class_names,
                                      table.classes, {"head": h.name}) if table.write else None
               for h in heads]
    step = encode_rows(sae, batch_size)
    row = 0
    with reporter.task("encoding and attributing", total=n) as task:
        for shard in cache.iter_shards(("acts", "ids")):
            for start in range(0, len(shard["ids"]), step):
                h = shard["acts"][start:start + step]
                ids = shard["ids"][start:start + step]
                codes = sae.encode(h)
                values = codes.values.float()
                if top is not None:
                    top.update(ids, codes)
                fire_counts += torch.bincount(codes.indices[values != 0], minlength=sae.n_latents)
                rows = slice(row, row + len(ids))
                scalars = {}
                for p, acc, writer in zip(passes, accs, writers):
                    batch = attribute_batch(h, codes, sae, p.head, tower, p.readout)
                    p.readout = batch.readout
                    pred = batch.predictions
                    truth = torch.from_numpy(p.truth[rows])
                    # labelled: its class; unlabelled: its prediction; a label of no class: out
                    assign = (torch.where(truth >= 0, truth, torch.where(truth == -1, pred, -1))
                              if has_labels else pred)
                    acc.add(batch, assign)
                    p.pred[rows], p.assign[rows] = pred.numpy(), assign.numpy()
                    scalars[p.inv_name] = batch.dec
                    if writer is not None:
                        writer.add(ids, batch, truth)
                spill.append(codes.indices, values, scalars)
                row += len(ids)
                task.advance(len(ids))
            for writer in writers:
                if writer is not None:
                    writer.flush()
    spill.finish()
    for p, acc, writer in zip(passes, accs, writers):
        p.relevance = acc.result(by)
        if writer is not None:
            p.table = writer.close()
    log.info("first pass: %d rows, spill %.1f MB", n, spill.nbytes_on_disk() / 1e6)
    return FirstPass(passes, top.result() if top is not None else None, fire_counts, spill)



@torch.no_grad()
def relevance_over_spill(spill: CodeSpill, readout: ClsReadout, inv_name: str,
                         assign: np.ndarray, by: str) -> Relevance:
    """Per-class relevance from the spilled codes for another assignment of instances to
    classes (the permutation control). The error and bias terms are not spilled, so the
    result's ``error_mean`` and ``bias_mean`` are zero: only the shares are meant."""
    n_classes, n_latents = readout.latent_dirs.shape
    sums = torch.zeros(n_latents * n_classes, dtype=torch.float64)
    inv = spill.scalar(inv_name)
    for start, idx, z in spill.chunks():
        cls = torch.from_numpy(assign[start:start + len(idx)])
        keep = cls >= 0
        cls, idx, z = cls[keep], idx[keep], z[keep]
        values = z * readout.latent_dirs[cls[:, None], idx] * inv[start:start + len(keep)][keep][:, None]
        fired = z != 0
        sums.index_add_(0, (idx * n_classes + cls[:, None])[fired], values[fired].double())
    counts = torch.from_numpy(np.bincount(assign[assign >= 0], minlength=n_classes))
    mean = (sums.reshape(n_latents, n_classes) / counts.clamp_min(1)).float()
    share = mean / mean.abs().sum(0, keepdim=True).clamp_min(1e-12)
    zeros = torch.zeros(n_classes)
    return Relevance(mean, share, counts.long(), zeros, zeros.clone(), by)
