"""CLI verbs: fit-probe, explain."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from clipaudit.attribution.explain import ExplainConfig
from clipaudit.cli import app
from clipaudit.cli._common import err, json_option, out, print_json, quiet_option, user_errors
from clipaudit.cli._options import option
from clipaudit.heads import ProbeConfig


@app.command("fit-probe")
@user_errors
def fit_probe_cmd(
    cache: Path = typer.Argument(..., help="Activation cache folder (clipaudit extract)."),
    out_fpath: Path = typer.Option(..., "--out", "-o", help="Probe file to write (.safetensors)."),
    label_column: str = typer.Option("label", help="Index column holding the class labels."),
    normalisation: str = option(ProbeConfig, "normalisation", "--normalisation",
                                help="Input normalisation: none, l2 or standardize."),
    seed: int = option(ProbeConfig, "seed", "--seed",
                       help="Seed for the held-out split and the solver."),
    as_json: bool = json_option("the metrics"),
    quiet: bool = quiet_option(),
) -> None:
    """Fit a multinomial logistic-regression probe on cached image embeddings."""
    from clipaudit.errors import InputError
    from clipaudit.heads import NORMALISATIONS, fit_probe_on_cache, save_probe

    if normalisation not in NORMALISATIONS:
        raise InputError(f"--normalisation {normalisation!r}: expected one of {', '.join(NORMALISATIONS)}")
    fit = fit_probe_on_cache(cache, label_column=label_column,
                             config=ProbeConfig(normalisation=normalisation, seed=seed))  # type: ignore[arg-type]
    save_probe(fit.probe, out_fpath)
    if as_json:
        print_json({"probe": str(out_fpath), **fit.metrics})
        return
    if quiet:
        out.print(f"{out_fpath}: held-out accuracy {fit.metrics['heldout_accuracy']:.3f}",
                  markup=False)
        return
    table = Table("class", "held-out accuracy", title=Text(f"probe -> {out_fpath}"))
    for name, acc in fit.metrics["heldout_accuracy_per_class"].items():
        table.add_row(Text(name), f"{acc:.3f}")
    table.add_row("[bold]all", f"[bold]{fit.metrics['heldout_accuracy']:.3f}")
    out.print(table)
    out.print(f"C = {fit.metrics['C']:g} (cross-validated), {fit.metrics['n_train']} train / "
              f"{fit.metrics['n_test']} held-out instances")


@app.command("explain")
@user_errors
def explain_cmd(
    images: list[Path] = typer.Argument(..., help="Image files to explain."),
    sae_fpath: Path = typer.Option(..., "--sae", help="SAE file (clipaudit train-sae)."),
    probe: Path = typer.Option(None, "--probe", help="Probe file."),
    prompts: Path = typer.Option(None, "--prompts", help="Zero-shot prompt-set YAML."),
    top: int = option(ExplainConfig, "top", "--top"),
    gradient: str = option(ExplainConfig, "gradient", "--gradient"),
    audit: Path = option(ExplainConfig, "audit", "--audit", file_okay=False,
                         help="Audit folder of this SAE: show the concept labels it gave the "
                              "components."),
    heatmap: Path = option(ExplainConfig, "heatmap", "--heatmap",
                           help="Write the predicted class's top components' heatmaps over the "
                                "image to this PNG (several images: one file each)."),
    heatmap_method: str = option(ExplainConfig, "heatmap_method", "--heatmap-method"),
    heatmap_components: int = option(ExplainConfig, "heatmap_components", "--heatmap-components"),
    as_json: bool = json_option("each image's prediction and components"),
    quiet: bool = quiet_option(),
) -> None:
    """Print each image's prediction and its top components per class."""
    from clipaudit.attribution.explain import explain_images

    config = ExplainConfig(top=top, gradient=gradient, audit=audit, heatmap=heatmap,
                           heatmap_method=heatmap_method, heatmap_components=heatmap_components)
    explanations = explain_images(images, sae_fpath, probe=probe, prompts=prompts, config=config)
    if as_json:
        print_json([asdict(e) for e in explanations])
        return
    labelled = audit is not None
    for e in explanations:
        if quiet:
            out.print(f"{e.image}: predicted {e.prediction}", markup=False)
            continue
        table = Table("class", "score", "component", *(["concept"] if labelled else []),
                      "activation", "attribution",
                      title=Text.assemble(f"{e.image}: predicted ", (str(e.prediction), "bold")))
        for cls in e.classes:
            for i, comp in enumerate(cls.top):
                table.add_row(Text(cls.class_name if i == 0 else ""),
                              f"{cls.score:.4f}" if i == 0 else "", str(comp.component),
                              *([Text(comp.concept or "-")] if labelled else []),
                              f"{comp.activation:.3f}", f"{comp.attribution:+.4f}")
            table.add_row("", "", "SAE error", *([""] if labelled else []), "",
                          f"{cls.error:+.4f}", end_section=True)
        out.print(table)
        if e.heatmap:
            out.print(f"heatmaps -> {e.heatmap}", markup=False)
    if not (labelled or quiet):
        err.print("components are numbers only: add --audit AUDIT_DIR (an audit of this SAE) "
                  "to see the concept label the audit gave each", markup=False)
