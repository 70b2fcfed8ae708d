"""Hook points and image towers: where the SAE reads a CLIP image tower, and the rest
of the tower from there to the image embedding.

Hook points (``HookPoint``):

- ``pooled`` (the default): the vector the tower projects to its embedding, after
  pooling (class token, average, attention pool, MAP head) and before the final norm
  and projection. Every open_clip image tower has one, and the rest of the tower from
  it is a norm and a projection (``PooledReadout``), so everything after extraction
  runs on the cache. For open_clip's class-token ViTs it is the last block's class
  token, the hook point of earlier clipaudit versions.
- ``cls`` / ``spatial`` at block ``layer``: the residual stream of a transformer
  tower (open_clip's ViT, timm ViTs, EVA) at the class token or the patch tokens.

A ``Tower`` wraps one family of image towers (``list_tower_families()``); ``make_tower``
picks the family of a model. Tests check, for one tiny model of every family, that
the rest of the tower applied to a capture reproduces ``encode_image``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch

from clipaudit.errors import InputError
from clipaudit.extraction.readout import MatMul, PooledReadout, make_readout

TokenMode = Literal["pooled", "cls", "spatial"]
TOKEN_MODES: tuple[str, ...] = ("pooled", "cls", "spatial")


@dataclass(frozen=True)
class HookPoint:
    """Where the SAE reads the image tower."""

    layer: int = -1
    """Block after which the residual stream is read (``cls``/``spatial``); negative
    counts from the end. Not used for ``pooled``."""
    token: TokenMode = "pooled"
    """``pooled``: the pooled vector before the final norm and projection (every tower);
    ``cls``: the residual stream's class token; ``spatial``: every patch token."""

    def resolve(self, n_blocks: int) -> int | None:
        """The non-negative block index (None for ``pooled``), or an InputError."""
        if self.token not in TOKEN_MODES:
            raise InputError(f"token {self.token!r} is not one of {', '.join(TOKEN_MODES)}")
        if self.token == "pooled":
            return None
        if n_blocks <= 0:
            raise InputError(f"token {self.token!r} reads the residual stream of a transformer "
                             "tower; this tower has none (use --token pooled)")
        layer = self.layer + n_blocks if self.layer < 0 else self.layer
        if not 0 <= layer < n_blocks:
            raise InputError(f"layer {self.layer} is out of range for a tower of {n_blocks} blocks "
                             f"(valid: {-n_blocks}..{n_blocks - 1})")
        return layer

    def as_dict(self, n_blocks: int) -> dict[str, Any]:
        return {"layer": self.resolve(n_blocks), "token": self.token}

    @classmethod
    def from_dict(cls, recorded: Mapping[str, Any]) -> HookPoint:
        """The hook point an artifact records (``{"layer": ..., "token": ...}``)."""
        layer = recorded.get("layer")
        return cls(-1 if layer is None else int(layer), recorded.get("token", "cls"))


def describe_hook(hook: Mapping[str, Any]) -> str:
    """``pooled`` or ``layer 11, token cls``: a recorded hook point in words."""
    if hook.get("token") == "pooled":
        return "pooled"
    return f"layer {hook.get('layer')}, token {hook.get('token')}"


@dataclass(frozen=True)
class Capture:
    """One forward pass: the activations at the hook point and the image embedding."""

    acts: torch.Tensor
    """[n, d] for ``pooled`` and ``cls``, [n, t, d] for ``spatial``."""
    embeds: torch.Tensor
    """[n, D] image embeddings, unnormalised, exactly ``encode_image``."""
    resid: torch.Tensor | None = None
    """[n, prefix + t, d] full residual stream at the hook point (only when asked for)."""


ResidEdit = Callable[[torch.Tensor], torch.Tensor]
"""A function of the full residual stream after a block that returns its replacement."""


