"""Planted-shortcut data sets: world images where a chosen artifact co-occurs with a
chosen class at a chosen rate, with the ground truth written beside them.

Rate semantics (``artifact`` given): the planted artifact is in exactly half of the
images; P(target_class | artifact) = rate and P(target_class | no artifact) =
1 - rate, so the classes stay balanced. rate 0.5 is no shortcut, 1.0 a perfect
one. Every other artifact occurs independently of the class at ``base_rate``, so
clean controls (``artifact=None``) contain artifacts too.

Layout of ``out_dpath`` (the same for counterfactual sets, ``counterfactual.py``):

- ``images/NNNNNN.png``;
- ``masks/NNNNNN.png``: where each artifact sits (``masks.py``);
- ``manifest.csv``: path, label, caption, the world's metadata columns (one ``has_*``
  per artifact);
- ``columns.yaml``: the columns' roles (artifact, protected, ignore;
  ``clipaudit.extraction.columns``, read by the checks through ``clipaudit.columns``);
- ``ground_truth.json`` (a versioned clipaudit file): world, planted artifact, class,
  rate, the rates measured, and ``masks`` (folder, bit of each artifact, which are
  localised and which diffuse, which are filters whose masks overlap others').

Data sets of schema version 1 (before masks and column roles) still load; their
``masks_dpath`` is None and ``load_artifact_mask`` says they have none. Version 2 lacks
``masks.filters`` (no world of that version had filters).
"""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipaudit.artifacts import atomic_path, read_json, sha256_file, write_json
from clipaudit.errors import InputError
from clipaudit.extraction.columns import COLUMN_ROLES_NAME, write_column_roles
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic._layout import GROUND_TRUTH_NAME, IMAGES_DNAME, MANIFEST_NAME, MASKS_DNAME
from clipaudit.synthetic.masks import MASK_DEFINITION, save_mask_png
from clipaudit.synthetic.world import Rendering
from clipaudit.synthetic.worlds import DEFAULT_WORLD, DERMATOLOGY, World, artifact_column, get_world

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = DERMATOLOGY.manifest_columns
"""Manifest columns of a dermatology data set."""

@dataclass(frozen=True)
class PlantedDataset:
    """A generated data set on disk (planted-shortcut or counterfactual) and its ground truth."""

    dpath: Path
    """Folder holding ``images/``, ``masks/``, ``manifest.csv``, ``columns.yaml`` and
    ``ground_truth.json``."""
    manifest_fpath: Path
    """``manifest.csv``: one row per image, paths relative to ``dpath``."""
    ground_truth_fpath: Path
    """``ground_truth.json``: planted artifact, class, rate and the rates measured."""
    ground_truth: dict[str, Any]
    """The contents of ``ground_truth.json`` (without its header)."""
    masks_dpath: Path | None = None
    """``masks/``, or None for a data set written before clipaudit stored masks."""
    column_roles_fpath: Path | None = None
    """``columns.yaml``, or None for a data set written before clipaudit declared roles."""

    @property
    def n(self) -> int:
        return int(self.ground_truth["n"])

    @property
    def world(self) -> str:
        return str(self.ground_truth.get("world", DEFAULT_WORLD))


def check_args(world: World, artifact: str | None, target_class: str, n: int,
               base_rate: float) -> None:
    """Refuse arguments a data set of ``world`` cannot be made from (``InputError``)."""
    if artifact is not None:
        world.check_artifact(artifact)
    world.check_class(target_class)
    if len(world.classes) != 2:
        raise InputError(f"the {world.name} world has {len(world.classes)} classes; "
                         "planted and counterfactual data sets need two")
    if not 0.0 <= base_rate <= 1.0:
        raise InputError(f"base rate must be between 0 and 1, got {base_rate}")
    if n < 2:
        raise InputError(f"a data set needs at least 2 images, got n={n}")


