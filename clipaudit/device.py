"""Which torch device a stage runs on (one rule for every stage)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from clipaudit.errors import InputError

AUTO = "auto"


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """``auto`` (or None): CUDA when present, else the CPU; otherwise a torch device name
    (``cpu``, ``cuda``, ``cuda:1``). Asking for CUDA where there is none is an InputError."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, the caller's setting restored
    after it (None: unchanged)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
