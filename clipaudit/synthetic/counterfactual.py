"""Counterfactual data sets: the causal ground truth of a classifier's reliance on an artifact.

``make_counterfactual_dataset(out, artifact=A, target_class=T, n=N)`` writes ``N`` scenes
of the world (half of class ``T``, half of the other class), each rendered twice from
the same random state:

- ``variant=clean``: the scene without ``A`` (``has_A`` False, empty ``A`` mask);
- ``variant=artifact``: the same scene with ``A`` painted on it (``has_A`` True).

Everything else (the lesion, the skin, the other artifacts, their places, the noise)
is identical within a pair, so the two images differ only inside ``A``'s mask. The
other artifacts occur at ``base_rate`` independently of the class; labels stay true
(the label never depends on an artifact). Layout as for planted data sets
(``datasets.py``), ``2 N`` images named ``images/<pair>-clean.png`` and
``images/<pair>-artifact.png``; the manifest adds the columns ``variant`` (clean /
artifact) and ``pair_id`` (declared ``ignore`` in ``columns.yaml``), and the ground
truth says ``"dataset": "counterfactual"`` with the artifact, target class and pair count.

``causal_reliance(predictions, data)`` then measures what a probe trained on a planted
data set does with the artifact: its accuracy on the other class's clean images versus
on the same scenes with the artifact on them. Issue 13's definition: the probe relies on
the artifact when that accuracy drops by at least 0.05.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipaudit.errors import InputError
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.datasets import (
    PlantedDataset,
    check_args,
    load_planted_dataset,
    prepare_folder,
    write_dataset,
)
from clipaudit.synthetic.world import Rendering
from clipaudit.synthetic.worlds import DEFAULT_WORLD, World, get_world

VARIANTS = ("clean", "artifact")
"""Values of the manifest's ``variant`` column."""
COUNTERFACTUAL_COLUMNS = ("variant", "pair_id")
_STREAM = 0xCF  # seeds counterfactual scenes apart from planted data sets of the same seed


