"""Linear probes on CLIP image embeddings: y_c = w_c . phi(e) + b_c, phi the input
normalisation the probe was trained with. Fitting, files, and the head itself."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from clipaudit.artifacts import load_tensors, require_finite, require_match, save_tensors, sha256_file
from clipaudit.errors import ArtifactError, InputError
from clipaudit.heads.base import HeadType, LinearForm, register_head_type

if TYPE_CHECKING:
    from clipaudit.extraction.backbone import Backbone

log = logging.getLogger(__name__)

Normalisation = Literal["none", "l2", "standardize"]
NORMALISATIONS: tuple[str, ...] = ("none", "l2", "standardize")


@dataclass
class LinearProbe:
    """y_c = w_c . phi(e) + b_c, phi the input normalisation the probe was trained with."""

    weight: torch.Tensor
    """[C, D]"""
    bias: torch.Tensor
    """[C]"""
    class_names: list[str]
    normalisation: Normalisation = "l2"
    mean: torch.Tensor | None = None
    """[D] for ``standardize``."""
    std: torch.Tensor | None = None
    """[D] for ``standardize``."""
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "probe"
    kind: str = "linear-probe"

    def linear_form(self, e_nD: torch.Tensor) -> LinearForm:
        n = e_nD.shape[0]
        w, zero = self.weight.to(e_nD), torch.zeros(e_nD.shape[1]).to(e_nD)
        if self.normalisation == "l2":
            return LinearForm(w, zero, e_nD.detach().norm(dim=1).clamp_min(1e-12), self.bias.to(e_nD))
        if self.normalisation == "standardize":
            assert self.mean is not None and self.std is not None
            return LinearForm(w / self.std.to(e_nD), self.mean.to(e_nD), torch.ones(n).to(e_nD),
                              self.bias.to(e_nD))
        return LinearForm(w, zero, torch.ones(n).to(e_nD), self.bias.to(e_nD))

    def scores(self, e_nD: torch.Tensor) -> torch.Tensor:
        """Exact class scores (the normalisation is differentiated through)."""
        if self.normalisation == "l2":
            phi = e_nD / e_nD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif self.normalisation == "standardize":
            assert self.mean is not None and self.std is not None
            phi = (e_nD - self.mean.to(e_nD)) / self.std.to(e_nD)
        else:
            phi = e_nD
        return phi @ self.weight.to(e_nD).T + self.bias.to(e_nD)

    def class_texts(self) -> dict[str, list[str]]:
        return {name: [name] for name in self.class_names}

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "sha256": self.meta.get("sha256"),
                "normalisation": self.normalisation, "metrics": self.meta.get("metrics")}


# ------------------------------------------------------------------ probe files


def save_probe(probe: LinearProbe, fpath: Path | str) -> Path:
    """Write a probe: safetensors (weight [C, D], bias [C], optional mean/std) + JSON header."""
    tensors = {"weight": probe.weight.float(), "bias": probe.bias.float()}
    if probe.normalisation == "standardize":
        assert probe.mean is not None and probe.std is not None
        tensors |= {"mean": probe.mean.float(), "std": probe.std.float()}
    meta = {"class_names": list(probe.class_names), "normalisation": probe.normalisation,
            "embed_dim": int(probe.weight.shape[1]), **probe.meta}
    return save_tensors(fpath, "probe", tensors, meta, provenance=probe.meta.get("provenance"))


def load_probe(fpath: Path | str, *, expect_backbone_id: str | None = None,
               expect_dim: int | None = None) -> LinearProbe:
    """Read a probe file; refuse one of another width or backbone, naming both values."""
    tf = load_tensors(fpath, "probe")
    meta, t = tf.meta, tf.tensors
    for key in ("weight", "bias"):
        if key not in t:
            raise ArtifactError(f"{fpath}: probe file has no '{key}' tensor")
    require_finite(t, fpath, "probe")
    weight, bias = t["weight"].float(), t["bias"].float()
    names = meta.get("class_names")
    if (weight.dim() != 2 or bias.shape != (weight.shape[0],) or not isinstance(names, list)
            or len(names) != weight.shape[0]):
        raise ArtifactError(f"{fpath}: probe must have weight [C, D], bias [C] and C class_names "
                            f"(got weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, "
                            f"{len(names) if isinstance(names, list) else 'no'} class names)")
    norm = meta.get("normalisation", "none")
    if norm not in NORMALISATIONS:
        raise ArtifactError(f"{fpath}: normalisation {norm!r} is not one of {', '.join(NORMALISATIONS)}")
    if norm == "standardize" and not {"mean", "std"} <= t.keys():
        raise ArtifactError(f"{fpath}: a 'standardize' probe needs 'mean' and 'std' tensors")
    if expect_dim is not None:
        require_match("embedding width", expect_dim, int(weight.shape[1]), fpath)
    backbone_id = (meta.get("provenance") or {}).get("backbone", {}).get("id")
    if expect_backbone_id is not None and backbone_id is not None:
        require_match("backbone", expect_backbone_id, backbone_id, fpath)
    extra = {k: v for k, v in meta.items()
             if k not in {"class_names", "normalisation", "embed_dim"}}
    extra["sha256"] = sha256_file(fpath)
    return LinearProbe(weight, bias, [str(n) for n in names], norm,
                       t.get("mean"), t.get("std"), meta=extra)


# ------------------------------------------------------------------ fitting


@dataclass(frozen=True)
class ProbeConfig:
    normalisation: Normalisation = "l2"
    """Input normalisation phi applied to embeddings before the logistic regression."""
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    """Inverse regularisation strengths tried by cross-validation."""
    folds: int = 3
    """Cross-validation folds for choosing C."""
    test_fraction: float = 0.2
    """Share of instances held out (stratified) to report accuracy."""
    seed: int = 0
    max_iter: int = 2000


@dataclass(frozen=True)
class ProbeFit:
    probe: LinearProbe
    metrics: dict[str, Any]
    """held-out accuracy overall and per class, chosen C, n_train, n_test."""


def fit_probe(embeds_nD: torch.Tensor, labels: Sequence[str], config: ProbeConfig = ProbeConfig(),
              *, provenance: dict[str, Any] | None = None) -> ProbeFit:
    """Multinomial logistic regression (class-balanced, C by cross-validation)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import train_test_split

    labels_arr = np.asarray([str(x) for x in labels])
    class_names = sorted(set(labels_arr.tolist()))
    if len(class_names) < 2:
        raise InputError(f"a probe needs at least two classes; the labels have {class_names}")
    counts = {c: int((labels_arr == c).sum()) for c in class_names}
    if min(counts.values()) < max(2, config.folds):
        raise InputError(f"too few instances for some classes to fit a probe: {counts}")
    e = embeds_nD.detach().float()
    mean = e.mean(0)
    std = e.std(0).clamp_min(1e-6)
    x = _phi(e, config.normalisation, mean, std).numpy()
    y = np.searchsorted(np.asarray(class_names), labels_arr)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=config.test_fraction,
                                           random_state=config.seed, stratify=y)
    cv = LogisticRegressionCV(Cs=list(config.cs), cv=config.folds, class_weight="balanced",
                              scoring="neg_log_loss", max_iter=config.max_iter, random_state=config.seed)
    with warnings.catch_warnings():  # sklearn's announcements about future attribute layouts
        warnings.simplefilter("ignore", FutureWarning)
        cv.fit(x[idx_train], y[idx_train])
    best_c = float(np.atleast_1d(cv.C_)[0])
    pred = cv.predict(x[idx_test])
    per_class = {name: float((pred[y[idx_test] == i] == i).mean())
                 for i, name in enumerate(class_names) if (y[idx_test] == i).any()}
    # Refit on all data with the chosen C: the audited probe uses every labelled instance.
    final = LogisticRegression(C=best_c, class_weight="balanced", max_iter=config.max_iter)
    final.fit(x, y)
    weight, bias = _multinomial_weights(final.coef_, final.intercept_)
    metrics = {"heldout_accuracy": float((pred == y[idx_test]).mean()),
               "heldout_accuracy_per_class": per_class, "C": best_c,
               "n_train": int(len(idx_train)), "n_test": int(len(idx_test)), "seed": config.seed}
    probe = LinearProbe(weight, bias, class_names, config.normalisation,
                        mean if config.normalisation == "standardize" else None,
                        std if config.normalisation == "standardize" else None,
                        meta={"metrics": metrics, "provenance": dict(provenance or {})})
    return ProbeFit(probe, metrics)


