"""Load an open_clip ViT: by name + pretrained tag, by ``hf-hub:`` id, from a local
checkpoint plus a model-config JSON, or the bundled tiny CLIP.

Nothing here waits on a network that is not there: weights are looked up in the
local caches first; when they are missing and the hub is unreachable (or
``HF_HUB_OFFLINE=1``), a ``ModelUnavailableError`` says which model, where it
looked and how to supply a local file, within seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import sha256_file, sha256_json
from clipaudit.errors import InputError, ModelUnavailableError
from clipaudit.resources import package_data_dpath

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-derm-clip"
"""Name of the bundled tiny CLIP (trained by clipaudit on its synthetic world)."""
BIRDS_MODEL_NAME = "tiny-birds-clip"
"""Name of the bundled tiny CLIP of the birds world."""
BUNDLED_MODELS: dict[str, str] = {TINY_MODEL_NAME: "tiny_derm_clip", BIRDS_MODEL_NAME: "tiny_birds_clip"}
"""The bundled tiny CLIPs: ``--model`` name -> folder under ``clipaudit/_data``."""

_HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class BackboneSpec:
    """Which CLIP to load. Exactly one way of naming it is used:

    - ``model`` + ``pretrained`` tag (or a weights file in ``pretrained``),
    - ``model="hf-hub:org/repo"``,
    - ``config`` (an open_clip model-config JSON) + ``checkpoint`` (weights file),
    - ``model="tiny-derm-clip"`` (the default) or another of ``BUNDLED_MODELS``: a bundled
      tiny CLIP.
    """

    model: str = TINY_MODEL_NAME
    """open_clip model name, ``hf-hub:`` id, or a bundled tiny CLIP (``tiny-derm-clip``,
    ``tiny-birds-clip``)."""
    pretrained: str | None = None
    """open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``, ...) or a weights file."""
    checkpoint: Path | None = None
    """Local weights file (safetensors, or a torch state dict read with weights_only=True)."""
    config: Path | None = None
    """open_clip model-config JSON for ``checkpoint`` (a model you trained)."""
    seed: int = 0
    """Seed for random initialisation when no weights are given (tests, benchmarks)."""


@dataclass
class Backbone:
    """A loaded CLIP with its image preprocessing, tokenizer and provenance."""

    model: Any
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

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

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unnormalised text embeddings [len(texts), D] (float32, on CPU)."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        proj = self.model.visual.proj
        return int(proj.shape[1]) if proj is not None else int(self.model.visual.output_dim)


def load_backbone(spec: BackboneSpec = BackboneSpec(), device: str | torch.device = "cpu") -> Backbone:
    """Build the model described by ``spec``, in eval mode, on ``device``."""
    import open_clip

    if spec.config is not None or spec.checkpoint is not None:
        backbone = _load_local(spec)
    elif spec.model in BUNDLED_MODELS:
        backbone = _load_bundled(spec.model)
    elif spec.model.startswith("hf-hub:"):
        backbone = _load_hf_hub(spec.model)
    else:
        if spec.model not in open_clip.list_models():
            raise InputError(
                f"unknown open_clip model {spec.model!r}; see open_clip.list_models() "
                f"or pass --model-config CONFIG.json --checkpoint FILE"
            )
        backbone = _load_named(spec)
    backbone.model.eval()
    backbone.to(device)
    if not hasattr(backbone.model, "visual") or not hasattr(backbone.model.visual, "transformer"):
        raise InputError(f"model {backbone.id}: clipaudit audits ViT image towers only")
    return backbone


# ------------------------------------------------------------------ named + tag


def _load_named(spec: BackboneSpec) -> Backbone:
    import open_clip

    weights: str | None = None
    if spec.pretrained:
        weights = _find_pretrained_file(spec.model, spec.pretrained)
    else:
        torch.manual_seed(spec.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(spec.model, pretrained=weights)
    if spec.pretrained is None:
        ident, weights_ident = f"{spec.model}@random-seed{spec.seed}", f"random-seed{spec.seed}"
    elif os.path.isfile(spec.pretrained):
        digest = sha256_file(spec.pretrained)
        ident, weights_ident = f"{spec.model}@sha256:{digest[:16]}", f"sha256:{digest}"
    else:
        ident, weights_ident = f"{spec.model}@{spec.pretrained}", spec.pretrained
    provenance = {
        "id": ident,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "weights": weights_ident,
        "preprocess": _preprocess_cfg(model),
    }
    return Backbone(model, preprocess, open_clip.get_tokenizer(spec.model), provenance)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name)
        if isinstance(hit, str):
            return hit
    return None


def _weight_candidates(filename: str) -> list[str]:
    names = []
    if filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return names


def _find_pretrained_file(model: str, tag: str) -> str:
    """Local path of the weights for ``model``/``tag``, downloading only when online."""
    import open_clip

    if os.path.isfile(tag):
        return tag
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise InputError(f"model {model}: unknown pretrained tag {tag!r} (known: {tags})")
    looked = []
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        hit = _hf_cached(repo_id, _weight_candidates(filename or "open_clip_pytorch_model.bin"))
        if hit:
            return hit
        looked.append(f"the Hugging Face cache for {repo_id}")
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if target.is_file():
            return str(target)
        looked.append(str(target))
    _raise_unless_online(f"{model} (pretrained {tag!r})", looked)
    return open_clip.download_pretrained(cfg)


def _raise_unless_online(what: str, looked: Sequence[str]) -> None:
    why = "HF_HUB_OFFLINE is set" if _offline() else None
    if why is None and not _hub_reachable():
        why = "the model hub is unreachable"
    if why:
        raise ModelUnavailableError(
            f"weights for {what} are not available: {why} and they are not in "
            f"{' or '.join(looked) or 'any local cache'}; download them once on a connected "
            "machine, or pass a local file with --checkpoint FILE --model-config CONFIG.json"
        )


# ------------------------------------------------------------------ hf-hub


def _load_hf_hub(name: str) -> Backbone:
    repo_id = name.removeprefix("hf-hub:")
    config_fpath = _hf_cached(repo_id, ["open_clip_config.json"])
    weights = _hf_cached(repo_id, ["open_clip_model.safetensors",
                                   "open_clip_pytorch_model.safetensors",
                                   "open_clip_pytorch_model.bin"])
    if config_fpath is None or weights is None:
        _raise_unless_online(name, [f"the Hugging Face cache for {repo_id}"])
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
        provenance = {"id": name, "model": name, "pretrained": None, "weights": name,
                      "preprocess": _preprocess_cfg(model)}
        return Backbone(model, preprocess, tokenizer, provenance)
    backbone = _load_local(BackboneSpec(model=name, checkpoint=Path(weights),
                                        config=Path(config_fpath)))
    backbone.provenance["id"] = name
    return backbone


# ------------------------------------------------------------------ local files


def _read_model_config(fpath: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) from an open_clip model config or open_clip_config.json."""
    if not fpath.is_file():
        raise InputError(f"{fpath}: model config not found")
    try:
        doc = json.loads(fpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{fpath}: model config is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{fpath}: model config must be a JSON object")
    model_cfg = doc.get("model_cfg", doc)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise InputError(f"{fpath}: not an open_clip model config (missing {', '.join(missing)})")
    return model_cfg, dict(doc.get("preprocess_cfg", {}))


def _build_from_config(model_cfg: dict[str, Any]) -> Any:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = {k: v for k, v in model_cfg.items() if k not in {"custom_text"}}
    cls = CustomTextCLIP if model_cfg.get("custom_text") or "hf_model_name" in cfg["text_cfg"] else CLIP
    return cls(**cfg)


def _tokenizer_for(model_cfg: dict[str, Any]) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                     context_length=text_cfg.get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def _load_local(spec: BackboneSpec) -> Backbone:
    import open_clip

    if spec.config is None:
        raise InputError(f"{spec.checkpoint}: a checkpoint needs its open_clip model config "
                         "(--model-config CONFIG.json)")
    model_cfg, preprocess_cfg = _read_model_config(Path(spec.config))
    torch.manual_seed(spec.seed)
    try:
        model = _build_from_config(model_cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"{spec.config}: cannot build a model from this config ({e})") from None
    if spec.checkpoint is not None:
        ckpt = Path(spec.checkpoint)
        if not ckpt.is_file():
            raise InputError(f"{ckpt}: checkpoint not found")
        try:
            open_clip.load_checkpoint(model, str(ckpt), weights_only=True)
        except Exception as e:  # torch/safetensors raise many types for bad files
            raise InputError(f"{ckpt}: cannot load these weights into the model of "
                             f"{spec.config} ({str(e).splitlines()[0][:300]})") from None
        weights = f"sha256:{sha256_file(ckpt)}"
    else:
        weights = f"random-seed{spec.seed}"
    size = model_cfg["vision_cfg"].get("image_size", 224)
    preprocess = open_clip.image_transform(
        size, is_train=False, mean=preprocess_cfg.get("mean"), std=preprocess_cfg.get("std"),
        resize_mode=preprocess_cfg.get("resize_mode"),
        interpolation=preprocess_cfg.get("interpolation"),
    )
    model.visual.preprocess_cfg = {"size": size, **preprocess_cfg}
    config_hash = sha256_json(model_cfg)
    name = Path(spec.config).stem if spec.model == TINY_MODEL_NAME else spec.model
    short_weights = weights[len("sha256:"):][:16] if weights.startswith("sha256:") else weights
    provenance = {
        "id": f"{name}@{short_weights}+cfg{config_hash[:8]}",
        "model": name,
        "pretrained": None,
        "weights": weights,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "config": str(spec.config),
        "config_sha256": config_hash,
        "preprocess": _preprocess_cfg(model),
    }
    return Backbone(model, preprocess, _tokenizer_for(model_cfg), provenance)


def bundled_model_dpath(name: str) -> Path:
    """The package folder of the bundled tiny CLIP ``name`` (one of ``BUNDLED_MODELS``)."""
    return package_data_dpath() / BUNDLED_MODELS[name]


def _load_bundled(name: str) -> Backbone:
    dpath = bundled_model_dpath(name)
    config, weights = dpath / "config.json", dpath / "model.safetensors"
    if not weights.is_file():
        raise ModelUnavailableError(
            f"the bundled tiny CLIP {name} is missing ({weights}); rebuild it with "
            "`clipaudit synthetic train-clip --install` or reinstall clipaudit"
        )
    backbone = _load_local(BackboneSpec(model=name, checkpoint=weights, config=config))
    backbone.provenance["model"] = name
    backbone.provenance["id"] = f"{name}@{backbone.provenance['weights'][7:23]}"  # sha256:…
    return backbone


def _preprocess_cfg(model: Any) -> dict[str, Any]:
    from open_clip.model import get_model_preprocess_cfg

    cfg = dict(get_model_preprocess_cfg(model))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def spec_from_provenance(provenance: dict[str, Any]) -> BackboneSpec:
    """The spec that loads the backbone a clipaudit artifact was made with."""
    model = str(provenance.get("model") or TINY_MODEL_NAME)
    weights = str(provenance.get("weights") or "")
    seed = int(weights.removeprefix("random-seed")) if weights.startswith("random-seed") else 0
    if model in BUNDLED_MODELS:
        return BackboneSpec(model=model)
    if provenance.get("config"):
        ckpt = provenance.get("checkpoint")
        return BackboneSpec(model=model, config=Path(provenance["config"]),
                            checkpoint=Path(ckpt) if ckpt else None, seed=seed)
    return BackboneSpec(model=model, pretrained=provenance.get("pretrained"), seed=seed)


def load_backbone_for(provenance: dict[str, Any], device: str | torch.device = "cpu") -> Backbone:
    """Load the backbone an artifact records, refusing one whose identity changed."""
    from clipaudit.errors import MismatchError

    backbone = load_backbone(spec_from_provenance(provenance), device)
    if provenance.get("id") and backbone.id != provenance["id"]:
        raise MismatchError(f"the model recorded as {provenance['id']!r} now loads as "
                            f"{backbone.id!r} (its weights or config changed)")
    return backbone
