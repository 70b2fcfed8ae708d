"""Is a world and its bundled CLIP fit to benchmark shortcut detection?

Three things make it so, measured here per artifact:

- **A planted shortcut is relied on.** A linear probe fitted (``fit_probe``, as clipaudit
  fits one) on the CLIP's embeddings of a data set where the artifact marks every image
  of the target class (rate 1.0) loses accuracy on counterfactual pairs when the artifact
  sits on the other class (``causal_reliance``; relied on from a drop of 0.05).
- **An artifact independent of the label is not.** The same with the artifact in half
  the images of each class (rate 0.5): the drop stays small.
- **The SAE can isolate it, or is honestly blind to it.** On a clean reference set, an
  SAE trained with the demo's settings: the best single component's ROC AUC for the
  artifact's column, beside how decodable the column is from the activations at all
  (a cross-validated linear probe). Artifacts the SAE isolates are findable by SAE
  findings; decodable ones it does not isolate exercise the coverage check.

``benchmarks/world_fitness.py`` prints the table for every world.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.counterfactual import (
    CausalReliance,
    causal_reliance,
    make_counterfactual_dataset,
)
from clipaudit.synthetic.datasets import make_planted_dataset
from clipaudit.synthetic.worlds import World, artifact_column, get_world

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactFitness:
    """What the world and its CLIP give the benchmark for one artifact."""

    artifact: str
    target_class: str
    planted: CausalReliance
    """A probe fitted where the artifact marks every image of ``target_class``."""
    control: CausalReliance
    """A probe fitted where the artifact is in half the images of each class."""
    decodable_auc: float
    """Cross-validated ROC AUC of a linear probe for the artifact on the activations."""
    best_component_auc: float
    """ROC AUC of the SAE component that best separates images with the artifact."""
    best_component: int


@dataclass(frozen=True)
class FitnessConfig:
    """Sizes and seeds of a fitness measurement."""

    n: int = 1000
    """Images of each planted and control data set."""
    n_pairs: int = 200
    """Counterfactual pairs per artifact (half of each class)."""
    n_reference: int = 2000
    """Images of the clean reference set the SAE is trained on and measured on."""
    seed: int = 0


def measure_fitness(world: str | World, out_dpath: Path | str,
                    config: FitnessConfig = FitnessConfig(), *,
                    artifacts: Sequence[str] | None = None, target_class: str | None = None,
                    backbone: Backbone | None = None,
                    reporter: Reporter = NULL_REPORTER) -> list[ArtifactFitness]:
    """Fitness of ``world`` (and its bundled CLIP, unless ``backbone`` is given) for every
    artifact (or those named), writing its data sets and caches under ``out_dpath``."""
    from clipaudit.demo import DemoConfig
    from clipaudit.sae import train_sae

    w = get_world(world)
    target = target_class or w.default_target_class
    out = Path(out_dpath)
    backbone = backbone or load_backbone(BackboneSpec(model=w.clip_model))
    reference = _extract(make_planted_dataset(
        out / "reference", artifact=None, n=config.n_reference, seed=config.seed + 1, world=w,
        overwrite=True, reporter=reporter).manifest_fpath, out / "reference-cache", backbone,
        reporter)
    sae = train_sae(reference, dataclasses.replace(DemoConfig().sae, seed=config.seed),
                    reporter=reporter).sae
    acts = reference.load_acts()
    with torch.no_grad():
        codes = sae.encode_dense(acts).numpy()
    results = []
    for i, artifact in enumerate(artifacts or w.artifacts):
        w.check_artifact(artifact)
        flags = reference.ok_index[artifact_column(artifact)].astype(bool).to_numpy()
        best, best_auc = _best_component(codes, flags)
        pairs = make_counterfactual_dataset(out / artifact / "pairs", artifact=artifact,
                                            target_class=target, n=config.n_pairs,
                                            seed=config.seed + 100 + i, world=w, overwrite=True,
                                            reporter=reporter)
        pairs_cache = _extract(pairs.manifest_fpath, out / artifact / "pairs-cache", backbone,
                               reporter)
        reliance = {}
        for name, rate in (("planted", 1.0), ("control", 0.5)):
            data = make_planted_dataset(out / artifact / name, artifact=artifact,
                                        target_class=target, rate=rate, n=config.n,
                                        seed=config.seed + 200 + 2 * i + int(rate == 0.5),
                                        world=w, overwrite=True, reporter=reporter)
            reliance[name] = _reliance(_extract(data.manifest_fpath, out / artifact / f"{name}-cache",
                                                backbone, reporter), pairs_cache, pairs, config.seed)
        results.append(ArtifactFitness(artifact, target, reliance["planted"], reliance["control"],
                                       _decodable_auc(acts.numpy(), flags, config.seed),
                                       best_auc, best))
        log.info("%s: drop %.3f planted, %.3f control; best component AUC %.3f",
                 artifact, reliance["planted"].drop, reliance["control"].drop, best_auc)
    return results


def _extract(manifest_fpath: Path, out_dpath: Path, backbone: Backbone, reporter: Reporter):
    import shutil

    from clipaudit.extraction.cache import ExtractConfig, extract

    if out_dpath.exists():  # a cache of an earlier run's (now replaced) data set
        shutil.rmtree(out_dpath)
    return extract(manifest_fpath, out_dpath, ExtractConfig(num_workers=0), backbone=backbone,
                   reporter=reporter).cache


def _reliance(train_cache, pairs_cache, pairs, seed: int) -> CausalReliance:
    from clipaudit.heads import ProbeConfig, fit_probe_on_cache

    probe = fit_probe_on_cache(train_cache.dpath, config=ProbeConfig(seed=seed)).probe
    with torch.no_grad():
        predicted = probe.scores(pairs_cache.load_embeds()).argmax(1).tolist()
    paths = pairs_cache.ok_index["path"].astype(str).tolist()
    return causal_reliance({p: probe.class_names[k] for p, k in zip(paths, predicted)}, pairs)


def _best_component(codes_nl: np.ndarray, flags: np.ndarray) -> tuple[int, float]:
    from sklearn.metrics import roc_auc_score

    if flags.all() or not flags.any():
        return -1, float("nan")
    aucs = [roc_auc_score(flags, codes_nl[:, j]) if codes_nl[:, j].any() else 0.5
            for j in range(codes_nl.shape[1])]
    best = int(np.argmax(aucs))
    return best, float(aucs[best])


def _decodable_auc(acts_nd: np.ndarray, flags: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if flags.all() or not flags.any():
        return float("nan")
    x = (acts_nd - acts_nd.mean(0)) / acts_nd.std(0).clip(1e-6)
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(max_iter=2000), x, flags, cv=folds,
                               method="decision_function")
    return float(roc_auc_score(flags, scores))
