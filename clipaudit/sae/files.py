"""clipaudit's own SAE file: safetensors tensors + the JSON header (kind ``sae``).

Tensors: ``W_enc`` [m, d], ``b_enc`` [m], ``W_dec`` [d, m], ``b_dec`` [d], ``scale`` [],
``threshold`` [] or [m] (schema 2). Header: the artifact header (schema, clipaudit
version, provenance = backbone, hook, data) plus ``sae``: d, n_latents, k, relu,
activation, input_norm, scale, normalisation, seed, metrics, training config and
source format. Schema-1 files (TopK only) are still read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import load_tensors, read_tensor_meta, require_match, save_tensors
from clipaudit.errors import ArtifactError
from clipaudit.sae.model import TopKSAE

log = logging.getLogger(__name__)

KIND = "sae"
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "scale")
_OPTIONAL = ("threshold",)


def save_sae(sae: TopKSAE, fpath: Path | str) -> Path:
    """Write ``sae`` (weights, meta, provenance) to a safetensors file, atomically."""
    meta = _jsonable({**sae.meta, "d": sae.d, "n_latents": sae.n_latents, "k": sae.k,
                      "relu": sae.relu, "scale": float(sae.scale), "activation": sae.activation,
                      "input_norm": sae.input_norm, "input_norm_eps": sae.input_norm_eps})
    provenance = {key: meta.get(key) for key in ("backbone", "hook", "data")}
    tensors = {name: getattr(sae, name).detach().float() for name in (*_TENSORS, *_OPTIONAL)}
    return save_tensors(fpath, KIND, tensors, meta={"sae": meta}, provenance=provenance)


def read_sae_file(fpath: Path | str) -> TopKSAE:
    """Load a clipaudit SAE file without checking what it belongs to."""
    tf = load_tensors(fpath, KIND)
    meta = tf.meta.get("sae")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{fpath}: SAE file without its 'sae' metadata")
    missing = [name for name in _TENSORS if name not in tf.tensors]
    if missing:
        raise ArtifactError(f"{fpath}: SAE file lacks tensors {', '.join(missing)}")
    try:
        sae = TopKSAE(int(meta["d"]), int(meta["n_latents"]), int(meta["k"]),
                      relu=bool(meta.get("relu", True)), activation=meta.get("activation", "topk"),
                      input_norm=meta.get("input_norm", "none"),
                      input_norm_eps=float(meta.get("input_norm_eps", 1e-5)), meta=meta)
        t = tf.tensors
        sae.set_weights(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t["scale"],
                        t.get("threshold", torch.tensor(0.0)))
    except (KeyError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{fpath}: SAE tensors do not match their metadata ({e})") from None
    sae.meta["created"] = tf.meta.get("created")
    sae.meta["clipaudit_version"] = tf.meta.get("clipaudit_version")
    sae.eval()
    return sae


def check_sae_matches(sae: TopKSAE, fpath: Path | str, *, expect_backbone_id: str | None = None,
                      expect_hook: Mapping[str, Any] | None = None,
                      expect_d: int | None = None) -> None:
    """Refuse an SAE made for another backbone, hook point or width (MismatchError that
    names both values). Checks only what the file knows: converted checkpoints carry
    no backbone or hook, so for them only the width is checked."""
    if expect_d is not None:
        require_match("SAE input width d", int(expect_d), sae.d, fpath)
    backbone, hook = sae.meta.get("backbone"), sae.meta.get("hook")
    if (expect_backbone_id is not None and not isinstance(backbone, dict)) or (
            expect_hook is not None and not isinstance(hook, dict)):
        log.warning("%s: the SAE does not record the backbone or hook point it was trained "
                    "for; only its width (%d) can be checked", fpath, sae.d)
    if expect_backbone_id is not None and isinstance(backbone, dict):
        require_match("backbone", expect_backbone_id, backbone.get("id"), fpath)
    if expect_hook is not None and isinstance(hook, dict):
        want = {"layer": expect_hook.get("layer"), "token": expect_hook.get("token")}
        require_match("hook point", want, {"layer": hook.get("layer"), "token": hook.get("token")},
                      fpath)


def _jsonable(obj: Any) -> Any:
    """A JSON round trip, so that what is saved is exactly what a reload returns."""
    return json.loads(json.dumps(obj, default=str))


def is_sae_file(fpath: Path) -> bool:
    """True for a safetensors file with a clipaudit ``sae`` header."""
    try:
        meta = read_tensor_meta(fpath)
    except ArtifactError:
        return False
    return meta is not None and meta.get("kind") == KIND
