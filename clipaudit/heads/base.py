"""What every classifier head is, and the registry of head types.

Every head is, at a given input, the affine map

    y_c = ((e - offset) . W_c) / s(e) + b_c

with ``s(e)`` a per-instance scale (1, or |e| for L2-normalising heads). The
attribution code holds ``s(e)`` fixed in the backward pass (as it holds
LayerNorm scales fixed), which makes attributions complete: the component, error
and bias terms sum to ``y_c - b_c``. ``LinearForm`` is that map.

A head type is registered once, with the function that loads a head of that type
from a file (``register_head_type``); the audit, ``explain`` and the CLI load heads
only through ``load_head``. ``list_heads()`` names the registered types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from clipaudit.errors import InputError

if TYPE_CHECKING:
    from clipaudit.extraction.backbone import Backbone


@dataclass(frozen=True)
class LinearForm:
    """y = ((e - offset) @ weight.T) / scale + bias, for a batch of embeddings."""

    weight: torch.Tensor
    """[C, D] effective class directions."""
    offset: torch.Tensor
    """[D] subtracted from e before the dot product."""
    scale: torch.Tensor
    """[n] per-instance divisor (held fixed in backward passes)."""
    bias: torch.Tensor
    """[C] head bias b_c."""

    def scores(self, e_nD: torch.Tensor) -> torch.Tensor:
        return ((e_nD - self.offset) @ self.weight.T) / self.scale[:, None] + self.bias


@runtime_checkable
class Head(Protocol):
    """A classifier on CLIP image embeddings that clipaudit can audit."""

    name: str
    """Name of the head in an audit (``probe``, ``zero-shot``); unique per audit."""
    kind: str
    """Registered head type (``linear-probe``, ``zero-shot``)."""
    class_names: list[str]

    def linear_form(self, e_nD: torch.Tensor) -> LinearForm:
        """The head at ``e_nD`` as an affine map with a per-instance scale."""
        ...

    def scores(self, e_nD: torch.Tensor) -> torch.Tensor:
        """Exact class scores [n, C] (normalisation differentiated through)."""
        ...

    def class_texts(self) -> dict[str, list[str]]:
        """Per class, the texts that say what it means (its name, its prompts): what
        components' alignment with the class is measured against."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What the audit records about this head (name, kind, file hash, ...)."""
        ...


HeadLoader = Callable[[Path, "Backbone"], Head]
"""(file, the audited backbone) -> a head; raises ClipAuditError for bad files."""


@dataclass(frozen=True)
class HeadType:
    kind: str
    """Name of the type (``linear-probe``)."""
    description: str
    load: HeadLoader


_HEAD_TYPES: dict[str, HeadType] = {}


def register_head_type(head_type: HeadType) -> HeadType:
    """Make a head type loadable by ``load_head`` (and visible in ``list_heads``)."""
    _HEAD_TYPES[head_type.kind] = head_type
    return head_type


def list_heads() -> list[str]:
    """Names of the registered head types."""
    _ensure_builtins()
    return sorted(_HEAD_TYPES)


def describe_heads() -> dict[str, str]:
    _ensure_builtins()
    return {kind: t.description for kind, t in sorted(_HEAD_TYPES.items())}


def get_head_type(kind: str) -> HeadType:
    _ensure_builtins()
    if kind not in _HEAD_TYPES:
        raise InputError(f"unknown head type {kind!r}. Available: {', '.join(sorted(_HEAD_TYPES))}")
    return _HEAD_TYPES[kind]


def load_head(kind: str, fpath: Path | str, backbone: Backbone) -> Head:
    """Load a head of a registered type from a file, for the audited ``backbone``."""
    return get_head_type(kind).load(Path(fpath), backbone)


def _ensure_builtins() -> None:
    # Importing the modules registers the built-in types.
    from clipaudit.heads import probe, zero_shot  # noqa: F401
