"""Image-tower families beyond open_clip's ViT (which lives in ``hooks``).

- ``open_clip-resnet``: ModifiedResNet (RN50 ... RN50x64). Pooled = the attention
  pool's output for the mean token, before its output projection ``c_proj``.
- ``timm-vit``: timm ViTs behind open_clip's ``TimmModel`` (SigLIP/SigLIP2 with a MAP
  head, PE-Core, EVA01/EVA02, MobileCLIP-B, MobileCLIP2-B/L, ViTamin, relpos ViTs).
  Pooled = the class token before the final norm (token pooling, where the norm
  commutes with the pooling) or the pooling's output (average, MAP head) before
  ``fc_norm``; residual hook points at every block.
- ``timm-pooled-head``: timm networks whose classifier head pools (ConvNeXt, FastViT
  for MobileCLIP, Swin, timm CNNs). Pooled = the head's global pool, before its norm.

In every case the rest of the tower is a norm and the projection (timm's classifier,
then open_clip's ``proj``/``mlp``), as ``PooledReadout``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clipaudit.errors import InputError
from clipaudit.extraction.hooks import (
    Capture,
    ResidEdit,
    Tower,
    TowerFamily,
    register_tower_family,
)
from clipaudit.extraction.readout import PooledReadout, make_readout


def _adapter_steps(visual: torch.nn.Module) -> list[torch.nn.Module]:
    """open_clip TimmModel's own head (dropout + linear, or an MLP) as readout steps."""
    head = getattr(visual, "head", None)
    return list(head.children()) if isinstance(head, torch.nn.Sequential) else []


# ------------------------------------------------------------------ ModifiedResNet


class ResNetTower(Tower):
    family = "open_clip-resnet"

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        v = self.module
        x = v.stem(images.to(v.conv1.weight.dtype))
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def pooled(self, images: torch.Tensor) -> Capture:
        feats = self._features(images)
        pool = self.module.attnpool
        x = feats.reshape(feats.shape[0], feats.shape[1], -1).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + pool.positional_embedding[:, None, :].to(x.dtype)
        width = x.shape[-1]
        # the attention of the mean token, with an identity output projection: what
        # c_proj maps to the embedding
        attended, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=torch.eye(width, dtype=x.dtype, device=x.device),
            out_proj_bias=torch.zeros(width, dtype=x.dtype, device=x.device),
            use_separate_proj_weight=True, training=False, need_weights=False)
        return Capture(attended[0], pool(feats))

    def build_readout(self) -> PooledReadout:
        c_proj = self.module.attnpool.c_proj
        return make_readout(c_proj.in_features, None, [c_proj], device=self.device)


def _is_modified_resnet(visual: torch.nn.Module) -> bool:
    return type(visual).__name__ == "ModifiedResNet" and hasattr(visual, "attnpool")


# ------------------------------------------------------------------ timm ViTs


