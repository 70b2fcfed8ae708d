"""The audited data's SAE codes, encoded once and kept on disk for the audit's later passes.

The audit encodes each shard with the SAE once. Its first pass needs every class's
relevance; its later passes (bootstrap intervals, the permutation control, metadata
AUCs, ablations) need the codes again, only once the findings are known. Encoding
twice would double the audit's main cost and keeping the codes in memory would make
memory grow with the data, so they go to a scratch folder: each row's active components
(int32) and values (float32), 8 bytes per entry (512 bytes per row at k = 64), plus one
float per instance and head. Rows may hold different numbers of entries (threshold and
ReLU SAEs activate a varying number of latents), so entries are stored back to back
with an offset per row (8 bytes per instance, in memory). Files are read with plain
reads or short-lived maps, so what the audit holds in memory stays one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

_CHUNK_ROWS = 65536


class CodeSpill:
    """Row-ordered sparse codes (and per-head per-instance scalars) in a scratch folder."""

    def __init__(self, dpath: Path | str, n_rows: int, scalars: tuple[str, ...] = ()) -> None:
        self.dpath = Path(dpath)
        self.dpath.mkdir(parents=True, exist_ok=True)
        self.n_rows = n_rows
        self._files = {"indices": np.int32, "values": np.float32,
                       **{f"scalar-{name}": np.float32 for name in scalars}}
        self._writers = {name: open(self._fpath(name), "wb") for name in self._files}
        self._widths: list[np.ndarray] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self._written = 0

    def _fpath(self, name: str) -> Path:
        return self.dpath / f"{name}.bin"

    # ------------------------------------------------------------ writing (first pass)

    def append(self, indices: torch.Tensor, values: torch.Tensor,
               scalars: dict[str, torch.Tensor] | None = None) -> None:
        """The next rows' codes ([b, w], any width w) and scalars ([b] each, every name given)."""
        b, w = indices.shape
        parts = {"indices": indices.to(torch.int32), "values": values.float(),
                 **{f"scalar-{n}": v.float() for n, v in (scalars or {}).items()}}
        if set(parts) != set(self._files):
            raise ValueError(f"spill expects {sorted(self._files)}, got {sorted(parts)}")
        for name, tensor in parts.items():
            self._writers[name].write(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._widths.append(np.full(b, w, dtype=np.int64))
        self._written += b

    def finish(self) -> None:
        for f in self._writers.values():
            f.close()
        if self._written != self.n_rows:
            raise RuntimeError(f"spill got {self._written} rows, expected {self.n_rows}")
        widths = np.concatenate(self._widths) if self._widths else np.zeros(0, np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        self._widths = []

    # ------------------------------------------------------------ reading (later passes)

    def _entries(self, starts: np.ndarray, stops: np.ndarray, mapped: dict[str, np.ndarray]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows given by entry ranges -> (indices long [n, w], values [n, w]), padded
        with (0, 0.0) to the widest row."""
        widths = stops - starts
        w = int(widths.max()) if len(widths) else 0
        cols = np.arange(w)
        inside = cols[None, :] < widths[:, None]
        flat = np.where(inside, starts[:, None] + cols[None, :], 0)
        idx = np.where(inside, mapped["indices"][flat] if flat.size else flat, 0)
        val = np.where(inside, mapped["values"][flat] if flat.size else flat, 0.0)
        return torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(val.astype(np.float32))

    def _map(self, name: str) -> np.ndarray:
        count = int(self._offsets[-1]) if not name.startswith("scalar-") else self.n_rows
        if count == 0:
            return np.zeros(0, dtype=self._files[name])
        return np.memmap(self._fpath(name), dtype=self._files[name], mode="r", shape=(count,))

    def rows(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices long [n, w], values float [n, w]) at row ``positions`` (any order)."""
        positions = np.asarray(positions, dtype=np.int64)
        mapped = {"indices": self._map("indices"), "values": self._map("values")}
        try:
            return self._entries(self._offsets[positions], self._offsets[positions + 1], mapped)
        finally:
            del mapped

    def scalar(self, name: str, positions: np.ndarray | None = None) -> torch.Tensor:
        """Scalar ``name`` [n] at ``positions`` (None: every row)."""
        if positions is None:
            positions = np.arange(self.n_rows)
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        mapped = self._map(f"scalar-{name}")
        try:
            picked = np.asarray(mapped[positions[order]])
        finally:
            del mapped
        out = np.empty_like(picked)
        out[order] = picked
        return torch.from_numpy(out)

    def chunks(self, chunk_rows: int = _CHUNK_ROWS) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, indices long [c, w], values float [c, w]) in row order."""
        with open(self._fpath("indices"), "rb") as fi, open(self._fpath("values"), "rb") as fv:
            for start in range(0, self.n_rows, chunk_rows):
                stop = min(start + chunk_rows, self.n_rows)
                first, last = int(self._offsets[start]), int(self._offsets[stop])
                mapped = {"indices": np.fromfile(fi, dtype=np.int32, count=last - first),
                          "values": np.fromfile(fv, dtype=np.float32, count=last - first)}
                idx, val = self._entries(self._offsets[start:stop] - first,
                                         self._offsets[start + 1:stop + 1] - first, mapped)
                yield start, idx, val

    def nbytes_on_disk(self) -> int:
        return sum(self._fpath(n).stat().st_size for n in self._files if self._fpath(n).exists())