def _phi(e: torch.Tensor, norm: str, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    if norm == "l2":
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if norm == "standardize":
        return (e - mean) / std
    return e


def _multinomial_weights(coef: np.ndarray, intercept: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's binary model is one logit; write it as two classes with the same softmax."""
    w, b = torch.tensor(coef, dtype=torch.float32), torch.tensor(intercept, dtype=torch.float32)
    if w.shape[0] == 1:
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    return w, b


def fit_probe_on_cache(cache_dpath: Path | str, *, label_column: str = "label",
                       config: ProbeConfig = ProbeConfig()) -> ProbeFit:
    """Fit a probe on a cache's image embeddings and one of its index columns."""
    from clipaudit.extraction.cache import open_cache

    cache = open_cache(cache_dpath)
    index = cache.ok_index.reset_index(drop=True)
    if label_column not in index.columns:
        raise InputError(f"{cache_dpath}: no column {label_column!r} in the cache index "
                         f"(columns: {', '.join(map(str, index.columns))})")
    known = index[label_column].notna().to_numpy()
    if known.sum() < 2:
        raise InputError(f"{cache_dpath}: column {label_column!r} has no labels to fit a probe on")
    embeds = cache.load_embeds()[torch.tensor(known)]
    provenance = {"backbone": cache.provenance["backbone"], "hook": cache.provenance["hook"],
                  "data_sha256": cache.provenance.get("data_sha256"), "label_column": label_column}
    return fit_probe(embeds, index.loc[known, label_column].astype(str).tolist(), config,
                     provenance=provenance)


def _load_for(fpath: Path, backbone: Backbone) -> LinearProbe:
    return load_probe(fpath, expect_backbone_id=backbone.id, expect_dim=backbone.embed_dim)


register_head_type(HeadType(
    "linear-probe", "a linear probe file (safetensors: weight [C, D], bias [C]; clipaudit fit-probe)",
    _load_for))
