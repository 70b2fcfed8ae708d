"""CLI verbs: train-sae (activation cache -> SAE file) and sae-info (what an SAE file is)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

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
from clipaudit.sae.config import SAETrainConfig


@app.command("train-sae")
@user_errors
def train_sae_cmd(
    cache: Path = typer.Argument(..., help="Activation cache folder (clipaudit extract)."),
    out_fpath: Path = typer.Option(..., "--out", "-o", help="SAE file to write (.safetensors)."),
    expansion: int | None = option(SAETrainConfig, "expansion", "--expansion"),
    n_latents: int | None = option(SAETrainConfig, "n_latents", "--n-latents"),
    k: int | None = option(SAETrainConfig, "k", "--k"),
    steps: int | None = option(SAETrainConfig, "steps", "--steps"),
    epochs: float | None = option(SAETrainConfig, "epochs", "--epochs"),
    batch_size: int = option(SAETrainConfig, "batch_size", "--batch-size", envvar="CLIPAUDIT_SAE_BATCH_SIZE"),
    lr: float | None = option(SAETrainConfig, "lr", "--lr"),
    seed: int = option(SAETrainConfig, "seed", "--seed"),
    device: str = option(SAETrainConfig, "device", "--device", envvar="CLIPAUDIT_DEVICE"),
    bf16: bool = option(SAETrainConfig, "bf16", "--bf16/--no-bf16"),
    shuffle_window: int | None = option(SAETrainConfig, "shuffle_window", "--shuffle-window"),
    checkpoint_every: int | None = option(SAETrainConfig, "checkpoint_every",
                                          "--checkpoint-every"),
    embed_check: bool = typer.Option(True, help="Measure the image-embedding cosine (needs "
                                                "the cache's model)."),
    as_json: bool = json_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Train a TopK SAE on an activation cache and print its metrics."""
    from clipaudit.sae import train_sae_on_cache

    config = SAETrainConfig(n_latents=n_latents, expansion=expansion, k=k, steps=steps,
                            epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                            bf16=bf16, shuffle_window=shuffle_window,
                            checkpoint_every=checkpoint_every)
    with RichReporter(quiet=quiet or as_json) as reporter:
        result = train_sae_on_cache(cache, out_fpath, config, embed_check=embed_check,
                                    reporter=reporter)
    sae = result.sae
    if as_json:
        print_json({"out": str(out_fpath), "d": sae.d, "n_latents": sae.n_latents, "k": sae.k,
                    "steps": result.steps, "seed": seed, "metrics": result.metrics.as_dict(),
                    "settings": result.settings.as_dict() if result.settings else None,
                    "coverage": [_as_plain(c) for c in result.coverage]})
        return
    if result.settings is not None:
        out.print(_settings_text(result.settings), markup=False)
        for warning in result.settings.warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}", markup=True)
    out.print(f"SAE {sae.n_latents} latents, k={sae.k}, d={sae.d}, {result.steps} steps "
              f"-> {out_fpath}", markup=False)
    out.print(_metrics_text(result.metrics.as_dict()), markup=False)
    if result.coverage:
        out.print(_coverage_text(result.coverage), markup=False)


def _settings_text(settings) -> str:
    """The settings, one line each, with why each has its value."""
    lines = [f"SAE settings for d={settings.d}, {settings.n_rows:,} rows "
             f"({settings.n_latents:,} latents, each firing on ~{settings.rows_per_latent:,.0f} "
             "rows on average):"]
    for c in settings.choices:
        why = "given" if c.given else f"from the data: {c.reason}"
        lines.append(f"  {c.name:<10} {c.value:>7,}  {why}")
    return "\n".join(lines)


