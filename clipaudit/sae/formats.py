"""Reading SAE files: clipaudit's own and other people's, through one registry.

``load_sae`` is what the rest of clipaudit calls: it recognises the format, converts
foreign checkpoints (``clipaudit.sae.foreign``) and refuses an SAE made for another
backbone, hook point or width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipaudit.artifacts import require_finite
from clipaudit.errors import ArtifactError, InputError
from clipaudit.sae import published
from clipaudit.sae.files import check_sae_matches, is_sae_file, read_sae_file
from clipaudit.sae.foreign import (
    ImportOptions,
    _prefix_of,
    read_attributing_clip,
    read_saelens,
    read_saev,
    saelens_paths,
    torch_load_safely,
)
from clipaudit.sae.model import TopKSAE


@dataclass(frozen=True)
class SAEFormat:
    name: str
    description: str
    sniff: Callable[[Path], bool]
    """True when the path looks like this format (cheap: names and magic bytes)."""
    read: Callable[[Path, ImportOptions], TopKSAE]


_FORMATS: dict[str, SAEFormat] = {}


def register_sae_format(fmt: SAEFormat) -> None:
    _FORMATS[fmt.name] = fmt


def list_sae_formats() -> list[str]:
    return list(_FORMATS)


def describe_sae_formats() -> dict[str, str]:
    return {name: fmt.description for name, fmt in _FORMATS.items()}


def detect_sae_format(path: Path | str) -> str:
    """The name of the registered format ``path`` is in, or an ArtifactError."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    for fmt in _FORMATS.values():
        if fmt.sniff(path):
            return fmt.name
    if published.is_torch_file(path):  # say why, when a pickled config is the reason
        torch_load_safely(path, path)
    raise ArtifactError(f"{path}: not an SAE file clipaudit recognises "
                        f"(formats: {', '.join(_FORMATS)}); name one with --format")


def import_sae(path: Path | str, fmt: str | None = None, *, k: int | None = None,
               apply_b_dec_to_input: bool | None = None,
               scale: float | None = None) -> TopKSAE:
    """Read an SAE file of any registered format (detected when ``fmt`` is None) into
    a TopKSAE; ``meta["source_format"]`` says which it was. The keyword options fill in
    what foreign files do not store (see ``ImportOptions``)."""
    path = Path(path)
    name = fmt or detect_sae_format(path)
    if name not in _FORMATS:
        raise InputError(f"unknown SAE format {name!r}. Available: {', '.join(_FORMATS)}")
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    options = ImportOptions(k=k, apply_b_dec_to_input=apply_b_dec_to_input, scale=scale)
    sae = _FORMATS[name].read(path, options)
    require_finite(sae.state_dict(), path, "SAE")  # NaN weights would poison every share
    return sae


def load_sae(fpath: Path | str, *, expect_backbone_id: str | None = None,
             expect_hook: Mapping[str, Any] | None = None, expect_d: int | None = None,
             fmt: str | None = None, k: int | None = None,
             apply_b_dec_to_input: bool | None = None, scale: float | None = None) -> TopKSAE:
    """Load an SAE for use: any registered format, refusing (MismatchError naming both
    values) one trained for another backbone, hook point or width. Foreign checkpoints
    carry no provenance, so for them only the width is checked."""
    sae = import_sae(fpath, fmt, k=k, apply_b_dec_to_input=apply_b_dec_to_input, scale=scale)
    check_sae_matches(sae, fpath, expect_backbone_id=expect_backbone_id,
                      expect_hook=expect_hook, expect_d=expect_d)
    return sae


# ------------------------------------------------------------------ sniffing


def _head(path: Path, n: int = 16) -> bytes:
    if not path.is_file():
        return b""
    with open(path, "rb") as f:
        return f.read(n)


def _is_safetensors(path: Path) -> bool:
    head = _head(path)
    return len(head) > 8 and head[8:9] == b"{"


def _sniff_clipaudit(path: Path) -> bool:
    return _is_safetensors(path) and is_sae_file(path)


def _sniff_saelens(path: Path) -> bool:
    cfg_fpath, weights_fpath = saelens_paths(path)
    if path.is_dir() or path.name == "cfg.json" or _is_safetensors(path):
        return cfg_fpath.is_file() and weights_fpath.is_file()
    return False


def _sniff_saev(path: Path) -> bool:
    # a JSON header line followed by a torch file (a zip or a legacy pickle)
    if _head(path, 1) != b"{":
        return False
    with open(path, "rb") as f:
        f.readline()
        rest = f.read(4)
    return rest[:2] == b"PK" or rest[:1] == b"\x80"


def _sniff_attributing_clip(path: Path) -> bool:
    obj = published.peek_torch(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        return False
    prefix = _prefix_of(state, "encoder.0")
    return any(key.startswith(f"{prefix}encoder.0.") for key in state)


register_sae_format(SAEFormat(
    "clipaudit", "clipaudit's own SAE file (safetensors + JSON metadata)",
    _sniff_clipaudit, lambda path, _options: read_sae_file(path)))
register_sae_format(SAEFormat(
    "saelens", "SAELens folder: cfg.json + sae_weights.safetensors",
    _sniff_saelens, read_saelens))
register_sae_format(SAEFormat(
    "saev", "saev sae.pt: a JSON header line, then a torch state dict",
    _sniff_saev, read_saev))
register_sae_format(SAEFormat(
    "prisma", "ViT-Prisma SAE: config.json + weights (.pt state dict or .safetensors)",
    published.sniff_prisma, published.read_prisma))
register_sae_format(SAEFormat(
    "patchsae", "PatchSAE, converted to safetensors by the README's recipe",
    published.sniff_patchsae, published.read_patchsae))
register_sae_format(SAEFormat(
    "dictionary-learning",
    "dictionary_learning ae.pt (+ config.json): BatchTopK, Matryoshka BatchTopK (sae-for-vlm), "
    "TopK, JumpReLU, ReLU",
    published.sniff_dictionary_learning, published.read_dictionary_learning))
register_sae_format(SAEFormat(
    "clip-scope", "CLIP-Scope checkpoint (pre_b, enc, dec, k)",
    published.sniff_clip_scope, published.read_clip_scope))
register_sae_format(SAEFormat(
    "attributing-clip",
    "the paper's reference code (maxdreyer/attributing-clip TopKSAE Lightning checkpoint)",
    _sniff_attributing_clip, read_attributing_clip))
