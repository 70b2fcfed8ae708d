"""CLI verb: extract (images -> activation cache)."""

from __future__ import annotations

from pathlib import Path

import typer

from clipaudit.cli import app
from clipaudit.cli._common import (
    RichReporter,
    err,
    json_option,
    out,
    print_json,
    quiet_option,
    user_errors,
)
from clipaudit.cli._options import option
from clipaudit.extraction.backbone import RANDOM, TINY_MODEL_NAME, BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, ExtractResult, extract
from clipaudit.extraction.data import load_image_source
from clipaudit.extraction.engines import RayConfig, get_engine
from clipaudit.extraction.hooks import HookPoint, describe_hook


@app.command("extract")
@user_errors
def extract_cmd(
    data: str = typer.Argument(..., help="Image folder (one sub-folder per class), a "
                                         ".csv/.parquet manifest, WebDataset .tar shards (a "
                                         "folder, a file or a {000..099} brace pattern), or "
                                         "Parquet / Hugging Face files with image bytes."),
    out_dpath: Path = typer.Option(..., "--out", "-o", help="Cache folder (created or resumed)."),
    model: str | None = typer.Option(None, help=f"open_clip model name, hf-hub:ORG/REPO, or "
                                                f"{TINY_MODEL_NAME} (the bundled demo model)."),
    pretrained: str | None = typer.Option(None, help=f"open_clip pretrained tag, a weights file, or "
                                                     f"{RANDOM} (random weights, for tests)."),
    checkpoint: Path | None = typer.Option(None, help="Local weights file (with --model-config)."),
    model_config: Path | None = typer.Option(None, help="open_clip model-config JSON."),
    layer: int = option(HookPoint, "layer", "--layer"),
    token: str = option(HookPoint, "token", "--token", help="pooled (every tower; what the audit "
                                                             "reads), cls or spatial (transformer "
                                                             "towers, at --layer)."),
    batch_size: int = option(ExtractConfig, "batch_size", "--batch-size", envvar="CLIPAUDIT_BATCH_SIZE"),
    workers: int = option(ExtractConfig, "num_workers", "--workers", envvar="CLIPAUDIT_WORKERS"),
    device: str = option(ExtractConfig, "device", "--device", envvar="CLIPAUDIT_DEVICE"),
    shard_size: int = option(ExtractConfig, "shard_size", "--shard-size"),
    dtype: str = option(ExtractConfig, "store_dtype", "--dtype"),
    worker_index: int = option(ExtractConfig, "worker_index", "--worker-index"),
    worker_count: int = option(ExtractConfig, "worker_count", "--worker-count"),
    path_column: str = typer.Option("path", help="Manifest column with image paths."),
    label_column: str = typer.Option("label", help="Manifest column with labels (optional)."),
    image_column: str | None = typer.Option(None, help="Parquet column with image bytes "
                                            "[default: detected: 'image', 'img', or the only "
                                            "one]."),
    engine: str = option(ExtractConfig, "engine", "--engine"),
    ray_address: str | None = option(ExtractConfig, "ray.address", "--ray-address"),
    ray_actors: int | None = option(ExtractConfig, "ray.actors", "--ray-actors"),
    max_image_pixels: int | None = option(ExtractConfig, "max_image_pixels", "--max-image-pixels",
                                          envvar="CLIPAUDIT_MAX_IMAGE_PIXELS"),
    as_json: bool = json_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Decode images and store the activations at the hook point plus image embeddings.

    Name the model explicitly: --model NAME --pretrained TAG, --checkpoint FILE
    --model-config CONFIG.json, or --model tiny-derm-clip for the bundled demo model."""
    spec = BackboneSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, config=model_config)
    spec.validate()
    config = ExtractConfig(
        backbone=spec, hook=HookPoint(layer, token), batch_size=batch_size,  # type: ignore[arg-type]
        num_workers=workers, shard_size=shard_size, device=device, store_dtype=dtype,
        worker_index=worker_index, worker_count=worker_count, max_image_pixels=max_image_pixels,
        engine=engine, ray=RayConfig(address=ray_address, actors=ray_actors))
    get_engine(engine)  # an unknown engine, or Ray missing, before the data is read
    source = load_image_source(data, path_column=path_column, label_column=label_column,
                               image_column=image_column)
    with RichReporter(quiet=quiet or as_json) as reporter:
        result = extract(source, out_dpath, config, reporter=reporter)
    if as_json:
        print_json(_as_dict(result))
    else:
        out.print(_summary(result), markup=False)
        if not result.complete and not quiet:
            err.print("the index is written by the worker that finishes the last shard")


def _as_dict(result: ExtractResult) -> dict:
    cache = result.cache
    return {
        "out": str(result.dpath), "complete": result.complete, "n_planned": result.n_planned,
        "n_ok": result.n_ok, "n_skipped": result.n_skipped,
        "skipped_reasons": result.skipped_reasons, "n_shards": result.n_shards,
        "shards_written": result.shards_written, "shards_resumed": result.shards_resumed,
        "provenance": cache.provenance if cache else None,
    }


def _summary(result: ExtractResult) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in result.skipped_reasons.items())
    skipped = f"{result.n_skipped} skipped" + (f" ({reasons})" if reasons else "")
    shards = f"{result.shards_written} shards written, {result.shards_resumed} already there"
    if result.cache is not None:
        hook = result.cache.provenance["hook"]
        where = (f"cache {result.dpath} complete (model {_model_words(result.cache.provenance['backbone'])}"
                 f", hook {describe_hook(hook)}, d {result.cache.d})")
    else:
        where = f"cache {result.dpath} incomplete (other workers' shards missing)"
    return f"{result.n_ok} images extracted, {skipped}; {shards}; {where}"


def _model_words(backbone: dict) -> str:
    """The model's id, and what it is when that is not a trained model the user named."""
    ident = str(backbone.get("id"))
    if backbone.get("model") == TINY_MODEL_NAME:
        return f"{ident}, the bundled demo model"
    if str(backbone.get("weights", "")).startswith("random-seed"):
        return f"{ident}, RANDOM weights (--pretrained {RANDOM})"
    return ident