def _coverage_text(rows) -> str:
    """Per declared artifact column: the best single component's AUC beside a linear
    probe's (decodable but not isolated: findings about the column are blind)."""
    lines = ["can the SAE see the declared artifact columns? (ROC AUC)",
             f"  {'column':<24} {'linear probe':>12} {'best component':>15}"]
    for r in rows:
        probe = getattr(r, "decodable_auc", None)
        best = getattr(r, "best_component_auc", None)
        where = f" (#{r.best_component})" if getattr(r, "best_component", None) is not None else ""
        lines.append(f"  {r.column:<24} {_auc(probe):>12} {_auc(best) + where:>15}")
    return "\n".join(lines)


def _auc(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _as_plain(obj):
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj


@app.command("sae-info")
@user_errors
def sae_info_cmd(
    fpath: Path = typer.Argument(..., help="SAE file or folder (clipaudit, SAELens, saev, "
                                           "attributing-clip)."),
    cache: Path | None = typer.Option(None, help="Also measure the SAE on this cache."),
    fmt: str | None = typer.Option(None, "--format", help="clipaudit, saelens, saev or "
                                   "attributing-clip (default: detected)."),
    k: int | None = typer.Option(None, help="k for checkpoints that do not store it."),
    scale: float | None = typer.Option(None, help="Input scale the checkpoint was trained with."),
    as_json: bool = json_option(),
    quiet: bool = quiet_option(),
) -> None:
    """Print what an SAE file is, its stored metrics and (with --cache) its FVU there."""
    from clipaudit.sae import embed_readout_for, sae_info

    source = readout = None
    if cache is not None:
        from clipaudit.extraction.cache import open_cache

        source = open_cache(cache)
        readout = embed_readout_for(source.provenance)
    with RichReporter(quiet=quiet or as_json) as reporter:
        info = sae_info(fpath, fmt=fmt, k=k, scale=scale, source=source, embed_readout=readout,
                        reporter=reporter)
    if as_json:
        print_json(info.as_dict())
        return
    out.print(_info_text(info, cache), markup=False)
    for warning in info.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", markup=True)


def _info_text(info, cache: Path | None) -> str:
    from clipaudit.extraction.hooks import describe_hook

    backbone = (info.backbone or {}).get("id", "unknown (not recorded)")
    hook = describe_hook(info.hook) if info.hook else "unknown (not recorded)"
    if info.activation == "threshold":
        rule = (f"active where ReLU(pre) > {info.threshold:.4g}" if info.threshold else
                "ReLU: every positive latent active")
        kind = f"threshold SAE ({rule}; nominal k={info.k})"
    else:
        kind = f"TopK SAE, k={info.k}{'' if info.relu else ' (top-k without ReLU)'}"
    arch = f" [{info.architecture}]" if info.architecture else ""
    lines = [f"{info.path}: format {info.source_format}{arch}, {kind}, d={info.d}, "
             f"{info.n_latents} latents",
             f"  normalisation: {info.normalisation or 'none'}; input scale {info.scale:.6g}; "
             f"seed {info.seed}",
             f"  backbone {backbone}; hook {hook}"]
    lines += [f"  note: {note}" for note in info.notes]
    if info.stored_metrics is not None:
        lines += [f"stored metrics (training data, {info.stored_metrics.n_rows} rows):",
                  _metrics_text(info.stored_metrics.as_dict())]
    if info.cache_metrics is not None:
        lines += [f"on {cache} ({info.cache_metrics.n_rows} rows):",
                  _metrics_text(info.cache_metrics.as_dict())]
    return "\n".join(lines)


def _metrics_text(metrics: dict) -> str:
    lines = [f"  FVU            {metrics['fvu']:.4f}",
             f"  cosine         {metrics['cosine']:.4f}",
             f"  L0             {metrics['l0']:.2f}",
             f"  dead fraction  {metrics['dead_fraction']:.2%}"]
    embed = metrics.get("embed_cosine")
    lines.append(f"  embed cosine   {embed:.4f}" if embed is not None
                 else "  embed cosine   n/a (hook point is not the last block's CLS token)")
    return "\n".join(lines)
