"""Other people's SAE checkpoints, converted exactly into clipaudit's TopKSAE.

- ``attributing-clip``: the paper's reference code (maxdreyer/attributing-clip,
  ``model_training/sae.py``): a Lightning checkpoint whose ``state_dict`` holds
  weight-normed ``encoder.0`` (Linear d->m with bias) and ``decoder`` (Linear m->d,
  no bias, norm per column); no pre-encoder bias; top-k on raw pre-activations, no ReLU.
- ``saelens``: a folder with ``cfg.json`` + ``sae_weights.safetensors`` (W_enc [d, m],
  b_enc, W_dec [m, d], b_dec); topk (then ReLU), standard/relu and jumprelu;
  ``apply_b_dec_to_input`` and ``normalize_activations`` (none, a constant,
  constant_norm_rescale, layer_norm; per-row ones undone after decoding) honoured.
- ``saev``: ``sae.pt``, one JSON header line then a torch state dict (W_enc [d, m],
  b_enc, W_dec [m, d], b_dec); every header schema; top-k without ReLU, or ReLU.

ReLU SAEs are read exactly (every positive latent active); ``--k`` reads them as TopK-k
instead. More formats (ViT-Prisma, CLIP-Scope, dictionary_learning / sae-for-vlm,
PatchSAE) are in ``clipaudit.sae.published``.

An encoder that does not subtract b_dec is folded exactly into clipaudit's form:
W (x) + b = W (x - b_dec) + (b + W b_dec). Torch files are read with
``torch.load(weights_only=True)`` only, so nothing is ever unpickled.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import torch_load_reason
from clipaudit.errors import ArtifactError, InputError
from clipaudit.sae.model import TopKSAE

log = logging.getLogger(__name__)

_UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class ImportOptions:
    """What a foreign checkpoint may not say about itself."""

    k: int | None = None
    """Top-k where the file does not store it (the reference code), or to read a ReLU SAE
    as TopK-k (exact only for rows with at most k positive pre-activations; without it a
    ReLU SAE is read exactly)."""
    apply_b_dec_to_input: bool | None = None
    """saev only: whether its encoder subtracts b_dec (None: decided from the header)."""
    scale: float | None = None
    """Input normalisation the checkpoint was trained with (inputs multiplied by it);
    None: what the file says, else 1."""


_PICKLED_CONFIGS = {
    "ViTSAERunnerConfig": ("a PatchSAE checkpoint", "patchsae"),
    "VisionModelSAERunnerConfig": ("a ViT-Prisma checkpoint in the legacy {cfg, state_dict} "
                                   "layout", "prisma"),
}


def torch_load_safely(source: Path | io.BytesIO, fpath: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers, never objects."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(e)
        for cls, (what, fmt) in _PICKLED_CONFIGS.items():
            if cls in text:
                raise ArtifactError(
                    f"{fpath}: {what}, whose config is a pickled Python object; clipaudit never "
                    f"unpickles files. Convert it once, on your own machine, with the "
                    f"`{fmt}` recipe in the README (\"SAEs published by others\"): it writes "
                    "the tensors as safetensors and the config as JSON") from None
        raise ArtifactError(f"{fpath}: cannot be read: {torch_load_reason(e)}") from None


# ------------------------------------------------------------------ reference code


def read_attributing_clip(fpath: Path, options: ImportOptions) -> TopKSAE:
    obj = torch_load_safely(fpath, fpath)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ArtifactError(f"{fpath}: expected a checkpoint dict with a 'state_dict'")
    enc_g, enc_v = _weight_norm_pair(state, "encoder.0", fpath)
    dec_g, dec_v = _weight_norm_pair(state, "decoder", fpath)
    b_enc = _tensor(state, _prefix_of(state, "encoder.0") + "encoder.0.bias", fpath)
    # torch weight_norm: w = g * v / ||v||, the norm over every dim but ``dim``;
    # the encoder uses dim=0 (a norm per row), the decoder dim=1 (a norm per column).
    W_enc = enc_g * enc_v / enc_v.norm(dim=1, keepdim=True)
    W_dec = dec_g * dec_v / dec_v.norm(dim=0, keepdim=True)
    k = options.k if options.k is not None else _reference_k(obj)
    if k is None:
        raise InputError(f"{fpath}: the reference code does not store k; pass it "
                         "(--k; the paper used k=64)")
    return build_sae(fpath, "attributing-clip", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec,
                     b_dec=torch.zeros(W_enc.shape[1]), k=k, relu=False,
                     scale=options.scale or 1.0, notes=[])


def _prefix_of(state: dict[str, Any], module: str) -> str:
    """Lightning may prefix the SAE's keys (``sae.``, ``model.sae.``)."""
    for key in state:
        for tail in (f"{module}.weight_v", f"{module}.parametrizations.weight.original1"):
            if key.endswith(tail) and (key == tail or key[: -len(tail)].endswith(".")):
                return key[: -len(tail)]
    return ""


