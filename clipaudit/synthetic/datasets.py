"""Planted-shortcut data sets: world images where a chosen artifact co-occurs with a
chosen class at a chosen rate, with the ground truth written beside them.

Rate semantics (``artifact`` given): the planted artifact is in exactly half of the
images; P(target_class | artifact) = rate and P(target_class | no artifact) =
1 - rate, so the classes stay balanced. rate 0.5 is no shortcut, 1.0 a perfect
one. Every other artifact occurs independently of the class at ``base_rate``, so
clean controls (``artifact=None``) contain artifacts too.

Layout of ``out_dpath``: ``images/NNNNNN.png``, ``manifest.csv`` (path, label,
caption, lesion and skin attributes, one ``has_*`` column per artifact),
``columns.yaml`` (the columns' roles: ``has_*`` artifacts, skin tone protected, the
lesion attributes, which decide the label, ignored; see ``clipaudit.columns``) and
``ground_truth.json`` (a versioned clipaudit file).
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipaudit.artifacts import atomic_path, read_json, sha256_file, write_json
from clipaudit.columns import write_declared_roles
from clipaudit.errors import InputError
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.captions import caption_scene
from clipaudit.synthetic.world import ARTIFACTS, CLASSES, render_scene, sample_scene

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
GROUND_TRUTH_NAME = "ground_truth.json"
IMAGES_DNAME = "images"
MANIFEST_COLUMNS = ("path", "label", "caption", "skin_tone", "lesion_colour", "lesion_border",
                    "lesion_size", *(f"has_{a}" for a in ARTIFACTS))


@dataclass(frozen=True)
class PlantedDataset:
    """A generated data set on disk and its ground truth."""

    dpath: Path
    """Folder holding ``images/``, ``manifest.csv`` and ``ground_truth.json``."""
    manifest_fpath: Path
    """``manifest.csv``: one row per image, paths relative to ``dpath``."""
    ground_truth_fpath: Path
    """``ground_truth.json``: planted artifact, class, rate and the rates measured."""
    ground_truth: dict[str, Any]
    """The contents of ``ground_truth.json`` (without its header)."""

    @property
    def n(self) -> int:
        return int(self.ground_truth["n"])


def _check_args(artifact: str | None, target_class: str, rate: float, n: int,
                base_rate: float) -> None:
    if artifact is not None and artifact not in ARTIFACTS:
        raise InputError(f"unknown artifact {artifact!r}. Available: {', '.join(ARTIFACTS)}")
    if target_class not in CLASSES:
        raise InputError(f"unknown class {target_class!r}. Available: {', '.join(CLASSES)}")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"rate must be between 0 and 1 (0.5 = no shortcut), got {rate}")
    if not 0.0 <= base_rate <= 1.0:
        raise InputError(f"base rate must be between 0 and 1, got {base_rate}")
    if n < 2:
        raise InputError(f"a data set needs at least 2 images, got n={n}")


def plan_labels(n: int, *, artifact: str | None, target_class: str, rate: float,
                seed: int) -> tuple[list[str], list[bool]]:
    """Per image (class, has planted artifact), with the exact counts the rate implies."""
    other = CLASSES[1 - CLASSES.index(target_class)]
    n_with = n // 2 if artifact is not None else 0
    n_without = n - n_with
    target_with = round(n_with * rate)
    # Without the artifact the target class takes what keeps the classes balanced
    # overall; for the planted case that is exactly (1 - rate) of those images.
    target_without = n // 2 - target_with if artifact is not None else n_without // 2
    target_without = min(max(target_without, 0), n_without)
    plan = ([(target_class, True)] * target_with + [(other, True)] * (n_with - target_with)
            + [(target_class, False)] * target_without
            + [(other, False)] * (n_without - target_without))
    order = np.random.default_rng([seed, 0xC1A55]).permutation(n)
    return [plan[i][0] for i in order], [plan[i][1] for i in order]


def make_planted_dataset(out_dpath: Path | str, *, artifact: str | None,
                         target_class: str = "malignant", rate: float = 0.9, n: int = 2000,
                         seed: int = 0, base_rate: float = 0.2, overwrite: bool = False,
                         reporter: Reporter = NULL_REPORTER) -> PlantedDataset:
    """Generate ``n`` world images in which ``artifact`` predicts ``target_class`` at
    ``rate`` (``artifact=None``: a clean control), and write them to ``out_dpath``."""
    _check_args(artifact, target_class, rate, n, base_rate)
    dpath = Path(out_dpath)
    manifest_fpath, truth_fpath = dpath / MANIFEST_NAME, dpath / GROUND_TRUTH_NAME
    if manifest_fpath.exists() and not overwrite:
        raise InputError(f"{manifest_fpath}: a data set already exists here "
                         "(choose another folder or pass overwrite)")
    if overwrite and (dpath / IMAGES_DNAME).is_dir():
        shutil.rmtree(dpath / IMAGES_DNAME)
    (dpath / IMAGES_DNAME).mkdir(parents=True, exist_ok=True)

    labels, planted = plan_labels(n, artifact=artifact, target_class=target_class,
                                  rate=rate, seed=seed)
    probs = {a: base_rate for a in ARTIFACTS}
    rows = []
    with reporter.task("generating images", total=n) as task:
        for i, (label, has) in enumerate(zip(labels, planted)):
            rng = np.random.default_rng([seed, i])
            forced = {artifact: has} if artifact is not None else None
            scene = sample_scene(rng, diagnosis=label, artifact_probs=probs,
                                 forced_artifacts=forced)
            rel = f"{IMAGES_DNAME}/{i:06d}.png"
            Image.fromarray(render_scene(scene, rng)).save(dpath / rel, compress_level=1)
            rows.append({"path": rel, "caption": caption_scene(scene, rng), **scene.metadata()})
            if i % 100 == 99 or i == n - 1:
                task.advance(i % 100 + 1)
    _write_manifest(manifest_fpath, rows)
    write_declared_roles(dpath, artifact=[f"has_{a}" for a in ARTIFACTS], protected=["skin_tone"],
                         ignore=["lesion_colour", "lesion_border", "lesion_size"])
    truth = _ground_truth(rows, artifact=artifact, target_class=target_class, rate=rate,
                          n=n, seed=seed, base_rate=base_rate)
    truth["manifest_sha256"] = sha256_file(manifest_fpath)
    write_json(truth_fpath, "synthetic-dataset", truth,
               provenance={"generator": "clipaudit.synthetic.make_planted_dataset",
                           "seed": seed})
    log.info("wrote %d images to %s (artifact %s, class %s, rate %.2f)",
             n, dpath, artifact, target_class, rate)
    return PlantedDataset(dpath, manifest_fpath, truth_fpath, truth)


def _write_manifest(fpath: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(fpath) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _ground_truth(rows: list[dict[str, Any]], *, artifact: str | None, target_class: str,
                  rate: float, n: int, seed: int, base_rate: float) -> dict[str, Any]:
    truth: dict[str, Any] = {
        "artifact": artifact, "target_class": target_class,
        "rate": rate if artifact is not None else None,
        "n": n, "seed": seed, "base_rate": base_rate,
        "shortcut": artifact is not None and rate != 0.5,
        "classes": list(CLASSES), "artifacts": list(ARTIFACTS),
        "diagnosis_rule": "malignant = irregular border and dark (brown or black) colour",
        "manifest": MANIFEST_NAME,
    }
    # Measured on the rows written, for every artifact: the planted one shows the
    # chosen rate, the others sit near 0.5 (independent of the class).
    measured = {}
    for a in ARTIFACTS:
        has = [r for r in rows if r[f"has_{a}"]]
        hasnt = [r for r in rows if not r[f"has_{a}"]]
        measured[a] = {
            "share": len(has) / n,
            "p_target_given_artifact": _share(has, target_class),
            "p_target_given_no_artifact": _share(hasnt, target_class),
        }
    truth["measured"] = measured
    truth["class_counts"] = {c: sum(r["label"] == c for r in rows) for c in CLASSES}
    return truth


def _share(rows: list[dict[str, Any]], label: str) -> float | None:
    return round(sum(r["label"] == label for r in rows) / len(rows), 4) if rows else None


def load_planted_dataset(dpath: Path | str) -> PlantedDataset:
    """Open a data set written by ``make_planted_dataset`` (checks its ground-truth header)."""
    dpath = Path(dpath)
    truth_fpath, manifest_fpath = dpath / GROUND_TRUTH_NAME, dpath / MANIFEST_NAME
    doc = read_json(truth_fpath, "synthetic-dataset")
    if not manifest_fpath.is_file():
        raise InputError(f"{manifest_fpath}: manifest of the synthetic data set is missing")
    header = {"kind", "schema_version", "clipaudit_version", "created", "provenance"}
    truth = {k: v for k, v in doc.items() if k not in header}
    return PlantedDataset(dpath, manifest_fpath, truth_fpath, truth)