def make_counterfactual_dataset(out_dpath: Path | str, *, artifact: str,
                                target_class: str | None = None, n: int = 400, seed: int = 0,
                                base_rate: float = 0.2, overwrite: bool = False,
                                world: str | World = DEFAULT_WORLD,
                                reporter: Reporter = NULL_REPORTER) -> PlantedDataset:
    """Write ``n`` pairs of images (``2 n`` files) of ``world``: each scene clean and with
    ``artifact``, half of the scenes of ``target_class`` (default: the world's), half of
    the other class. See the module docstring for exactly what the folder holds."""
    w = get_world(world)
    target_class = target_class or w.default_target_class
    check_args(w, artifact, target_class, n, base_rate)
    other = next(c for c in w.classes if c != target_class)
    dpath = prepare_folder(out_dpath, overwrite)
    labels = [target_class] * (n // 2) + [other] * (n - n // 2)
    labels = [labels[i] for i in np.random.default_rng([seed, _STREAM]).permutation(n)]
    probs = {a: base_rate for a in w.artifacts}

    def items() -> Iterator[tuple[str, Rendering, dict[str, Any]]]:
        for pair, label in enumerate(labels):
            for variant in VARIANTS:
                # The same random state for both variants: the omitted artifact still
                # draws its layout, so nothing else in the image moves.
                rng = np.random.default_rng([seed, _STREAM, pair])
                scene = w.sample_scene(rng, label=label, artifact_probs=probs,
                                       forced_artifacts={artifact: True})
                omit = (artifact,) if variant == "clean" else ()
                rendering = w.render_scene(scene, rng, omit=omit)
                shown = w.without_artifact(scene, artifact) if omit else scene
                yield f"{pair:06d}-{variant}", rendering, {
                    "caption": w.caption_scene(shown, rng), **shown.metadata(),
                    "variant": variant, "pair_id": pair}

    truth = {"dataset": "counterfactual", "artifact": artifact, "target_class": target_class,
             "other_class": other, "rate": None, "n": 2 * n, "n_pairs": n, "seed": seed,
             "base_rate": base_rate, "shortcut": False,
             "variants": {"clean": f"the scene without {artifact}",
                          "artifact": f"the same scene with {artifact}"},
             "variant_column": "variant", "pair_column": "pair_id"}
    return write_dataset(dpath, w, items(), n=2 * n, truth=truth, reporter=reporter,
                         extra_columns=COUNTERFACTUAL_COLUMNS,
                         generator="clipaudit.synthetic.make_counterfactual_dataset")


@dataclass(frozen=True)
class CausalReliance:
    """A classifier's accuracy on counterfactual pairs, with and without the artifact."""

    artifact: str
    target_class: str
    """The class the artifact was planted on in the classifier's training data."""
    accuracy_clean: float
    """Accuracy on the clean images of the other class."""
    accuracy_artifact: float
    """Accuracy on the same scenes with the artifact: the artifact on the other class."""
    accuracy_clean_target: float
    """Accuracy on the clean images of the target class."""
    accuracy_artifact_target: float
    """Accuracy on the target class's scenes with the artifact."""
    n_pairs: int
    """Pairs of the other class the two main accuracies are measured on."""
    min_drop: float
    """The drop from which the classifier counts as relying on the artifact."""

    @property
    def drop(self) -> float:
        """``accuracy_clean - accuracy_artifact``: what the artifact alone costs."""
        return self.accuracy_clean - self.accuracy_artifact

    @property
    def relied_on(self) -> bool:
        return self.drop >= self.min_drop


def causal_reliance(predictions: Sequence[str] | Mapping[str, str],
                    data: PlantedDataset | Path | str, *, min_drop: float = 0.05
                    ) -> CausalReliance:
    """Accuracies of ``predictions`` (predicted class names, one per manifest row in
    order, or keyed by image path as in the manifest or absolute) on a counterfactual
    data set, and the drop on the other class when the artifact is put on it."""
    data = data if isinstance(data, PlantedDataset) else load_planted_dataset(data)
    truth = data.ground_truth
    if truth.get("dataset") != "counterfactual":
        raise InputError(f"{data.ground_truth_fpath}: not a counterfactual data set "
                         "(write one with make_counterfactual_dataset)")
    with open(data.manifest_fpath, newline="") as f:
        rows = list(csv.DictReader(f))
    predicted = _align(predictions, rows, data)
    classes = set(truth["classes"])
    unknown = sorted({p for p in predicted if p not in classes})
    if unknown:
        raise InputError(f"predictions name {', '.join(map(repr, unknown[:5]))}, which are not "
                         f"classes of {data.dpath} ({', '.join(truth['classes'])})")
    target = truth["target_class"]

    def accuracy(variant: str, on_target: bool) -> tuple[float, int]:
        hits = [p == r["label"] for p, r in zip(predicted, rows)
                if r["variant"] == variant and (r["label"] == target) == on_target]
        return (float(np.mean(hits)) if hits else float("nan")), len(hits)

    clean, n_pairs = accuracy("clean", False)
    return CausalReliance(
        artifact=truth["artifact"], target_class=target, accuracy_clean=clean,
        accuracy_artifact=accuracy("artifact", False)[0],
        accuracy_clean_target=accuracy("clean", True)[0],
        accuracy_artifact_target=accuracy("artifact", True)[0],
        n_pairs=n_pairs, min_drop=min_drop)


def _align(predictions: Sequence[str] | Mapping[str, str], rows: list[dict[str, str]],
           data: PlantedDataset) -> list[str]:
    if not isinstance(predictions, Mapping):
        if len(predictions) != len(rows):
            raise InputError(f"{len(predictions)} predictions for the {len(rows)} images of "
                             f"{data.manifest_fpath}; give one per manifest row, in order")
        return [str(p) for p in predictions]
    root = data.dpath.resolve()

    def key(path: str) -> str:
        return os.path.normpath(path if os.path.isabs(path) else root / path)

    by_path = {key(str(k)): str(v) for k, v in predictions.items()}
    missing = [r["path"] for r in rows if key(r["path"]) not in by_path]
    if missing:
        raise InputError(f"no prediction for {len(missing)} images of {data.manifest_fpath} "
                         f"(first: {missing[0]})")
    return [by_path[key(r["path"])] for r in rows]