def plan_labels(n: int, *, artifact: str | None, target_class: str, rate: float,
                seed: int, world: str | World = DEFAULT_WORLD) -> tuple[list[str], list[bool]]:
    """Per image (class, has planted artifact), with the exact counts the rate implies."""
    classes = get_world(world).classes
    other = classes[1 - classes.index(target_class)]
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
                         target_class: str | None = None, rate: float = 0.9, n: int = 2000,
                         seed: int = 0, base_rate: float = 0.2, overwrite: bool = False,
                         world: str | World = DEFAULT_WORLD,
                         reporter: Reporter = NULL_REPORTER) -> PlantedDataset:
    """Generate ``n`` images of ``world`` in which ``artifact`` predicts ``target_class``
    (default: the world's, malignant for dermatology) at ``rate`` (``artifact=None``: a
    clean control), and write them, their masks and ground truth to ``out_dpath``."""
    w = get_world(world)
    target_class = target_class or w.default_target_class
    check_args(w, artifact, target_class, n, base_rate)
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"rate must be between 0 and 1 (0.5 = no shortcut), got {rate}")
    dpath = prepare_folder(out_dpath, overwrite)
    labels, planted = plan_labels(n, artifact=artifact, target_class=target_class,
                                  rate=rate, seed=seed, world=w)
    probs = {a: base_rate for a in w.artifacts}

    def items() -> Iterator[tuple[str, Rendering, dict[str, Any]]]:
        for i, (label, has) in enumerate(zip(labels, planted)):
            rng = np.random.default_rng([seed, i])
            forced = {artifact: has} if artifact is not None else None
            scene = w.sample_scene(rng, label=label, artifact_probs=probs,
                                   forced_artifacts=forced)
            rendering = w.render_scene(scene, rng)
            yield f"{i:06d}", rendering, {"caption": w.caption_scene(scene, rng),
                                          **scene.metadata()}

    truth = {
        "dataset": "planted", "artifact": artifact, "target_class": target_class,
        "rate": rate if artifact is not None else None,
        "n": n, "seed": seed, "base_rate": base_rate,
        "shortcut": artifact is not None and rate != 0.5,
    }
    data = write_dataset(dpath, w, items(), n=n, truth=truth, reporter=reporter,
                         generator="clipaudit.synthetic.make_planted_dataset")
    log.info("wrote %d images to %s (artifact %s, class %s, rate %.2f)",
             n, dpath, artifact, target_class, rate)
    return data


def prepare_folder(out_dpath: Path | str, overwrite: bool) -> Path:
    """Make ``out_dpath`` ready for a new data set; refuse to replace one unless ``overwrite``."""
    dpath = Path(out_dpath)
    manifest_fpath = dpath / MANIFEST_NAME
    if manifest_fpath.exists() and not overwrite:
        raise InputError(f"{manifest_fpath}: a data set already exists here "
                         "(choose another folder or pass overwrite)")
    if overwrite:
        # The ground truth goes first: a run killed while replacing a data set leaves a
        # folder that no longer loads, never old ground truth beside new images.
        for name in (GROUND_TRUTH_NAME, MANIFEST_NAME, COLUMN_ROLES_NAME):
            (dpath / name).unlink(missing_ok=True)
        for name in (IMAGES_DNAME, MASKS_DNAME):
            if (dpath / name).is_dir():
                shutil.rmtree(dpath / name)
    (dpath / IMAGES_DNAME).mkdir(parents=True, exist_ok=True)
    (dpath / MASKS_DNAME).mkdir(exist_ok=True)
    return dpath


