"""SAEs published for vision models, converted exactly into clipaudit's TopKSAE.

- ``prisma`` (ViT-Prisma, ``vit_prisma/sae/sae.py``): a folder with ``config.json``
  (``d_in``, ``d_sae``, ``activation_fn_str`` relu | topk with ``activation_fn_kwargs.k``,
  ``normalize_activations`` none | constant_norm_rescale | layer_norm) and a weights
  file (torch state dict or safetensors: ``W_enc`` [d, m], ``b_enc``, ``W_dec`` [m, d],
  ``b_dec``). pre = (N(x) - b_dec) W_enc + b_enc; top-k then ReLU, or ReLU; decoding
  undoes N per row.
- ``clip-scope`` (Lewington-pitsos/clipscope): a torch file ``{"k", "n_features",
  "d_in", "model_state_dict": {"pre_b", "enc" [d, m], "dec" [m, d]}}``: z = TopK_k((x -
  pre_b) enc) without ReLU (or ReLU without ``k``), x_hat = z dec + pre_b.
- ``dictionary-learning`` (saprmarks/dictionary_learning, and sae-for-vlm's Matryoshka
  SAEs trained with it): ``ae.pt`` (+ ``config.json``). BatchTopKSAE and
  MatryoshkaBatchTopKSAE encode at inference with their learnt ``threshold`` buffer:
  f = ReLU(pre) * (ReLU(pre) > threshold); AutoEncoderTopK is top-k after ReLU;
  AutoEncoder is ReLU; JumpReluAutoEncoder is ReLU above a threshold per latent.
- ``patchsae``: PatchSAE's ReLU SAE, after converting its pickled checkpoint to
  safetensors (README recipe: metadata ``format: patchsae``).

Torch files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from clipaudit.errors import ArtifactError
from clipaudit.sae.foreign import (
    ImportOptions,
    _tensor,
    build_sae,
    relu_activation,
    torch_load_safely,
)
from clipaudit.sae.model import TopKSAE

_WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


# ------------------------------------------------------------------ peeking at files


def is_torch_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


@functools.lru_cache(maxsize=16)
def _peek(path: str, mtime: float, size: int) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be memory-mapped; or not safe to load
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None


def peek_torch(path: Path) -> Any:
    """The object a torch file holds (loaded safely, memory-mapped), or None."""
    if not is_torch_file(path):
        return None
    stat = path.stat()
    return _peek(str(path), stat.st_mtime, stat.st_size)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {k: v.float() for k, v in load_file(str(path)).items()}
        except Exception as e:  # safetensors raises its own error types
            raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    state = torch_load_safely(path, path)
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: expected a state dict of tensors")
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return doc


# ------------------------------------------------------------------ ViT-Prisma


def prisma_paths(path: Path) -> tuple[Path, Path | None]:
    """(config.json, weights file) of a Prisma SAE given as its folder or its weights."""
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        return path / "config.json", weights[-1] if weights else None
    return path.parent / "config.json", path


def sniff_prisma(path: Path) -> bool:
    cfg_fpath, weights = prisma_paths(path)
    if weights is None or not cfg_fpath.is_file() or path.name == "cfg.json":
        return False
    try:
        cfg = json.loads(cfg_fpath.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(cfg, dict) and "d_sae" in cfg and "d_in" in cfg
            and ("activation_fn_str" in cfg or "normalize_activations" in cfg))


def read_prisma(path: Path, options: ImportOptions) -> TopKSAE:
    cfg_fpath, weights_fpath = prisma_paths(path)
    if weights_fpath is None:
        raise ArtifactError(f"{path}: no Prisma weights file (.pt or .safetensors) beside config.json")
    cfg = _read_json(cfg_fpath)
    t = _load_weights(weights_fpath)
    if cfg.get("architecture", "standard") != "standard":
        raise ArtifactError(f"{cfg_fpath}: Prisma architecture {cfg['architecture']!r} is not "
                            "supported (supported: standard)")
    notes: list[str] = []
    W_enc, W_dec = _tensor(t, "W_enc", weights_fpath).T, _tensor(t, "W_dec", weights_fpath).T
    fn = cfg.get("activation_fn_str", "relu")
    if fn == "topk":
        k = (cfg.get("activation_fn_kwargs") or {}).get("k") or options.k
        if k is None:
            raise ArtifactError(f"{cfg_fpath}: a topk SAE without activation_fn_kwargs.k")
        k, activation = int(k), "topk"
    elif fn == "relu":
        k, activation = relu_activation("Prisma relu", W_enc.shape[0], options, notes)
    else:
        raise ArtifactError(f"{cfg_fpath}: Prisma activation {fn!r} is not supported "
                            "(supported: relu, topk)")
    input_norm = cfg.get("normalize_activations") or "none"
    if input_norm not in ("none", "constant_norm_rescale", "layer_norm"):
        raise ArtifactError(f"{cfg_fpath}: normalize_activations={input_norm!r} is not supported "
                            "(supported: none, constant_norm_rescale, layer_norm)")
    sae = build_sae(path, "prisma", W_enc=W_enc, b_enc=_tensor(t, "b_enc", weights_fpath),
                    W_dec=W_dec, b_dec=_tensor(t, "b_dec", weights_fpath), k=k, relu=True,
                    scale=options.scale or 1.0, notes=notes, activation=activation,
                    input_norm=input_norm, architecture=f"Prisma {fn}")
    sae.meta["source_config"] = cfg
    return sae


# ------------------------------------------------------------------ CLIP-Scope


def sniff_clip_scope(path: Path) -> bool:
    obj = peek_torch(path)
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    return isinstance(state, dict) and {"pre_b", "enc", "dec"} <= set(state)


def read_clip_scope(path: Path, options: ImportOptions) -> TopKSAE:
    obj = torch_load_safely(path, path)
    state = obj.get("model_state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: expected a CLIP-Scope checkpoint with 'model_state_dict'")
    enc, dec, pre_b = (_tensor(state, key, path) for key in ("enc", "dec", "pre_b"))
    notes: list[str] = []
    if obj.get("k") is not None:  # TopKSAE: top-k of the raw values, no ReLU
        k, activation, relu = int(options.k or obj["k"]), "topk", False
    else:  # SAE: ReLU
        k, activation = relu_activation("CLIP-Scope", enc.shape[1], options, notes)
        relu = True
    return build_sae(path, "clip-scope", W_enc=enc.T, b_enc=torch.zeros(enc.shape[1]),
                     W_dec=dec.T, b_dec=pre_b, k=k, relu=relu, scale=options.scale or 1.0,
                     notes=notes, activation=activation,
                     architecture="TopKSAE" if activation == "topk" and not relu else "SAE (ReLU)")


# ------------------------------------------------------------------ dictionary_learning


_DL_LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
_DL_PARAMS = {"W_enc", "b_enc", "W_dec", "b_dec"}


def dictionary_learning_paths(path: Path) -> tuple[Path, Path]:
    """(ae.pt, config.json) of a dictionary_learning SAE given as its folder or file."""
    if path.is_dir():
        return path / "ae.pt", path / "config.json"
    return path, path.parent / "config.json"


def _dl_class(state: dict[str, Any], config: dict[str, Any]) -> str | None:
    named = (config.get("trainer") or {}).get("dict_class") or config.get("dict_class")
    if named:
        return str(named)
    keys = set(state)
    if _DL_PARAMS <= keys and "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if _DL_PARAMS <= keys and "threshold" in keys and "k" not in keys:
        return "JumpReluAutoEncoder"
    if _DL_LINEAR <= keys and "b_dec" in keys:
        return "BatchTopKSAE" if "threshold" in keys else "AutoEncoderTopK"
    if _DL_LINEAR <= keys and "bias" in keys:
        return "AutoEncoder"
    return None


def sniff_dictionary_learning(path: Path) -> bool:
    weights, config = dictionary_learning_paths(path)
    state = peek_torch(weights)
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        return False
    try:
        cfg = _read_json(config) if config.is_file() else {}
    except ArtifactError:
        cfg = {}
    return _dl_class(state, cfg) is not None


def read_dictionary_learning(path: Path, options: ImportOptions) -> TopKSAE:
    weights, config_fpath = dictionary_learning_paths(path)
    state = torch_load_safely(weights, weights)
    if not isinstance(state, dict):
        raise ArtifactError(f"{weights}: expected a dictionary_learning state dict")
    config = _read_json(config_fpath) if config_fpath.is_file() else {}
    cls = _dl_class(state, config)
    notes: list[str] = []
    t = {key: _tensor(state, key, weights) for key in state if isinstance(state[key], torch.Tensor)}
    if cls in ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        W_enc, b_enc = t["W_enc"].T, t["b_enc"]
        W_dec, b_dec = t["W_dec"].T, t["b_dec"]
    elif cls in ("BatchTopKSAE", "AutoEncoderTopK"):
        W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"], t["b_dec"]
    elif cls == "AutoEncoder":
        W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"], t["bias"]
    else:
        raise ArtifactError(f"{weights}: dictionary_learning class {cls!r} is not supported "
                            "(supported: BatchTopKSAE, MatryoshkaBatchTopKSAE, AutoEncoderTopK, "
                            "JumpReluAutoEncoder, AutoEncoder)")
    n_latents = W_enc.shape[0]
    stated_k = int(t["k"].item()) if "k" in t else (options.k or n_latents)
    threshold: torch.Tensor | float = 0.0
    if cls == "AutoEncoderTopK":
        k, activation = int(options.k or stated_k), "topk"
    elif cls == "AutoEncoder":
        k, activation = relu_activation("dictionary_learning AutoEncoder", n_latents, options, notes)
    elif cls == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False unless set by hand
        b_enc = b_enc + W_enc @ b_dec
        k, activation, threshold = n_latents, "threshold", t["threshold"]
        notes.append("assumed apply_b_dec_to_input=False (dictionary_learning's default)")
    else:  # BatchTopK and Matryoshka: their inference rule, the learnt threshold
        k, activation, threshold = min(stated_k, n_latents), "threshold", t["threshold"]
        if float(t["threshold"].reshape(-1)[0]) < 0:
            notes.append("the threshold was never learnt (it is -1): every positive latent is "
                         "active, as dictionary_learning's encode does")
    sae = build_sae(path, "dictionary-learning", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                    k=k, relu=True, scale=options.scale or 1.0, notes=notes, activation=activation,
                    threshold=threshold, architecture=cls)
    sae.meta["source_config"] = config
    return sae


# ------------------------------------------------------------------ PatchSAE (converted)


def sniff_patchsae(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == "patchsae"
    except Exception:  # not a readable safetensors file
        return False


def read_patchsae(path: Path, options: ImportOptions) -> TopKSAE:
    t = _load_weights(path)
    notes: list[str] = []
    W_enc, W_dec = _tensor(t, "W_enc", path).T, _tensor(t, "W_dec", path).T
    k, activation = relu_activation("PatchSAE", W_enc.shape[0], options, notes)
    return build_sae(path, "patchsae", W_enc=W_enc, b_enc=_tensor(t, "b_enc", path), W_dec=W_dec,
                     b_dec=_tensor(t, "b_dec", path), k=k, relu=True, scale=options.scale or 1.0,
                     notes=notes, activation=activation, architecture="PatchSAE (ReLU)")
