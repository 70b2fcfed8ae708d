"""The ``local`` extraction engine: DataLoader workers decode, this process runs the model."""

from __future__ import annotations

from clipaudit.extraction.cache import STORE_DTYPES, EncodedBatch
from clipaudit.extraction.data import iter_decoded
from clipaudit.extraction.engines import EncodeJob, run_tower
from clipaudit.progress import Reporter


def encode_local(job: EncodeJob, reporter: Reporter) -> None:
    """Decode and encode ``job.batches`` in order, handing each to ``job.writer``."""
    config, backbone = job.config, job.backbone
    device, dtype = backbone.device, STORE_DTYPES[config.store_dtype]
    decoded = iter_decoded(job.items, backbone.preprocess, batches=job.batches,
                           num_workers=config.num_workers, max_pixels=config.max_image_pixels,
                           pin_memory=device.type == "cuda")
    with reporter.task("extract", total=sum(len(b) for b in job.batches)) as task:
        for batch, rows in zip(decoded, job.batches):
            acts = embeds = None
            if batch.ids.numel():
                acts, embeds = run_tower(job.tower, batch.images.to(device, non_blocking=True),
                                         config.hook, dtype, config.batch_size)
            job.writer.add(EncodedBatch(shard=rows[0] // config.shard_size, n_rows=len(rows),
                                        ids=batch.ids, acts=acts, embeds=embeds,
                                        skipped=batch.skipped, sha256=batch.sha256))
            task.advance(len(rows), skipped=job.writer.n_skipped)