class Tower:
    """An image tower split at its hook points. Subclasses (one per family) define the
    pooled capture and readout, and, for transformer towers, ``forward_edited``."""

    family = ""
    n_blocks = 0
    """Residual blocks that hook points can read (0: pooled only)."""
    width = 0
    """Width of the residual stream."""
    n_prefix = 0
    """Tokens before the patch tokens (class token, registers)."""
    has_cls = False

    def __init__(self, module: torch.nn.Module):
        # Any: each family reads its own submodules (trunk, attnpool, ...) by name
        self.module: Any = module

    # ------------------------------------------------------------- to implement

    def pooled(self, images: torch.Tensor) -> Capture:
        """One forward pass: the pooled vectors and the image embeddings."""
        raise NotImplementedError

    def build_readout(self) -> PooledReadout:
        raise NotImplementedError

    def forward_edited(self, images: torch.Tensor, layer: int, edit: ResidEdit) -> torch.Tensor:
        """The image embedding with the residual stream after block ``layer`` replaced
        by ``edit(residual)`` (differentiable through the edit)."""
        raise InputError(f"{self.family} towers have no residual hook points (use --token pooled)")

    # ------------------------------------------------------------- shared

    @cached_property
    def pooled_readout(self) -> PooledReadout:
        """The rest of the tower from the pooled vector: e = post(norm(h))."""
        return self.build_readout()

    @property
    def pooled_dim(self) -> int:
        return self.pooled_readout.d

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def hook_tokens(self) -> tuple[str, ...]:
        """The hook-point tokens this tower supports."""
        if not self.n_blocks:
            return ("pooled",)
        return ("pooled", "cls", "spatial") if self.has_cls else ("pooled", "spatial")

    @property
    def cls_is_pooled(self) -> bool:
        """True when the last block's class token is the pooled vector (a class-token
        ViT), so a cache at (last block, cls) audits like a pooled one."""
        return False

    def resolve(self, hook: HookPoint) -> int | None:
        """The block index of ``hook`` on this tower (None for pooled), or an InputError."""
        layer = hook.resolve(self.n_blocks)
        if hook.token == "cls" and not self.has_cls:
            raise InputError(f"this {self.family} tower has no class token; use --token "
                             "spatial or pooled")
        return layer

    def hook_dict(self, hook: HookPoint) -> dict[str, Any]:
        return {"layer": self.resolve(hook), "token": hook.token}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's own forward pass: the unnormalised image embedding."""
        out = self.module(images)
        return out[0] if isinstance(out, (tuple, list)) else out

    def capture(self, images: torch.Tensor, hook: HookPoint, keep_resid: bool = False) -> Capture:
        """One forward pass returning the hook point's activations and the embedding."""
        layer = self.resolve(hook)
        if layer is None:
            return self.pooled(images)
        seen: dict[str, torch.Tensor] = {}

        def record(resid: torch.Tensor) -> torch.Tensor:
            seen["resid"] = resid
            return resid

        embeds = self.forward_edited(images, layer, record)
        resid = seen["resid"]
        return Capture(self.select(resid, hook.token), embeds, resid if keep_resid else None)

    def select(self, resid: torch.Tensor, token: str) -> torch.Tensor:
        """The hook point's tokens of a full residual [n, prefix + t, d]."""
        return resid[:, 0] if token == "cls" else resid[:, self.n_prefix:]

    def replace(self, resid: torch.Tensor, token: str, acts: torch.Tensor) -> torch.Tensor:
        """The full residual with the hook point's tokens replaced by ``acts``."""
        if token == "cls":
            return torch.cat([acts.unsqueeze(1), resid[:, 1:]], dim=1)
        return torch.cat([resid[:, :self.n_prefix], acts], dim=1)

    def n_spatial(self, image_size: tuple[int, int]) -> int:
        """Patch tokens per image (from one forward pass on a blank image)."""
        with torch.no_grad():
            blank = torch.zeros(1, 3, *image_size, device=self.device)
            return int(self.capture(blank, HookPoint(-1, "spatial")).acts.shape[1])

    def acts_tail(self, hook: HookPoint, image_size: tuple[int, int]) -> tuple[int, ...]:
        """The shape of one instance's activations at ``hook``."""
        if hook.token == "pooled":
            return (self.pooled_dim,)
        if hook.token == "cls":
            return (self.width,)
        return (self.n_spatial(image_size), self.width)


# ------------------------------------------------------------------ open_clip ViT


