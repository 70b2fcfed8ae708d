"""The audited data's SAE codes, encoded once and kept on disk for the audit's later passes.

The audit encodes each shard with the SAE once. Its first pass needs every class's
relevance; its later passes (bootstrap intervals, the permutation control, metadata
AUCs, ablations) need the codes again, only once the findings are known. Encoding
twice would double the audit's main cost and keeping the codes in memory would make
memory grow with the data, so they go to a scratch folder: k indices (int32) and k
values (float32) per instance, 8 k bytes (512 bytes at k = 64), plus one float per
instance and head. Files are read with plain reads or short-lived maps, so what the
audit holds in memory stays one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

_CHUNK_ROWS = 65536


class CodeSpill:
    """Row-ordered sparse codes (and per-head per-instance scalars) in a scratch folder."""

    def __init__(self, dpath: Path | str, n_rows: int, k: int, scalars: tuple[str, ...] = ()) -> None:
        self.dpath = Path(dpath)
        self.dpath.mkdir(parents=True, exist_ok=True)
        self.n_rows, self.k = n_rows, k
        self._files = {"indices": (np.int32, k), "values": (np.float32, k),
                       **{f"scalar-{name}": (np.float32, 1) for name in scalars}}
        self._writers = {name: open(self._fpath(name), "wb") for name in self._files}
        self._written = 0

    def _fpath(self, name: str) -> Path:
        return self.dpath / f"{name}.bin"

    # ------------------------------------------------------------ writing (first pass)

    def append(self, indices: torch.Tensor, values: torch.Tensor,
               scalars: dict[str, torch.Tensor] | None = None) -> None:
        """The next rows' codes ([b, k]) and scalars ([b] each, every name given)."""
        b = indices.shape[0]
        parts = {"indices": indices.to(torch.int32), "values": values.float(),
                 **{f"scalar-{n}": v.float() for n, v in (scalars or {}).items()}}
        if set(parts) != set(self._files):
            raise ValueError(f"spill expects {sorted(self._files)}, got {sorted(parts)}")
        for name, tensor in parts.items():
            self._writers[name].write(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._written += b

    def finish(self) -> None:
        for f in self._writers.values():
            f.close()
        if self._written != self.n_rows:
            raise RuntimeError(f"spill got {self._written} rows, expected {self.n_rows}")

    # ------------------------------------------------------------ reading (later passes)

    def _map(self, name: str) -> np.memmap:
        dtype, width = self._files[name]
        shape = (self.n_rows, width) if width > 1 else (self.n_rows,)
        return np.memmap(self._fpath(name), dtype=dtype, mode="r", shape=shape)

    def rows(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices long [n, k], values float [n, k]) at row ``positions`` (any order)."""
        return self._take("indices", positions).long(), self._take("values", positions)

    def scalar(self, name: str, positions: np.ndarray | None = None) -> torch.Tensor:
        """Scalar ``name`` [n] at ``positions`` (None: every row)."""
        if positions is None:
            positions = np.arange(self.n_rows)
        return self._take(f"scalar-{name}", positions)

    def _take(self, name: str, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        mapped = self._map(name)
        try:
            picked = np.asarray(mapped[positions[order]])
        finally:
            del mapped
        out = np.empty_like(picked)
        out[order] = picked
        return torch.from_numpy(out)

    def chunks(self, chunk_rows: int = _CHUNK_ROWS) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, indices long [c, k], values float [c, k]) in row order."""
        with open(self._fpath("indices"), "rb") as fi, open(self._fpath("values"), "rb") as fv:
            for start in range(0, self.n_rows, chunk_rows):
                n = min(chunk_rows, self.n_rows - start)
                idx = np.fromfile(fi, dtype=np.int32, count=n * self.k).reshape(n, self.k)
                val = np.fromfile(fv, dtype=np.float32, count=n * self.k).reshape(n, self.k)
                yield start, torch.from_numpy(idx).long(), torch.from_numpy(val)

    def nbytes_on_disk(self) -> int:
        return sum(self._fpath(n).stat().st_size for n in self._files if self._fpath(n).exists())
