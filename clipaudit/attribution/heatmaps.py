"""Where in the image an SAE component's activation comes from, at patch resolution.

``component_heatmaps`` maps each (image, component) pair to a [rows, cols] grid over the
model's input view, from the same model, hook point and SAE as the audit. Methods
(``list_heatmap_methods``):

- ``relevance`` (default): gradient x input of the component's activation z_j with
  respect to the tokens entering the first block, with every LayerNorm scale, every
  attention weight and every MLP nonlinearity's gate (``act(x) / x``) held at its clean
  value. Under that linearisation the tower is affine in its input tokens, so the
  per-token terms and one constant (biases, the class token) add up to z_j exactly: the
  map is a decomposition of the activation, not a sensitivity. The tokens include their
  position embeddings, so a patch's term holds a part that does not depend on the image
  (the benchmark measured gradient x input at the pixels instead: the same pointing on
  the dermatology world's findings, one image won and one lost). It is the attributions'
  frozen-normalisation linearisation carried down to the input tokens (the conservative
  attention rule of Ali et al. 2022 and AttnLRP, which the paper's authors use for
  their concept-conditional heatmaps). At the default hook point a class's evidence
  from component j, A[n, j, c], is z_j times a per-instance constant, so the map of
  z_j is also the map of that evidence.
- ``gradient``: the same gradient x input with only the LayerNorm scales frozen (the
  attributions' linearisation unchanged). Not complete: softmax and GELU make the
  gradient a local slope.
- ``activation``: the component's SAE code on each patch token at the hook block (what
  PatchSAE and saev show). Off-distribution for an SAE trained on the class token.
- ``occlusion``: how much z_j falls when one patch is replaced by the image's mean
  colour; one forward pass per patch (causal but costly on large towers).

``benchmarks/localization.py`` compares them against the synthetic worlds' artifact
masks (README, "Measured"). Towers plug in through ``register_token_source``: a
function that returns a tower's input tokens and patch grid, or None when the tower
has no spatial tokens (then ``NoSpatialTokensError`` says so).
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipaudit.attribution.patching import frozen_layernorms
from clipaudit.errors import InputError
from clipaudit.extraction.hooks import HookPoint, VisionTower, select_tokens
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)

DEFAULT_METHOD = "relevance"


class NoSpatialTokensError(InputError):
    """The tower has no patch tokens to place a heatmap on."""


# ------------------------------------------------------------------ towers


@dataclass(frozen=True)
class SpatialTokens:
    """A tower's input tokens for a batch of images, and how to reach the hook point."""

    tokens: torch.Tensor
    """[n, prefix + rows * cols, d] tokens entering the first block (row-major patches)."""
    prefix: int
    """Tokens before the patches (class token, registers)."""
    grid: tuple[int, int]
    """Patch rows and columns."""
    patch_px: tuple[int, int]
    """Patch height and width in pixels of the model's input."""
    to_hook: Callable[[torch.Tensor], torch.Tensor]
    """Tokens -> the hook point's activation ([n, d] or [n, t, d]), differentiable."""
    to_patches: Callable[[torch.Tensor], torch.Tensor]
    """Tokens -> the patch tokens at the hook block [n, rows * cols, d]."""
    module: torch.nn.Module
    """The module whose normalisations, attention and nonlinearities ``relevance`` linearises."""


TokenSource = Callable[[Any, torch.Tensor, HookPoint], "SpatialTokens | None"]
_TOKEN_SOURCES: list[TokenSource] = []


def register_token_source(source: TokenSource) -> TokenSource:
    """Teach heatmaps a new kind of tower: ``source(model, images, hook)`` returns its
    ``SpatialTokens``, or None when ``model`` is not a tower it knows. Tried newest first."""
    _TOKEN_SOURCES.insert(0, source)
    return source