class TimmViTTower(Tower):
    family = "timm-vit"

    def __init__(self, visual: torch.nn.Module):
        super().__init__(visual)
        trunk: Any = self.module.trunk
        self.trunk = trunk
        self.n_blocks = len(trunk.blocks)
        self.width = int(trunk.embed_dim)
        self.n_prefix = int(getattr(trunk, "num_prefix_tokens", 0))
        self.has_cls = getattr(trunk, "cls_token", None) is not None
        self.token_pool = (getattr(trunk, "attn_pool", None) is None
                           and getattr(trunk, "global_pool", "") == "token")

    @property
    def cls_is_pooled(self) -> bool:
        return self.token_pool and self.has_cls

    def forward_edited(self, images: torch.Tensor, layer: int, edit: ResidEdit) -> torch.Tensor:
        handle = self.trunk.blocks[layer].register_forward_hook(lambda _m, _i, out: edit(out))
        try:
            return self.encode(images)
        finally:
            handle.remove()

    def _pool(self, feats: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        if hasattr(trunk, "pool"):
            return trunk.pool(feats)
        if trunk.global_pool == "avg":  # timm's relpos ViT pools inline
            return feats[:, self.n_prefix:].mean(dim=1)
        return feats[:, 0]

    def pooled(self, images: torch.Tensor) -> Capture:
        seen: dict[str, torch.Tensor] = {}
        handle = self.trunk.norm.register_forward_hook(
            lambda _m, inputs, _out: seen.__setitem__("pre_norm", inputs[0]))
        try:
            feats = self.trunk.forward_features(images)
        finally:
            handle.remove()
        embeds = self.trunk.forward_head(feats)
        for step in _adapter_steps(self.module):
            embeds = step(embeds)
        # token pooling commutes with the per-token norm: pool first, norm in the readout
        pooled = seen["pre_norm"][:, 0] if self.token_pool else self._pool(feats)
        return Capture(pooled, embeds)

    def build_readout(self) -> PooledReadout:
        trunk = self.trunk
        steps = [trunk.head_drop, trunk.head, *_adapter_steps(self.module)]
        if self.token_pool:
            if not isinstance(trunk.fc_norm, torch.nn.Identity):
                steps.insert(0, trunk.fc_norm)
            return make_readout(self.width, trunk.norm, steps, device=self.device)
        return make_readout(self.width, trunk.fc_norm, steps, device=self.device)


def _timm_trunk(visual: torch.nn.Module) -> Any:
    trunk = getattr(visual, "trunk", None)
    if trunk is None or type(visual).__name__ != "TimmModel":
        return None
    head = getattr(visual, "head", None)
    if head is not None and any(name == "pool" for name, _ in head.named_children()):
        return None  # open_clip's abs_attn/rot_attn pooling: not supported
    return trunk


def _is_timm_vit(visual: torch.nn.Module) -> bool:
    trunk = _timm_trunk(visual)
    return (trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "fc_norm")
            and hasattr(trunk, "norm") and hasattr(trunk, "embed_dim"))


# ------------------------------------------------------------------ timm pooled heads


_HEAD_TYPES = ("ClassifierHead", "NormMlpClassifierHead")


class TimmPooledHeadTower(Tower):
    family = "timm-pooled-head"

    def __init__(self, visual: torch.nn.Module):
        super().__init__(visual)
        self.trunk: Any = self.module.trunk
        self.head = self.trunk.head

    def pooled(self, images: torch.Tensor) -> Capture:
        feats = self.trunk.forward_features(images)
        pooled = self.head.global_pool(feats).flatten(1)
        embeds = self.trunk.forward_head(feats)
        for step in _adapter_steps(self.module):
            embeds = step(embeds)
        return Capture(pooled, embeds)

    def build_readout(self) -> PooledReadout:
        head = self.head
        d = int(getattr(head, "in_features", 0) or self.trunk.num_features)
        if type(head).__name__ == "NormMlpClassifierHead":
            steps = [head.pre_logits, head.drop, head.fc]
            norm = head.norm
        else:
            steps, norm = [head.drop, head.fc], None
        return make_readout(d, norm, [*steps, *_adapter_steps(self.module)], device=self.device)


def _is_timm_pooled_head(visual: torch.nn.Module) -> bool:
    trunk = _timm_trunk(visual)
    head = getattr(trunk, "head", None)
    return (trunk is not None and type(head).__name__ in _HEAD_TYPES
            and hasattr(head, "global_pool") and hasattr(trunk, "forward_features"))


def _require_timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        raise InputError("this image tower needs timm: pip install 'clipaudit[timm]'") from None


register_tower_family(TowerFamily(
    "open_clip-resnet", "open_clip ModifiedResNet (RN50 ... RN50x64): attention pool",
    _is_modified_resnet, ResNetTower, residual_hooks=False))
register_tower_family(TowerFamily(
    "timm-vit", "timm ViTs: SigLIP/SigLIP2 (MAP head), PE-Core, EVA01/02, MobileCLIP-B, "
    "MobileCLIP2-B/L, ViTamin, relpos ViTs", _is_timm_vit, TimmViTTower, residual_hooks=True))
register_tower_family(TowerFamily(
    "timm-pooled-head", "timm networks with a pooling classifier head: ConvNeXt, FastViT "
    "(MobileCLIP-S*), Swin, timm CNNs", _is_timm_pooled_head, TimmPooledHeadTower,
    residual_hooks=False))
