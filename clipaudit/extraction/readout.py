"""The rest of an image tower from its pooled vector: a norm, then a projection.

For every open_clip image tower the image embedding is, from the pooled vector h
(after pooling, before the final norm and projection),

    e = post(norm(h))

with ``norm`` a LayerNorm, an RMSNorm or nothing, and ``post`` the projection:
affine (a matrix, a Linear, timm's classifier and open_clip's ``proj``, composed)
for all but two open_clip configs, an MLP for ``convnext_large_d*``.
``PooledReadout`` holds that structure, so attribution can use the closed form
when ``post`` is affine (``affine``: W, b with e = norm(h) @ W + b) and batched
autograd on the cached vector otherwise.

``frozen_norms`` is the "frozen LayerNorm" linearisation used by the ``frozen``
gradient mode: within it every norm of a module treats its scale as a constant in
backward passes; values do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from clipaudit.errors import InputError


@dataclass(frozen=True)
class NormSpec:
    """A per-vector norm over the last dimension: ``layer`` (centred) or ``rms``."""

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def sigma(self, h: torch.Tensor) -> torch.Tensor:
        """The per-vector scale [n] the norm divides by."""
        x = h - h.mean(-1, keepdim=True) if self.kind == "layer" else h
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def __call__(self, h: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        h = h.float()
        x = h - h.mean(-1, keepdim=True) if self.kind == "layer" else h
        sigma = self.sigma(h)
        out = x / (sigma.detach() if frozen else sigma)[..., None]
        if self.weight is not None:
            out = out * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out

    def linear_part(self, directions: torch.Tensor) -> torch.Tensor:
        """What the norm does to a direction, its scale aside: centring (LayerNorm), then
        the gain. [m, d] -> [m, d]."""
        x = directions - directions.mean(-1, keepdim=True) if self.kind == "layer" else directions
        return x * self.weight.float() if self.weight is not None else x

    def adjoint(self, grads: torch.Tensor) -> torch.Tensor:
        """The transpose of ``linear_part``: the gain, then centring. Maps a gradient with
        respect to the norm's output to one with respect to its input (scale frozen)."""
        x = grads * self.weight.float() if self.weight is not None else grads
        return x - x.mean(-1, keepdim=True) if self.kind == "layer" else x


def norm_spec(module: torch.nn.Module | None) -> NormSpec | None:
    """The NormSpec of a norm module over the feature dimension (None for Identity/None).

    LayerNorm and its subclasses (open_clip's LayerNorm/LayerNormFp32, timm's LayerNorm
    and LayerNorm2d) and RMSNorm (torch, timm) are understood; anything else is an
    InputError, since the rest of the tower could not be written down exactly."""
    if module is None or isinstance(module, torch.nn.Identity):
        return None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    eps = getattr(module, "eps", None)
    if isinstance(module, torch.nn.LayerNorm):
        kind = "layer"
    elif "rmsnorm" in type(module).__name__.lower():
        kind = "rms"
    else:
        raise InputError(f"unsupported norm {type(module).__name__} after pooling "
                         "(supported: LayerNorm, RMSNorm)")
    if eps is None:
        eps = 1e-6
    return NormSpec(kind, None if weight is None else weight.detach(),
                    None if bias is None else bias.detach(), float(eps))


def apply_flat(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run one module of a classifier head on flat vectors [n, c]: 1x1 convolutions
    become matrix products; flatten, dropout and identity are no-ops."""
    if isinstance(module, (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten)):
        return x
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
        w = module.weight.reshape(module.out_channels, -1)
        return torch.nn.functional.linear(x, w, module.bias)
    return module(x)


_AFFINE_STEPS = (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten, torch.nn.Linear)


class MatMul(torch.nn.Module):
    """x -> x @ weight: open_clip's ``proj`` parameter as a step of a readout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


def is_affine_step(step: torch.nn.Module) -> bool:
    if isinstance(step, torch.nn.Conv2d):
        return step.kernel_size == (1, 1)
    return isinstance(step, (*_AFFINE_STEPS, MatMul))


@dataclass(frozen=True)
class PooledReadout:
    """e = post(norm(h)): the rest of the tower from the pooled vector h [n, d]."""

    d: int
    """Width of the pooled vector."""
    norm: NormSpec | None
    steps: tuple[torch.nn.Module, ...]
    """The projection after the norm, step by step, run on flat vectors [n, .]."""
    affine: tuple[torch.Tensor, torch.Tensor] | None
    """(W [d, D], b [D]) with post(x) = x @ W + b, when every step is affine."""

    def post(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = apply_flat(step, x)
        return x

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """The image embedding, exactly as the tower computes it."""
        x = self.norm(h) if self.norm is not None else h.float()
        return self.post(x)

    def frozen(self, h: torch.Tensor) -> torch.Tensor:
        """The same values, with every norm's scale constant in backward passes."""
        x = self.norm(h, frozen=True) if self.norm is not None else h.float()
        with contextlib.ExitStack() as stack:
            for step in self.steps:
                stack.enter_context(frozen_norms(step))
            return self.post(x)

    @property
    def is_affine(self) -> bool:
        return self.affine is not None

    @property
    def description(self) -> str:
        """The rest of the tower in words (``layernorm -> affine projection``)."""
        norm = f"{self.norm.kind}norm" if self.norm is not None else "no norm"
        return f"{norm} -> {'affine' if self.is_affine else 'nonlinear'} projection"


def make_readout(d: int, norm: torch.nn.Module | NormSpec | None,
                 steps: Sequence[torch.nn.Module], *,
                 device: torch.device | str = "cpu") -> PooledReadout:
    """A PooledReadout from a norm and the projection's steps. When every step is
    affine, they are composed into one matrix and offset (probed on unit vectors)."""
    spec = norm if isinstance(norm, NormSpec) or norm is None else norm_spec(norm)
    readout = PooledReadout(d, spec, tuple(steps), None)
    if not all(is_affine_step(s) for s in steps):
        return readout
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(device)
        out = readout.post(probe).float()
    return dataclasses.replace(readout, affine=(out[1:] - out[:1], out[0]))


# ------------------------------------------------------------------ frozen norms


def _frozen_layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    channels_first = type(self).__name__ == "LayerNorm2d"
    x32 = (x.permute(0, 2, 3, 1) if channels_first else x).float()
    mu = x32.mean(-1, keepdim=True)
    sigma = ((x32 - mu).pow(2).mean(-1, keepdim=True) + self.eps).sqrt().detach()
    out = (x32 - mu) / sigma
    if self.weight is not None:
        out = out * self.weight.float()
    if self.bias is not None:
        out = out + self.bias.float()
    out = out.permute(0, 3, 1, 2) if channels_first else out
    return out.to(x.dtype)


def _frozen_rms_norm(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    eps = getattr(self, "eps", None) or 1e-6
    sigma = (x32.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    out = x32 / sigma
    weight = getattr(self, "weight", None)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


@contextlib.contextmanager
def frozen_norms(module: torch.nn.Module) -> Iterator[None]:
    """Within the block, every LayerNorm (incl. channels-first LayerNorm2d) and RMSNorm
    in ``module`` treats its scale as a constant in backward passes."""
    patched = []
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(_frozen_layer_norm, m)  # type: ignore[method-assign]
        elif "rmsnorm" in type(m).__name__.lower() and type(m).__name__ != "RmsNorm2d":
            m.forward = types.MethodType(_frozen_rms_norm, m)
        else:
            continue
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
