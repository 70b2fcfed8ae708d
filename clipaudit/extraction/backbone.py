"""Load a CLIP, named explicitly: an open_clip model + pretrained tag (or a weights file),
an ``hf-hub:`` id, a local checkpoint + its model config, the bundled tiny CLIP, or
random weights when asked for with ``pretrained="random"``.

Nothing is chosen silently: ``BackboneSpec()`` names no model and loading it is a
one-line error listing the ways to name one. Nothing loads what a step does not need:
with ``text=False`` (extraction, SAE checks) only the image tower is built and its
weights read, so no tokenizer, no text tower and no ``transformers`` are needed; with
text the tokenizer is built on first use. Nothing waits on a network that is not
there (``clipaudit.extraction.weights``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import sha256_file, sha256_json
from clipaudit.errors import InputError, ModelUnavailableError
from clipaudit.extraction import weights as wt
from clipaudit.extraction.build import (  # noqa: F401  (re-exported)
    ImageTowerOnly,
    MissingExtraError,
    build_image_tower,
    build_model,
    load_weights,
    make_tokenizer,
    preprocessing,
)
from clipaudit.resources import package_data_dpath

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-derm-clip"
"""Name of the bundled tiny CLIP (trained by clipaudit on its synthetic world)."""
RANDOM = "random"
"""``pretrained`` value that asks for random weights (tests, benchmarks, coverage)."""
BIRDS_MODEL_NAME = "tiny-birds-clip"
"""Name of the bundled tiny CLIP of the birds world."""
BUNDLED_MODELS: dict[str, str] = {TINY_MODEL_NAME: "tiny_derm_clip", BIRDS_MODEL_NAME: "tiny_birds_clip"}
"""The bundled tiny CLIPs: ``--model`` name -> folder under ``clipaudit/_data``."""

WAYS_TO_NAME_A_MODEL = (
    "--model NAME --pretrained TAG (an open_clip model; weights from your local cache or a "
    "file given as TAG), --checkpoint FILE --model-config CONFIG.json (your own model), "
    f"--model hf-hub:ORG/REPO, or --model {TINY_MODEL_NAME} (the bundled demo model); "
    f"--pretrained {RANDOM} with --model NAME or --model-config CONFIG.json gives random weights"
)


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP to load. Exactly one way of naming it:

    - ``model`` (open_clip name) + ``pretrained`` (tag, weights file, or ``random``),
    - ``model="hf-hub:org/repo"``,
    - ``config`` (open_clip model-config JSON) + ``checkpoint`` (weights file), or
      ``config`` + ``pretrained="random"``,
    - ``model="tiny-derm-clip"`` (``BackboneSpec.bundled()``) or another of
      ``BUNDLED_MODELS``: a bundled tiny CLIP.
    """

    model: str | None = None
    """open_clip model name, ``hf-hub:`` id, a bundled tiny CLIP (``tiny-derm-clip``,
    ``tiny-birds-clip``), or the name to record for a ``config`` + ``checkpoint`` model
    (default: the config file's stem)."""
    pretrained: str | None = None
    """open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...), a weights file,
    or ``random`` for random weights."""
    checkpoint: Path | None = None
    """Local weights file (safetensors, or a torch state dict read with weights_only=True)."""
    config: Path | None = None
    """open_clip model-config JSON for ``checkpoint`` (a model you trained)."""
    seed: int = 0
    """Seed of the random initialisation (``pretrained="random"``)."""

    @classmethod
    def bundled(cls) -> BackboneSpec:
        """The bundled tiny CLIP (the demo's model)."""
        return cls(model=TINY_MODEL_NAME)

    @property
    def random(self) -> bool:
        return self.pretrained == RANDOM

    def validate(self) -> None:
        """An InputError unless exactly one way of naming a model is used."""
        if self.model is None and self.config is None and self.checkpoint is None:
            if self.pretrained:
                raise InputError(f"--pretrained {self.pretrained} needs --model NAME "
                                 "(or --model-config CONFIG.json)")
            raise InputError(f"no model named; name one with {WAYS_TO_NAME_A_MODEL}")
        if self.checkpoint is not None and self.config is None:
            raise InputError(f"{self.checkpoint}: a checkpoint needs its open_clip model config "
                             "(--model-config CONFIG.json)")
        if self.config is not None:
            if self.checkpoint is not None and self.pretrained:
                raise InputError("--pretrained and --checkpoint both name weights; give one")
            if self.checkpoint is None and not self.random:
                raise InputError(f"{self.config}: a model config without weights; give them "
                                 f"with --checkpoint FILE, or ask for random weights with "
                                 f"--pretrained {RANDOM}")
            if self.pretrained and not self.random:
                raise InputError("--pretrained TAG goes with --model NAME; with --model-config "
                                 "give --checkpoint FILE")
            return
        assert self.model is not None
        if self.model in BUNDLED_MODELS or self.model.startswith("hf-hub:"):
            if self.pretrained:
                raise InputError(f"--model {self.model} brings its own weights; drop "
                                 f"--pretrained {self.pretrained}")
            return
        if not self.pretrained:
            raise InputError(f"--model {self.model} without --pretrained: name its weights "
                             f"(--pretrained TAG or a weights file), or ask for random weights "
                             f"with --pretrained {RANDOM}")