class VisionTower(Tower):
    """open_clip's ViT image tower (``VisionTransformer``, incl. CoCa's attention pool
    and CLIPA's average pool), split at a hook point."""

    family = "open_clip-vit"
    n_prefix = 1
    has_cls = True

    def __init__(self, model: Any):
        visual = getattr(model, "visual", model)
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise InputError("not an open_clip ViT image tower "
                             f"(got {type(visual).__name__})")
        super().__init__(visual)
        self.visual = visual
        self.n_blocks = len(visual.transformer.resblocks)
        self.width = int(visual.transformer.width)

    @property
    def cls_readout_ok(self) -> bool:
        """True when e depends on the last block's output through the CLS token alone
        (``tok`` pooling, no attention pool): then ``readout_cls`` is exact."""
        v = self.visual
        return v.attn_pool is None and v.pool_type == "tok"

    @property
    def cls_is_pooled(self) -> bool:
        return self.cls_readout_ok

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
        return self.pooled_readout(h_nd)

    def rest(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """The rest of the tower: the full residual after block ``layer`` -> image embedding."""
        resolved = HookPoint(layer, "cls").resolve(self.n_blocks)
        assert resolved is not None
        return self.readout(self.run_blocks(resid, resolved + 1, self.n_blocks))

    def forward_edited(self, images: torch.Tensor, layer: int, edit: ResidEdit) -> torch.Tensor:
        resid = edit(self.run_blocks(self.embed(images), 0, layer + 1))
        return self.readout(self.run_blocks(resid, layer + 1, self.n_blocks))

    def _pool_mode(self) -> tuple[bool, bool]:
        """(pooled vector comes before ln_post, the tower pools an attention pool's output)."""
        v = self.visual
        if getattr(v, "attn_pool_contrastive", None) is not None or v.pool_type == "none":
            raise InputError("this open_clip ViT's pooling (attentional_pool parallel/cascade or "
                             "pool_type none) is marked untested in open_clip; clipaudit does not "
                             "audit it")
        before_ln = v.pool_type == "tok" or (v.final_ln_after_pool and v.attn_pool is None)
        return before_ln, v.attn_pool is not None

    def pool_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector (the ``pooled`` hook point) from the last block's output."""
        before_ln, attn = self._pool_mode()
        v = self.visual
        y = v.attn_pool(x) if attn else x
        pooled, _ = v._global_pool(y if before_ln else v.ln_post(y))
        return pooled

    def pooled(self, images: torch.Tensor) -> Capture:
        x = self.run_blocks(self.embed(images), 0, self.n_blocks)
        return Capture(self.pool_residual(x), self.readout(x))

    def build_readout(self) -> PooledReadout:
        before_ln, attn = self._pool_mode()
        v = self.visual
        d = int(v.ln_post.normalized_shape[0])
        steps = [MatMul(v.proj)] if v.proj is not None else []
        return make_readout(d, v.ln_post if before_ln else None, steps, device=self.device)


# ------------------------------------------------------------------ families


@dataclass(frozen=True)
class TowerFamily:
    """One family of image towers clipaudit can split at hook points."""

    name: str
    description: str
    matches: Callable[[torch.nn.Module], bool]
    """True for an image tower (``model.visual``) of this family."""
    build: Callable[[torch.nn.Module], Tower]
    residual_hooks: bool
    """Whether the family has residual-stream hook points (cls/spatial at any block)."""


_FAMILIES: dict[str, TowerFamily] = {}


def register_tower_family(family: TowerFamily) -> TowerFamily:
    _FAMILIES[family.name] = family
    return family


def list_tower_families() -> list[str]:
    _ensure_builtins()
    return list(_FAMILIES)


def describe_tower_families() -> dict[str, str]:
    _ensure_builtins()
    return {name: f.description for name, f in _FAMILIES.items()}


def tower_family(model: Any) -> TowerFamily:
    """The family of ``model``'s image tower, or an InputError listing the families."""
    _ensure_builtins()
    visual = getattr(model, "visual", model)
    for family in _FAMILIES.values():
        if family.matches(visual):
            return family
    trunk = getattr(visual, "trunk", None)
    what = type(visual).__name__ + (f" ({type(trunk).__name__})" if trunk is not None else "")
    raise InputError(f"unsupported image tower {what}. Supported families: "
                     f"{', '.join(_FAMILIES)}")


def make_tower(model: Any) -> Tower:
    """The ``Tower`` of ``model`` (a CLIP model or its image tower)."""
    return tower_family(model).build(getattr(model, "visual", model))


def cache_readout(model: Any, hook: Mapping[str, Any], where: object = "the cache") -> PooledReadout:
    """The rest of the tower for a cache recorded at ``hook``: what the audit runs on.

    A cache at the pooled hook point of any tower, or at the last block's class token of
    a class-token ViT (the pooled vector too: caches of earlier clipaudit versions),
    is auditable from the cache alone; any other hook point is an InputError."""
    tower = model if isinstance(model, Tower) else make_tower(model)
    token, layer = hook.get("token"), hook.get("layer")
    if token == "pooled" or (token == "cls" and tower.cls_is_pooled and layer == tower.n_blocks - 1):
        return tower.pooled_readout
    raise InputError(f"{where}: the audit runs from a cache at the pooled hook point (--token "
                     f"pooled, the default); this cache is at {describe_hook(hook)}. Re-extract "
                     "it, or attribute images at this hook point with `clipaudit explain`")


def _is_open_clip_vit(visual: torch.nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual, "_embeds")


register_tower_family(TowerFamily(
    "open_clip-vit", "open_clip VisionTransformer: CLIP ViTs, CoCa (attention pool), CLIPA "
    "(average pool)", _is_open_clip_vit, VisionTower, residual_hooks=True))


def _ensure_builtins() -> None:
    from clipaudit.extraction import towers  # noqa: F401  (registers the other families)


def select_tokens(resid: torch.Tensor, token: str) -> torch.Tensor:
    """The hook point's tokens of an open_clip ViT residual [n, 1+t, d] (one class token;
    other towers: ``Tower.select``)."""
    return resid[:, 0] if token == "cls" else resid[:, 1:]


def replace_tokens(resid: torch.Tensor, token: str, acts: torch.Tensor) -> torch.Tensor:
    """An open_clip ViT residual with the hook point's tokens replaced by ``acts``
    (differentiable; other towers: ``Tower.replace``)."""
    if token == "cls":
        return torch.cat([acts.unsqueeze(1), resid[:, 1:]], dim=1)
    return torch.cat([resid[:, :1], acts], dim=1)