def _weight_norm_pair(state: dict[str, Any], module: str,
                      fpath: Path) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = _prefix_of(state, module)
    for g_key, v_key in (("weight_g", "weight_v"),
                         ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        if f"{prefix}{module}.{v_key}" in state:
            return (_tensor(state, f"{prefix}{module}.{g_key}", fpath),
                    _tensor(state, f"{prefix}{module}.{v_key}", fpath))
    raise ArtifactError(f"{fpath}: no weight-normed '{module}' in the state_dict "
                        f"(keys: {', '.join(list(state)[:8])}); not an attributing-clip TopKSAE")


def _reference_k(obj: Any) -> int | None:
    if not isinstance(obj, dict):
        return None
    for key in ("hyper_parameters", "hparams", "config"):
        hp = obj.get(key)
        if isinstance(hp, dict):
            for name in ("sae_k", "k"):
                if isinstance(hp.get(name), int):
                    return int(hp[name])
    return None


# ------------------------------------------------------------------ SAELens


def saelens_paths(path: Path) -> tuple[Path, Path]:
    dpath = path if path.is_dir() else path.parent
    weights = path if path.suffix == ".safetensors" else dpath / "sae_weights.safetensors"
    return dpath / "cfg.json", weights


def read_saelens(path: Path, options: ImportOptions) -> TopKSAE:
    from safetensors.torch import load_file

    cfg_fpath, weights_fpath = saelens_paths(path)
    cfg = _read_cfg(cfg_fpath)
    for fpath in (weights_fpath,):
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: SAELens weights file not found")
    try:
        t = {k: v.float() for k, v in load_file(str(weights_fpath)).items()}
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{weights_fpath}: not a readable safetensors file ({e})") from None
    notes: list[str] = []
    m = int(_tensor(t, "b_enc", weights_fpath).shape[0])
    k, activation, threshold = _saelens_activation(cfg, cfg_fpath, t, m, options, notes)
    scale, input_norm = _saelens_scale(cfg, options, notes)
    for key in ("reshape_activations",):
        if cfg.get(key, "none") not in ("none", None):
            raise ArtifactError(f"{cfg_fpath}: {key}={cfg[key]!r} is not supported for vision SAEs")
    W_enc = _tensor(t, "W_enc", weights_fpath).T
    W_dec = _tensor(t, "W_dec", weights_fpath).T
    b_enc, b_dec = _tensor(t, "b_enc", weights_fpath), _tensor(t, "b_dec", weights_fpath)
    if "scaling_factor" in t and not torch.allclose(t["scaling_factor"], torch.ones(1)):
        raise ArtifactError(f"{weights_fpath}: a fine-tuning scaling_factor is not supported")
    if cfg.get("rescale_acts_by_decoder_norm") and not _unit_columns(W_dec):
        raise ArtifactError(f"{cfg_fpath}: rescale_acts_by_decoder_norm with non-unit decoder "
                            "rows changes the top-k selection; not supported")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec
    sae = build_sae(path, "saelens", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, k=k,
                    relu=True, scale=scale, notes=notes, activation=activation,
                    threshold=threshold, input_norm=input_norm,
                    architecture=str(cfg.get("architecture") or cfg.get("activation_fn_str")
                                     or "standard"))
    sae.meta["source_config"] = cfg
    return sae


def _read_cfg(cfg_fpath: Path) -> dict[str, Any]:
    if not cfg_fpath.is_file():
        raise ArtifactError(f"{cfg_fpath}: SAELens cfg.json not found")
    try:
        cfg = json.loads(cfg_fpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{cfg_fpath}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{cfg_fpath}: expected a JSON object")
    return cfg


def _saelens_activation(cfg: dict[str, Any], cfg_fpath: Path, t: dict[str, torch.Tensor],
                        n_latents: int, options: ImportOptions,
                        notes: list[str]) -> tuple[int, str, torch.Tensor | float]:
    """(k, activation, threshold): topk (then ReLU), standard/relu (ReLU), jumprelu
    (ReLU(pre) where pre exceeds the latent's threshold)."""
    arch = cfg.get("architecture") or cfg.get("activation_fn_str") or "standard"
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        if k is None and options.k is None:
            raise ArtifactError(f"{cfg_fpath}: a topk SAE without k")
        return int(k if k is not None else options.k), "topk", 0.0  # type: ignore[arg-type]
    if arch in ("standard", "relu"):
        k_read, activation = relu_activation(f"SAELens {arch}", n_latents, options, notes)
        return k_read, activation, 0.0
    if arch == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"]
        elif "log_threshold" in t:
            threshold = t["log_threshold"].exp()
        else:
            raise ArtifactError(f"{cfg_fpath}: a jumprelu SAE without its threshold tensor")
        if bool((threshold < 0).any()):
            raise ArtifactError(f"{cfg_fpath}: a negative JumpReLU threshold is not supported")
        return n_latents, "threshold", threshold
    raise ArtifactError(f"{cfg_fpath}: SAELens architecture {arch!r} is not supported "
                        "(supported: topk, standard/relu, jumprelu)")


def _saelens_scale(cfg: dict[str, Any], options: ImportOptions,
                   notes: list[str]) -> tuple[float, str]:
    """(constant input scale, per-row input normalisation) of a SAELens config."""
    norm = cfg.get("normalize_activations", "none")
    if norm in ("none", None, False):
        return options.scale or 1.0, "none"
    if norm == "expected_average_only_in":
        factor = options.scale or cfg.get("norm_scaling_factor")
        if factor is None:
            notes.append("trained on inputs scaled by a constant factor the file does not store "
                         "(normalize_activations=expected_average_only_in); scale set to 1, "
                         "pass the factor as scale if FVU is poor")
            return 1.0, "none"
        return float(factor), "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        return options.scale or 1.0, str(norm)
    raise ArtifactError(f"normalize_activations={norm!r} is not supported (supported: none, "
                        "expected_average_only_in, constant_norm_rescale, layer_norm)")


def relu_activation(what: str, n_latents: int, options: ImportOptions,
                    notes: list[str]) -> tuple[int, str]:
    """(k, activation) of a ReLU SAE: read exactly (every positive latent active), or as
    TopK-k when ``options.k`` asks for it."""
    if options.k is None:
        return n_latents, "threshold"
    notes.append(f"{what} (ReLU) SAE read as TopK-{options.k} as asked: exact only for rows "
                 f"with at most {options.k} positive pre-activations")
    return options.k, "topk"


# ------------------------------------------------------------------ saev


def read_saev(fpath: Path, options: ImportOptions) -> TopKSAE:
    with open(fpath, "rb") as f:
        first_line, rest = f.readline(), f.read()
    try:
        header = json.loads(first_line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{fpath}: the first line is not a saev JSON header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{fpath}: the saev header is not a JSON object")
    state = torch_load_safely(io.BytesIO(rest), fpath)
    if not isinstance(state, dict):
        raise ArtifactError(f"{fpath}: expected a state dict after the saev header")
    t = {k: _tensor(state, k, fpath).float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    notes: list[str] = []
    activation, top_k, subtracts = _saev_activation(header, fpath)
    mode = "topk"
    if activation == "Relu":
        k, mode = relu_activation("saev Relu", int(t["b_enc"].shape[0]), options, notes)
        relu = True
    elif activation in ("TopK", "BatchTopK"):
        k, relu = int(top_k), False  # type: ignore[arg-type]
        if activation == "BatchTopK":
            notes.append("BatchTopK is per-row TopK at inference in saev")
    else:
        raise ArtifactError(f"{fpath}: saev activation {activation!r} is not supported "
                            "(supported: TopK, BatchTopK, Relu)")
    if options.apply_b_dec_to_input is not None:
        subtracts = options.apply_b_dec_to_input
    else:
        notes.append(f"assumed the encoder {'subtracts' if subtracts else 'does not subtract'} "
                     "b_dec (saev changed this between versions; override with "
                     "apply_b_dec_to_input)")
    W_enc, W_dec, b_enc = t["W_enc"].T, t["W_dec"].T, t["b_enc"]
    if not subtracts:
        b_enc = b_enc + W_enc @ t["b_dec"]
    sae = build_sae(fpath, "saev", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=t["b_dec"], k=k,
                    relu=relu, scale=options.scale or 1.0, notes=notes, activation=mode,
                    architecture=f"{activation} (header schema {header.get('schema', 'none')})")
    sae.meta["source_config"] = header
    return sae


def _saev_activation(header: dict[str, Any], fpath: Path) -> tuple[str, int | None, bool]:
    """(activation, top_k, encoder subtracts b_dec) from a saev header, every schema saev's
    own ``load`` reads: none (pre-schema: ReLU), 1A (``cls`` names the activation), 1B
    (``cls`` SparseAutoencoderConfig, activation as a dict or absent: ReLU), 2. Pre-schema
    and 1A ReLU checkpoints come from the code that subtracted b_dec; later code does not."""
    schema = header.get("schema")
    if schema is None:
        return "Relu", None, True
    cfg = header.get("cfg")
    if schema not in (1, 2) or not isinstance(cfg, dict):
        raise ArtifactError(f"{fpath}: unknown saev header schema {schema!r}")
    cls = header.get("cls", "SparseAutoencoderConfig")
    if schema == 1 and cls in ("Relu", "TopK", "BatchTopK"):
        return cls, cfg.get("top_k", 32), cls == "Relu"
    activation = cfg.get("activation")
    if schema == 1 and activation is None:
        return "Relu", None, False  # saev's config default
    if not isinstance(activation, dict) or "cls" not in activation:
        raise ArtifactError(f"{fpath}: saev header without an activation")
    params = activation.get("params") or {}
    return str(activation["cls"]), params.get("top_k", 32), False


# ------------------------------------------------------------------ common


def _tensor(state: dict[str, Any], key: str, fpath: Path) -> torch.Tensor:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ArtifactError(f"{fpath}: missing tensor {key!r} "
                            f"(found: {', '.join(sorted(map(str, state))[:10])})")
    return value.detach().float()


def _unit_columns(W_dec: torch.Tensor) -> bool:
    return bool(((W_dec.norm(dim=0) - 1).abs() <= _UNIT_NORM_TOL).all())


def build_sae(path: Path, fmt: str, *, W_enc: torch.Tensor, b_enc: torch.Tensor,
              W_dec: torch.Tensor, b_dec: torch.Tensor, k: int, relu: bool, scale: float,
              notes: list[str], activation: str = "topk",
              threshold: float | torch.Tensor = 0.0, input_norm: str = "none",
              architecture: str | None = None) -> TopKSAE:
    """A TopKSAE from converted weights (W_enc [m, d], W_dec [d, m]), shapes checked.
    ``activation="threshold"`` (ReLU, JumpReLU, BatchTopK inference) takes ``threshold``
    (a number or one per latent); ``input_norm`` is a per-row input normalisation that
    decoding undoes (``constant_norm_rescale``, ``layer_norm``)."""
    m, d = W_enc.shape
    shapes = {"b_enc": (tuple(b_enc.shape), (m,)), "W_dec": (tuple(W_dec.shape), (d, m)),
              "b_dec": (tuple(b_dec.shape), (d,))}
    for name, (got, want) in shapes.items():
        if got != want:
            raise ArtifactError(f"{path}: {name} has shape {got}, expected {want} "
                                f"for an SAE of width {d} with {m} latents")
    if not 0 < k <= m:
        raise InputError(f"{path}: k={k} is not between 1 and the number of latents ({m})")
    if not _unit_columns(W_dec):
        norms = W_dec.norm(dim=0)
        notes.append(f"decoder columns are not unit-norm ({float(norms.min()):.3g}.."
                     f"{float(norms.max()):.3g}); kept as they are so that codes and "
                     "reconstructions match the source")
    for note in notes:
        log.warning("%s: %s", path, note)
    threshold_t = torch.as_tensor(threshold, dtype=torch.float32).detach()
    meta: dict[str, Any] = {"source_format": fmt, "source_path": str(path), "backbone": None, "hook": None,
            "d": d, "n_latents": m, "k": k, "relu": relu, "scale": float(scale),
            "activation": activation, "input_norm": input_norm,
            "architecture": architecture or ("TopK" if activation == "topk" else "threshold"),
            "normalisation": describe_normalisation(float(scale), input_norm),
            "seed": None, "metrics": {}, "notes": notes}
    sae = TopKSAE(d, m, k, relu=relu, activation=activation, input_norm=input_norm, meta=meta)
    sae.set_weights(W_enc, b_enc, W_dec, b_dec, scale, threshold_t)
    return sae.eval()


def describe_normalisation(scale: float, input_norm: str = "none") -> str:
    """How an SAE normalises its input, in words."""
    parts = []
    if input_norm == "constant_norm_rescale":
        parts.append("each row rescaled to norm sqrt(d), undone after decoding")
    elif input_norm == "layer_norm":
        parts.append("each row centred and divided by its std (layer_norm), undone after decoding")
    if scale != 1.0:
        parts.append(f"inputs x {scale:g}")
    return "; ".join(parts) or "none"