@dataclass
class Backbone:
    """A loaded CLIP with its image preprocessing, tokenizer and provenance."""

    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    make_tokenizer: Callable[[], Callable[[Sequence[str]], torch.Tensor]] | None
    """Builds the tokenizer on first use; None when only the image tower was loaded."""
    provenance: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 0
    """Width of the image embedding."""
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def id(self) -> str:
        """Stable identity used to match artifacts to the model they came from."""
        return str(self.provenance["id"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self

    @property
    def tokenizer(self) -> Callable[[Sequence[str]], torch.Tensor]:
        if self.make_tokenizer is None:
            raise InputError(f"model {self.id} was loaded without its text tower "
                             "(load_backbone(..., text=True) encodes text)")
        if self._tokenizer is None:
            self._tokenizer = self.make_tokenizer()
        return self._tokenizer

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings [len(texts), D] (float32, on CPU)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=False).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (the tower's own forward pass)."""
        return self.model.encode_image(images, normalize=False)


@dataclass(frozen=True)
class _Source:
    """What to build and load: the model config, preprocessing and weights file."""

    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    weights: Path | None
    provenance: dict[str, Any]
    size_from_config: bool = True
    """Preprocess size: the config's image size (config files) or the tower's (named)."""


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu", *,
                  text: bool = True) -> Backbone:
    """Build the model ``spec`` names, in eval mode, on ``device``. ``text=False`` builds
    the image tower alone (no text tower, no tokenizer)."""
    spec.validate()
    source = _resolve(spec)
    model = build_model(source.model_cfg, text=text, seed=spec.seed, random=source.weights is None)
    if source.weights is not None:
        load_weights(model, source.weights, spec.config or spec.model, text=text)
    size = source.model_cfg["vision_cfg"].get("image_size", 224) if source.size_from_config else None
    preprocess, preprocess_cfg = preprocessing(model, source.preprocess_cfg, size)
    provenance = {**source.provenance, "preprocess": preprocess_cfg}
    tokenizer = (lambda: make_tokenizer(source.model_cfg, provenance["id"])) if text else None
    backbone = Backbone(model.eval(), preprocess, tokenizer, provenance,
                        embed_dim=int(source.model_cfg["embed_dim"]))
    return backbone.to(device)


def _resolve(spec: BackboneSpec) -> _Source:
    if spec.config is not None:
        model_cfg, preprocess_cfg = wt.read_model_config(Path(spec.config))
        return _local_source(spec, model_cfg, preprocess_cfg)
    assert spec.model is not None
    if spec.model in BUNDLED_MODELS:
        return _bundled_source(spec.model)
    if spec.model.startswith("hf-hub:"):
        config_fpath, weights = wt.hf_hub_files(spec.model)
        model_cfg, preprocess_cfg = wt.read_model_config(config_fpath)
        source = _local_source(BackboneSpec(model=spec.model, config=config_fpath,
                                            checkpoint=weights), model_cfg, preprocess_cfg)
        return _with_provenance(source, id=spec.model)
    return _named_source(spec)


def _named_source(spec: BackboneSpec) -> _Source:
    import open_clip

    name = str(spec.model)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise InputError(f"unknown open_clip model {name!r}; see open_clip.list_models() "
                         "or pass --model-config CONFIG.json --checkpoint FILE")
    preprocess_cfg: dict[str, Any] = {}
    tag = str(spec.pretrained)
    weights: Path | None = None
    if spec.random:
        ident, weights_ident = f"{name}@random-seed{spec.seed}", f"random-seed{spec.seed}"
    elif os.path.isfile(tag):
        weights = Path(tag)
        digest = sha256_file(weights)
        ident, weights_ident = f"{name}@sha256:{digest[:16]}", f"sha256:{digest}"
    else:
        path, tag_cfg = wt.find_pretrained_file(name, tag)
        weights, preprocess_cfg = Path(path), dict(tag_cfg)
        ident, weights_ident = f"{name}@{tag}", tag
    provenance = {"id": ident, "model": name, "pretrained": spec.pretrained,
                  "weights": weights_ident}
    return _Source(copy.deepcopy(model_cfg), preprocess_cfg, weights, provenance,
                   size_from_config=False)


def _local_source(spec: BackboneSpec, model_cfg: dict[str, Any],
                  preprocess_cfg: dict[str, Any]) -> _Source:
    config = Path(str(spec.config))
    if spec.checkpoint is not None:
        ckpt = Path(spec.checkpoint)
        if not ckpt.is_file():
            raise InputError(f"{ckpt}: checkpoint not found")
        weights = f"sha256:{sha256_file(ckpt)}"
    else:
        weights = f"random-seed{spec.seed}"
    config_hash = sha256_json(model_cfg)
    name = spec.model or config.stem
    short_weights = weights[len("sha256:"):][:16] if weights.startswith("sha256:") else weights
    provenance = {
        "id": f"{name}@{short_weights}+cfg{config_hash[:8]}",
        "model": name,
        "pretrained": RANDOM if spec.random else None,
        "weights": weights,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "config": str(spec.config),
        "config_sha256": config_hash,
    }
    return _Source(model_cfg, preprocess_cfg, spec.checkpoint, provenance)


def bundled_model_dpath(name: str) -> Path:
    """The package folder of the bundled tiny CLIP ``name`` (one of ``BUNDLED_MODELS``)."""
    return package_data_dpath() / BUNDLED_MODELS[name]


def _bundled_source(name: str) -> _Source:
    dpath = bundled_model_dpath(name)
    config, weights = dpath / "config.json", dpath / "model.safetensors"
    if not weights.is_file():
        raise ModelUnavailableError(
            f"the bundled tiny CLIP {name} is missing ({weights}); rebuild it with "
            "`clipaudit synthetic train-clip --install` or reinstall clipaudit"
        )
    model_cfg, preprocess_cfg = wt.read_model_config(config)
    source = _local_source(BackboneSpec(model=name, checkpoint=weights, config=config),
                           model_cfg, preprocess_cfg)
    return _with_provenance(source, id=f"{name}@{source.provenance['weights'][7:23]}")


def _with_provenance(source: _Source, **changes: Any) -> _Source:
    return _Source(source.model_cfg, source.preprocess_cfg, source.weights,
                   {**source.provenance, **changes}, source.size_from_config)


# ------------------------------------------------------------------ provenance


def spec_from_provenance(provenance: dict[str, Any]) -> BackboneSpec:
    """The spec that loads the backbone a clipaudit artifact was made with."""
    model = provenance.get("model")
    weights = str(provenance.get("weights") or "")
    seed = int(weights.removeprefix("random-seed")) if weights.startswith("random-seed") else 0
    pretrained = provenance.get("pretrained")
    if model in BUNDLED_MODELS:
        return BackboneSpec(model=str(model))
    if str(model).startswith("hf-hub:"):
        return BackboneSpec(model=str(model))
    if provenance.get("config"):
        ckpt = provenance.get("checkpoint")
        random = weights.startswith("random-seed")
        return BackboneSpec(model=model, config=Path(provenance["config"]),
                            checkpoint=Path(ckpt) if ckpt else None,
                            pretrained=RANDOM if random else None, seed=seed)
    if weights.startswith("random-seed") and not pretrained:
        pretrained = RANDOM  # recorded by a clipaudit that did not say so
    return BackboneSpec(model=model, pretrained=pretrained, seed=seed)


def load_backbone_for(provenance: dict[str, Any], device: str | torch.device = "cpu", *,
                      text: bool = True) -> Backbone:
    """Load the backbone an artifact records, refusing one whose identity changed."""
    from clipaudit.errors import MismatchError

    backbone = load_backbone(spec_from_provenance(provenance), device, text=text)
    if provenance.get("id") and backbone.id != provenance["id"]:
        raise MismatchError(f"the model recorded as {provenance['id']!r} now loads as "
                            f"{backbone.id!r} (its weights or config changed)")
    return backbone
