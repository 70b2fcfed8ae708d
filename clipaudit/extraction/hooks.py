"""The hook point: the residual stream of the visual transformer after block L, at
the CLS token or at the spatial tokens, and the rest of the tower that maps it to
the image embedding.

``VisionTower`` runs open_clip's ``VisionTransformer.forward`` in three explicit
parts (embed, blocks, readout) so that one pass yields both the activation at
the hook point and the image embedding, and so that the rest of the tower can be
run from a (possibly edited) residual stream. A test checks it reproduces
``encode_image`` for several layers, both token modes and two architectures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from clipaudit.errors import InputError

TokenMode = Literal["cls", "spatial"]
TOKEN_MODES: tuple[str, ...] = ("cls", "spatial")


@dataclass(frozen=True)
class HookPoint:
    """Where the SAE reads the residual stream."""

    layer: int = -1
    """Block index after which the residual is read; negative counts from the end."""
    token: TokenMode = "cls"
    """``cls``: the class token, h in R^d; ``spatial``: every patch token, h in R^{t x d}."""

    def resolve(self, n_blocks: int) -> int:
        """The non-negative block index, or an InputError when out of range."""
        layer = self.layer + n_blocks if self.layer < 0 else self.layer
        if not 0 <= layer < n_blocks:
            raise InputError(f"layer {self.layer} is out of range for a tower of {n_blocks} blocks "
                             f"(valid: {-n_blocks}..{n_blocks - 1})")
        if self.token not in TOKEN_MODES:
            raise InputError(f"token {self.token!r} is not one of {', '.join(TOKEN_MODES)}")
        return layer

    def as_dict(self, n_blocks: int) -> dict[str, Any]:
        return {"layer": self.resolve(n_blocks), "token": self.token}


@dataclass(frozen=True)
class Capture:
    """One forward pass: the residual at the hook point and the image embedding."""

    acts: torch.Tensor
    """[n, d] for ``cls``, [n, t, d] for ``spatial``."""
    embeds: torch.Tensor
    """[n, D] image embeddings, unnormalised, exactly ``encode_image``."""
    resid: torch.Tensor | None = None
    """[n, 1 + t, d] full residual stream at the hook point (only when asked for)."""


class VisionTower:
    """open_clip's ViT image tower, split at a hook point."""

    def __init__(self, model: Any):
        visual = getattr(model, "visual", model)
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise InputError("clipaudit audits open_clip ViT image towers only "
                             f"(got {type(visual).__name__})")
        self.visual = visual

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.visual.transformer.width)

    @property
    def cls_readout_ok(self) -> bool:
        """True when e depends on the last block's output through the CLS token alone
        (``tok`` pooling, no attention pool): then ``readout_cls`` is exact."""
        v = self.visual
        return v.attn_pool is None and v.pool_type == "tok"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings and ln_pre: the input of block 0, [n, 1+t, d]."""
        return self.visual._embeds(images)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start`` to ``stop - 1`` on a batch-first residual [n, 1+t, d]."""
        transformer = self.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            x = block(x)
        return x if batch_first else x.transpose(0, 1)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling, ln_post and proj on the last block's output: the image embedding [n, D]."""
        pooled, _ = self.visual._pool(x)
        proj = self.visual.proj
        return pooled @ proj if proj is not None else pooled

    def readout_cls(self, h_nd: torch.Tensor) -> torch.Tensor:
        """``readout`` from the CLS token alone: ln_post(h) @ proj. Needs ``cls_readout_ok``."""
        if not self.cls_readout_ok:
            raise InputError("this tower pools over spatial tokens; the CLS token alone does not "
                             "determine the image embedding (use images, not the cache)")
        pooled = self.visual.ln_post(h_nd)
        proj = self.visual.proj
        return pooled @ proj if proj is not None else pooled

    def rest(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """The rest of the tower: the full residual after block ``layer`` -> image embedding."""
        layer = HookPoint(layer).resolve(self.n_blocks)
        return self.readout(self.run_blocks(resid, layer + 1, self.n_blocks))

    def capture(self, images: torch.Tensor, hook: HookPoint, keep_resid: bool = False) -> Capture:
        """One forward pass returning the hook-point activations and the image embedding."""
        layer = hook.resolve(self.n_blocks)
        resid = self.run_blocks(self.embed(images), 0, layer + 1)
        embeds = self.readout(self.run_blocks(resid, layer + 1, self.n_blocks))
        return Capture(acts=select_tokens(resid, hook.token), embeds=embeds,
                       resid=resid if keep_resid else None)


def select_tokens(resid: torch.Tensor, token: str) -> torch.Tensor:
    """The hook point's tokens of a full residual [n, 1+t, d]."""
    return resid[:, 0] if token == "cls" else resid[:, 1:]


def replace_tokens(resid: torch.Tensor, token: str, acts: torch.Tensor) -> torch.Tensor:
    """The full residual with the hook point's tokens replaced by ``acts`` (differentiable)."""
    if token == "cls":
        return torch.cat([acts.unsqueeze(1), resid[:, 1:]], dim=1)
    return torch.cat([resid[:, :1], acts], dim=1)
