"""CLI verbs: synthetic make-dataset, synthetic train-clip."""

from __future__ import annotations

from pathlib import Path

import typer

from clipaudit.cli import app
from clipaudit.cli._common import (
    RichReporter,
    json_option,
    out,
    print_json,
    quiet_option,
    user_errors,
)
from clipaudit.cli._exit import ClipAuditGroup
from clipaudit.cli._options import argument_default, option
from clipaudit.synthetic.counterfactual import make_counterfactual_dataset
from clipaudit.synthetic.datasets import make_planted_dataset
from clipaudit.synthetic.train import (
    TrainConfig,
    default_train_config,
    recipe_for,
    train_tiny_clip,
)
from clipaudit.synthetic.worlds import get_world, list_worlds

synthetic_app = typer.Typer(
    cls=ClipAuditGroup,
    help="The synthetic worlds: planted-shortcut and counterfactual data sets, the tiny CLIP.",
    no_args_is_help=True,
)
app.add_typer(synthetic_app, name="synthetic")

_WORLD_HELP = f"Synthetic world to draw from ({', '.join(list_worlds())})."
_CLASS_HELP = "Class the artifact is planted on (default: the world's; dermatology: malignant)."


@synthetic_app.command("make-dataset")
@user_errors
def make_dataset_cmd(
    out_dpath: Path = typer.Option(..., "--out", "-o", help="Folder to write images/, masks/, "
                                   "manifest.csv, columns.yaml and ground_truth.json into."),
    world: str = typer.Option(argument_default(make_planted_dataset, "world"), help=_WORLD_HELP),
    artifact: str = typer.Option(None, help="Artifact to plant, or 'none' for a clean control "
                                 "(default: the world's; dermatology: ruler)."),
    target_class: str = typer.Option(None, "--class", help=_CLASS_HELP),
    rate: float = typer.Option(argument_default(make_planted_dataset, "rate"),
                               help="P(class | artifact); 0.5 = no shortcut, 1 = perfect."),
    n: int = typer.Option(argument_default(make_planted_dataset, "n"), "-n", "--n",
                          help="Number of images."),
    seed: int = typer.Option(argument_default(make_planted_dataset, "seed"),
                             help="Seed of the data set (same seed, same images)."),
    overwrite: bool = typer.Option(False, help="Replace a data set already in --out."),
    as_json: bool = json_option("the ground truth"),
    quiet: bool = quiet_option(),
) -> None:
    """Generate a labelled data set with a planted shortcut (or a clean control)."""
    artifact = artifact or get_world(world).default_artifact
    with RichReporter(quiet=as_json or quiet) as reporter:
        data = make_planted_dataset(
            out_dpath, artifact=None if artifact.lower() == "none" else artifact,
            target_class=target_class, rate=rate, n=n, seed=seed, overwrite=overwrite,
            world=world, reporter=reporter)
    if as_json:
        print_json({"dpath": str(data.dpath), "manifest": str(data.manifest_fpath),
                    "ground_truth": data.ground_truth})
        return
    truth = data.ground_truth
    what = (f"{truth['artifact']} -> {truth['target_class']} at rate {truth['rate']}"
            if truth["artifact"] else "clean control (no planted artifact)")
    out.print(f"wrote {data.n} {data.world} images to {data.dpath}: {what}", markup=False)
    if not quiet:
        out.print(f"manifest: {data.manifest_fpath}", markup=False)


@synthetic_app.command("make-counterfactual")
@user_errors
def make_counterfactual_cmd(
    out_dpath: Path = typer.Option(..., "--out", "-o", help="Folder to write the pairs into."),
    artifact: str = typer.Option(..., help="Artifact painted on the second image of each pair."),
    world: str = typer.Option(argument_default(make_counterfactual_dataset, "world"),
                              help=_WORLD_HELP),
    target_class: str = typer.Option(None, "--class", help=_CLASS_HELP),
    n: int = typer.Option(argument_default(make_counterfactual_dataset, "n"), "-n", "--n",
                          help="Number of pairs (scenes); twice as many images."),
    seed: int = typer.Option(argument_default(make_counterfactual_dataset, "seed"),
                             help="Seed of the data set (same seed, same images)."),
    overwrite: bool = typer.Option(False, help="Replace a data set already in --out."),
    as_json: bool = json_option("the ground truth"),
    quiet: bool = quiet_option(),
) -> None:
    """Generate pairs of the same scene without and with an artifact (causal ground truth)."""
    with RichReporter(quiet=as_json or quiet) as reporter:
        data = make_counterfactual_dataset(out_dpath, artifact=artifact,
                                           target_class=target_class, n=n, seed=seed,
                                           overwrite=overwrite, world=world, reporter=reporter)
    if as_json:
        print_json({"dpath": str(data.dpath), "manifest": str(data.manifest_fpath),
                    "ground_truth": data.ground_truth})
        return
    truth = data.ground_truth
    out.print(f"wrote {truth['n_pairs']} pairs of {data.world} images (clean / with "
              f"{truth['artifact']}) to {data.dpath}; {truth['target_class']} is the target class",
              markup=False)
    if not quiet:
        out.print(f"manifest: {data.manifest_fpath}", markup=False)


@synthetic_app.command("train-clip")
@user_errors
def train_clip_cmd(
    out_dpath: Path = typer.Option(None, "--out", "-o", help="Folder to write config.json, "
                                   "model.safetensors and provenance.json into."),
    install: bool = typer.Option(False, help="Write into the package as the world's bundled "
                                 "tiny CLIP (tiny-derm-clip, tiny-birds-clip; replaces the "
                                 "shipped weights)."),
    world: str = typer.Option(argument_default(train_tiny_clip, "world"), help=_WORLD_HELP),
    seed: int = option(TrainConfig, "seed", "--seed"),
    steps: int = typer.Option(None, help="Optimiser steps (default: the shipped model's)."),
    threads: int = typer.Option(2, help="CPU threads torch may use."),
    as_json: bool = json_option("the provenance"),
    quiet: bool = quiet_option(),
) -> None:
    """Train a world's tiny CLIP on that world (5-8 minutes on 2 idle CPU cores)."""
    import dataclasses

    from clipaudit.device import torch_threads
    from clipaudit.errors import InputError
    from clipaudit.extraction.backbone import BUNDLED_MODELS
    from clipaudit.resources import package_data_dpath

    if (out_dpath is None) == (not install):
        raise InputError("give exactly one of --out FOLDER or --install")
    recipe = recipe_for(world)
    target = package_data_dpath() / BUNDLED_MODELS[recipe.model_name] if install else out_dpath
    config = dataclasses.replace(default_train_config(world), seed=seed)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    # callers in the same process (tests, notebooks) keep their setting
    with torch_threads(threads), RichReporter(quiet=as_json or quiet) as reporter:
        trained = train_tiny_clip(target, config, world=world, reporter=reporter)
    if as_json:
        print_json({"dpath": str(trained.dpath), **trained.provenance})
        return
    prov = trained.provenance
    out.print(f"trained {recipe.model_name} in {prov['training_seconds']:.0f} s "
              f"({prov['training_cpu_seconds']:.0f} CPU s) -> {trained.dpath}", markup=False)
    if quiet:
        return
    out.print(trained.summary, markup=False)
