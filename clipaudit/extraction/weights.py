"""Where a CLIP's weights and config come from: local caches first, the hub only when
it answers, and a one-line ``ModelUnavailableError`` within seconds otherwise."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipaudit.errors import InputError, ModelUnavailableError

_HUB_HOST = ("huggingface.co", 443)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def hf_cached(repo_id: str, filenames: Sequence[str]) -> str | None:
    """The local path of the first of ``filenames`` in the Hugging Face cache of ``repo_id``."""
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


def find_pretrained_file(model: str, tag: str) -> tuple[str, dict[str, Any]]:
    """(local path of the weights for ``model``/``tag``, the tag's open_clip config),
    downloading only when the hub answers."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise InputError(f"model {model}: unknown pretrained tag {tag!r} (known: {tags}; "
                         "or a weights file, or random)")
    looked = []
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])
        hit = hf_cached(repo_id, _weight_candidates(filename or "open_clip_pytorch_model.bin"))
        if hit:
            return hit, cfg
        looked.append(f"the Hugging Face cache for {repo_id}")
    if cfg.get("url"):
        target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if target.is_file():
            return str(target), cfg
        looked.append(str(target))
    raise_unless_online(f"{model} (pretrained {tag!r})", looked)
    return open_clip.download_pretrained(cfg), cfg


def raise_unless_online(what: str, looked: Sequence[str]) -> None:
    why = "HF_HUB_OFFLINE is set" if offline() else None
    if why is None and not hub_reachable():
        why = "the model hub is unreachable"
    if why:
        raise ModelUnavailableError(
            f"weights for {what} are not available: {why} and they are not in "
            f"{' or '.join(looked) or 'any local cache'}; download them once on a connected "
            "machine, or pass a local file with --checkpoint FILE --model-config CONFIG.json"
        )


def hf_hub_files(name: str) -> tuple[Path, Path]:
    """(open_clip_config.json, weights) of an ``hf-hub:org/repo`` model, from the local
    Hugging Face cache, or downloaded when the hub answers."""
    repo_id = name.removeprefix("hf-hub:")
    config = hf_cached(repo_id, ["open_clip_config.json"])
    names = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
             "open_clip_pytorch_model.bin"]
    weights = hf_cached(repo_id, names)
    if config is None or weights is None:
        raise_unless_online(name, [f"the Hugging Face cache for {repo_id}"])
        from huggingface_hub import hf_hub_download

        config = config or hf_hub_download(repo_id, "open_clip_config.json")
        for fname in names:
            try:
                weights = weights or hf_hub_download(repo_id, fname)
            except Exception:  # the next name; hf_hub raises several error types
                continue
        if weights is None:
            raise ModelUnavailableError(f"{name}: no open_clip weights file in the repository")
    return Path(config), Path(weights)


def read_model_config(fpath: Path) -> tuple[dict[str, Any], dict[str, Any]]:
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