def _vit_tokens(model: Any, images: torch.Tensor, hook: HookPoint) -> SpatialTokens | None:
    """open_clip's ViT: the tokens after patch, class and position embeddings and ln_pre."""
    try:
        tower = VisionTower(model)
    except InputError:
        return None
    visual = tower.visual
    pooled = hook.token == "pooled"
    layer = tower.n_blocks - 1 if pooled else hook.resolve(tower.n_blocks)
    assert layer is not None
    tokens = tower.embed(images)
    grid = tuple(int(g) for g in getattr(visual, "grid_size", ()))
    if len(grid) != 2 or grid[0] * grid[1] >= tokens.shape[1]:
        return None
    prefix = tokens.shape[1] - grid[0] * grid[1]
    patch = getattr(visual, "patch_size", None)
    patch_px = tuple(int(p) for p in patch) if isinstance(patch, (tuple, list)) else (
        images.shape[-2] // grid[0], images.shape[-1] // grid[1])

    def to_hook(x: torch.Tensor) -> torch.Tensor:
        resid = tower.run_blocks(x, 0, layer + 1)
        return tower.pool_residual(resid) if pooled else select_tokens(resid, hook.token)

    def to_patches(x: torch.Tensor) -> torch.Tensor:
        return tower.run_blocks(x, 0, layer + 1)[:, prefix:]

    return SpatialTokens(tokens, prefix, (grid[0], grid[1]), (patch_px[0], patch_px[1]),
                         to_hook, to_patches, visual)


register_token_source(_vit_tokens)


def spatial_tokens(model: Any, images: torch.Tensor, hook: HookPoint) -> SpatialTokens:
    """The first registered source that knows ``model``; ``NoSpatialTokensError`` if none."""
    for source in _TOKEN_SOURCES:
        found = source(model, images, hook)
        if found is not None:
            return found
    visual = getattr(model, "visual", model)
    raise NoSpatialTokensError(
        f"heatmaps need a tower with patch tokens; {type(visual).__name__} has none that "
        "clipaudit knows (register a token source with "
        "clipaudit.attribution.heatmaps.register_token_source)")


# ------------------------------------------------------------------ result


@dataclass(frozen=True)
class Heatmaps:
    """One map per (image, component) pair."""

    maps: torch.Tensor
    """[n, rows, cols]: the component's activation by patch (row-major, as the image)."""
    activations: torch.Tensor
    """[n] z_j on the clean pass (summed over tokens for spatial hook points)."""
    components: torch.Tensor
    """[n] the component of each map."""
    method: str
    grid: tuple[int, int]
    patch_px: tuple[int, int]
    rest: torch.Tensor
    """[n] what the patches do not explain (``relevance``: biases and the class token, so
    ``maps.sum() + rest == activations``; other methods: activations - maps.sum())."""

    def peaks(self) -> torch.Tensor:
        """[n, 2] (row, col) of each map's maximum."""
        flat = self.maps.flatten(1).argmax(1)
        cols = self.grid[1]
        return torch.stack([flat // cols, flat % cols], dim=1)


# ------------------------------------------------------------------ the methods


def _component_values(sae: SAE, h: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """z of each row's component ([n]; summed over tokens when h is [n, t, d]), differentiable."""
    d = h.shape[-1]
    per_row = components.repeat_interleave(h[0].numel() // d)
    codes = sae.encode(h.reshape(-1, d).float())
    z = (codes.values.float() * (codes.indices == per_row[:, None])).sum(-1)
    return z.reshape(h.shape[0], -1).sum(1)


def _gradient_x_input(tokens: SpatialTokens, sae: SAE, components: torch.Tensor,
                      linearise: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = tokens.tokens.detach().float().requires_grad_(True)
    context = linearised(tokens.module) if linearise else contextlib.nullcontext()
    with torch.enable_grad(), frozen_layernorms(tokens.module), context:
        z = _component_values(sae, tokens.to_hook(x.to(tokens.tokens.dtype)), components)
        (grad,) = torch.autograd.grad(z.sum(), x)
    relevance = (grad * x).sum(-1).detach()  # [n, T]
    patches = relevance[:, tokens.prefix:]
    z = z.detach()
    return patches, z, z - patches.sum(1)


@dataclass(frozen=True)
class _Batch:
    """What a method sees of one batch."""

    images: torch.Tensor
    tokens: SpatialTokens
    components: torch.Tensor
    model: Any
    hook: HookPoint


_Maps = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(maps [n, t], z [n], rest [n])."""


def _relevance(batch: _Batch, sae: SAE) -> _Maps:
    return _gradient_x_input(batch.tokens, sae, batch.components, linearise=True)


def _gradient(batch: _Batch, sae: SAE) -> _Maps:
    return _gradient_x_input(batch.tokens, sae, batch.components, linearise=False)


@torch.no_grad()
def _activation(batch: _Batch, sae: SAE) -> _Maps:
    tokens, components = batch.tokens, batch.components
    patches = tokens.to_patches(tokens.tokens)  # [n, t, d]
    n, t, d = patches.shape
    codes = sae.encode(patches.reshape(-1, d).float())
    per_row = components.repeat_interleave(t)
    maps = (codes.values.float() * (codes.indices == per_row[:, None])).sum(-1).reshape(n, t)
    z = _component_values(sae, tokens.to_hook(tokens.tokens), components)
    return maps, z, z - maps.sum(1)


@torch.no_grad()
def _occlusion(batch: _Batch, sae: SAE) -> _Maps:
    tokens, components = batch.tokens, batch.components
    z = _component_values(sae, tokens.to_hook(tokens.tokens), components)
    rows, cols = tokens.grid
    ph, pw = tokens.patch_px
    maps = torch.zeros(len(batch.images), rows * cols)
    for i, image in enumerate(batch.images):
        mean = image.mean(dim=(1, 2), keepdim=True)
        variants = image.unsqueeze(0).repeat(rows * cols, 1, 1, 1)
        for p in range(rows * cols):
            r, c = divmod(p, cols)
            variants[p, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = mean
        occluded = spatial_tokens(batch.model, variants, batch.hook)
        z_occluded = _component_values(sae, occluded.to_hook(occluded.tokens),
                                       components[i].repeat(rows * cols))
        maps[i] = z[i] - z_occluded
    return maps, z, z - maps.sum(1)


_Method = Callable[[_Batch, SAE], _Maps]
_METHODS: dict[str, tuple[_Method, str]] = {
    "relevance": (_relevance, "gradient x input; LayerNorm scales, attention weights and "
                              "nonlinearity gates frozen (complete)"),
    "gradient": (_gradient, "gradient x input; LayerNorm scales frozen"),
    "activation": (_activation, "the component's SAE code on each patch token at the hook block"),
    "occlusion": (_occlusion, "fall of the activation when a patch is replaced by the mean colour"),
}


def list_heatmap_methods() -> dict[str, str]:
    """Method name -> what it computes."""
    return {name: about for name, (_, about) in _METHODS.items()}


def check_method(method: str) -> None:
    if method not in _METHODS:
        raise InputError(f"unknown heatmap method {method!r}. Available: {', '.join(_METHODS)}")


def component_heatmaps(images: torch.Tensor, components: Sequence[int] | torch.Tensor, sae: SAE,
                       model: Any, hook: HookPoint, *, method: str = DEFAULT_METHOD,
                       batch_size: int = 32) -> Heatmaps:
    """Heatmaps of ``components[i]`` on preprocessed ``images[i]`` ([n, 3, H, W]).

    ``model``: the CLIP (or its visual tower) the SAE reads, at ``hook``. A
    ``relevance`` request on a tower whose attention clipaudit cannot linearise falls
    back to ``gradient`` (logged, and named in the result's ``method``).
    """
    check_method(method)
    components = torch.as_tensor(components, dtype=torch.long).reshape(-1)
    if len(components) != len(images):
        raise ValueError(f"{len(images)} images but {len(components)} components")
    if method == "relevance":
        probe = spatial_tokens(model, images[:1], hook)
        why = why_not_linearisable(probe.module)
        if why:
            log.warning("heatmaps: %s; using method 'gradient' instead of 'relevance'", why)
            method = "gradient"
    fn = _METHODS[method][0]
    parts = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        tokens = spatial_tokens(model, batch, hook)
        parts.append(fn(_Batch(batch, tokens, components[start:start + batch_size], model, hook),
                        sae))
    if not parts:
        probe = spatial_tokens(model, images, hook)
        grid, patch_px = probe.grid, probe.patch_px
        empty = torch.zeros(0)
        return Heatmaps(torch.zeros(0, *grid), empty, components, method, grid, patch_px, empty)
    grid, patch_px = tokens.grid, tokens.patch_px
    maps = torch.cat([p[0].float().cpu() for p in parts]).reshape(-1, *grid)
    return Heatmaps(maps, torch.cat([p[1].float().cpu() for p in parts]), components, method,
                    grid, patch_px, torch.cat([p[2].float().cpu() for p in parts]))


# ------------------------------------------------------------------ linearisation


_GATED_ACTIVATIONS = ("GELU", "QuickGELU", "ReLU", "SiLU", "Sigmoid", "Tanh", "GELUTanh")


def why_not_linearisable(module: torch.nn.Module) -> str | None:
    """Why ``linearised`` cannot handle ``module`` (None when it can)."""
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if blocks is None:
        return f"{type(module).__name__} has no open_clip transformer blocks"
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention):
            return f"block {i}'s attention is {type(attn).__name__}, not MultiheadAttention"
        if attn.bias_k is not None or attn.add_zero_attn:
            return f"block {i}'s attention has key/value biases or zero attention"
    return None


@contextlib.contextmanager
def linearised(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, backward passes through ``module`` treat every attention weight
    (softmax output) and every elementwise nonlinearity's gate act(x)/x as constants;
    forward values are unchanged. Combine with ``frozen_layernorms``."""
    why = why_not_linearisable(module)
    if why:
        raise ValueError(why)
    patched: list[torch.nn.Module] = []
    for m in module.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            m.forward = types.MethodType(_detached_attention_forward, m)  # type: ignore[method-assign]
            patched.append(m)
        elif type(m).__name__ in _GATED_ACTIVATIONS:
            m.forward = types.MethodType(_gated_forward, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _gated_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = type(self).forward(self, x)
    safe = torch.where(x.abs() > 1e-6, x, torch.ones_like(x))
    gate = torch.where(x.abs() > 1e-6, y / safe, torch.zeros_like(x)).detach()
    linear = x * gate
    return linear + (y - linear).detach()  # the value is act(x); the slope is the gate


def _detached_attention_forward(self: torch.nn.MultiheadAttention, query: torch.Tensor,
                                key: torch.Tensor, value: torch.Tensor,
                                key_padding_mask: torch.Tensor | None = None,
                                need_weights: bool = True, attn_mask: torch.Tensor | None = None,
                                average_attn_weights: bool = True, is_causal: bool = False
                                ) -> tuple[torch.Tensor, None]:
    """``nn.MultiheadAttention`` with the softmax weights detached (values exact)."""
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, length, d = query.shape
    heads, head_dim = self.num_heads, d // self.num_heads
    if self._qkv_same_embed_dim:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
    b_q, b_k, b_v = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                     else (None, None, None))

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, -1, heads, head_dim).transpose(1, 2)

    q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), \
        split(F.linear(value, w_v, b_v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if attn_mask is not None:
        scores = scores + (attn_mask if attn_mask.dtype != torch.bool
                           else torch.zeros_like(attn_mask, dtype=scores.dtype)
                           .masked_fill(attn_mask, float("-inf")))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :].bool(), float("-inf"))
    weights = scores.softmax(-1).detach()
    out = (weights @ v).transpose(1, 2).reshape(n, length, d)
    out = self.out_proj(out)
    return (out if self.batch_first else out.transpose(0, 1)), None