def write_dataset(dpath: Path, world: World,
                  items: Iterable[tuple[str, Rendering, dict[str, Any]]], *, n: int,
                  truth: dict[str, Any], generator: str, extra_columns: tuple[str, ...] = (),
                  reporter: Reporter = NULL_REPORTER) -> PlantedDataset:
    """Write ``items`` (file stem, rendering, manifest row without ``path``) as images
    and masks, then the manifest, ``columns.yaml`` and the ground truth (last, so a
    killed run leaves no data set that looks complete). ``extra_columns`` follow the
    world's columns in the manifest and are declared ``ignore`` in ``columns.yaml``."""
    shape = (world.image_size, world.image_size)
    rows = []
    with reporter.task("generating images", total=n) as task:
        for i, (stem, rendering, row) in enumerate(items):
            rel = f"{IMAGES_DNAME}/{stem}.png"
            Image.fromarray(rendering.image).save(dpath / rel, compress_level=1)
            save_mask_png(dpath / MASKS_DNAME / f"{stem}.png", rendering.masks,
                          world.artifacts, shape)
            rows.append({"path": rel, **row})
            if i % 100 == 99 or i == n - 1:
                task.advance(i % 100 + 1)
    manifest_fpath = dpath / MANIFEST_NAME
    _write_manifest(manifest_fpath, rows, (*world.manifest_columns, *extra_columns))
    roles_fpath = write_column_roles(dpath / COLUMN_ROLES_NAME, world.column_roles(extra_columns),
                                     provenance={"generator": generator, "world": world.name})
    truth = {"world": world.name, **truth, "classes": list(world.classes),
             "artifacts": list(world.artifacts), "label_rule": world.label_rule,
             "manifest": MANIFEST_NAME, "columns": COLUMN_ROLES_NAME,
             "masks": {"dir": MASKS_DNAME, "bits": {a: i for i, a in enumerate(world.artifacts)},
                       "localised": list(world.localised_artifacts),
                       "diffuse": list(world.diffuse_artifacts),
                       "filters": list(world.filter_artifacts), "definition": MASK_DEFINITION},
             **_measured(rows, world, truth["target_class"]),
             "manifest_sha256": sha256_file(manifest_fpath)}
    truth_fpath = write_json(dpath / GROUND_TRUTH_NAME, "synthetic-dataset", truth,
                             provenance={"generator": generator, "seed": truth["seed"]})
    return PlantedDataset(dpath, manifest_fpath, truth_fpath, truth, dpath / MASKS_DNAME,
                          roles_fpath)


def _write_manifest(fpath: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with atomic_path(fpath) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _measured(rows: list[dict[str, Any]], world: World, target_class: str) -> dict[str, Any]:
    # Measured on the rows written, for every artifact: the planted one shows the
    # chosen rate, the others sit near 0.5 (independent of the class).
    measured = {}
    for a in world.artifacts:
        has = [r for r in rows if r[artifact_column(a)]]
        hasnt = [r for r in rows if not r[artifact_column(a)]]
        measured[a] = {
            "share": len(has) / len(rows),
            "p_target_given_artifact": _share(has, target_class),
            "p_target_given_no_artifact": _share(hasnt, target_class),
        }
    return {"measured": measured,
            "class_counts": {c: sum(r["label"] == c for r in rows) for c in world.classes}}


def _share(rows: list[dict[str, Any]], label: str) -> float | None:
    return round(sum(r["label"] == label for r in rows) / len(rows), 4) if rows else None


def load_planted_dataset(dpath: Path | str) -> PlantedDataset:
    """Open a data set written by ``make_planted_dataset`` or ``make_counterfactual_dataset``
    (checks its ground-truth header; data sets from before masks load without them)."""
    dpath = Path(dpath)
    truth_fpath, manifest_fpath = dpath / GROUND_TRUTH_NAME, dpath / MANIFEST_NAME
    doc = read_json(truth_fpath, "synthetic-dataset")
    if not manifest_fpath.is_file():
        raise InputError(f"{manifest_fpath}: manifest of the synthetic data set is missing")
    header = {"kind", "schema_version", "clipaudit_version", "created", "provenance"}
    truth = {k: v for k, v in doc.items() if k not in header}
    masks_dpath = dpath / truth["masks"]["dir"] if truth.get("masks") else None
    if masks_dpath is None:
        log.info("%s: data set of schema version %s has no artifact masks",
                 dpath, doc["schema_version"])
    roles_fpath = dpath / truth["columns"] if truth.get("columns") else None
    return PlantedDataset(dpath, manifest_fpath, truth_fpath, truth, masks_dpath, roles_fpath)
