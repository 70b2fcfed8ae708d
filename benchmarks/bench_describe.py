"""Streaming top-m activations and component descriptions: throughput and memory.

Prints figures, and ratios that should hold: the accumulator's peak memory (top-m
state plus pending firings) stays under a bound that does not depend on N, and is a
small fraction of a dense [N, n_latents] activation matrix.

    python benchmarks/bench_describe.py [--n 200000] [--latents 4096] [--k 32]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from clipaudit.describe.components import (
    TopActivationsAccumulator,
    default_merge_at,
    describe_components,
)
from clipaudit.describe.concepts import list_vocabularies, load_vocabularies


def _codes(n: int, n_latents: int, k: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        b = min(batch, n - start)
        # k distinct latents per row, Zipf-like popularity as real SAEs have
        popularity = 1.0 / torch.arange(1, n_latents + 1).float() ** 0.7
        indices = torch.multinomial(popularity.expand(b, -1), k, generator=g)
        values = torch.empty(b, k).exponential_(generator=g)
        yield torch.arange(start, start + b), SimpleNamespace(indices=indices, values=values)


def bench_top(n: int, n_latents: int, k: int, m: int, batch: int) -> dict[str, float]:
    acc = TopActivationsAccumulator(n_latents, m)
    seconds, peak = 0.0, 0  # the update only, not making the random codes
    for ids, codes in _codes(n, n_latents, k, batch, seed=0):
        t0 = time.perf_counter()
        acc.update(ids, codes)
        seconds += time.perf_counter() - t0
        peak = max(peak, acc.nbytes())
    t0 = time.perf_counter()
    acc.result()  # merges what is still pending
    seconds += time.perf_counter() - t0
    return {"seconds": seconds, "per_s": n / seconds, "state_bytes": peak, "acc": acc}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--m", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)

    small = bench_top(args.n // 10, args.latents, args.k, args.m, args.batch)
    large = bench_top(args.n, args.latents, args.k, args.m, args.batch)
    dense_bytes = args.n * args.latents * 4
    print(f"top_activations: N={args.n} latents={args.latents} k={args.k} m={args.m} "
          f"batch={args.batch}, 1 thread")
    print(f"  {large['seconds']:.2f} s, {large['per_s']:,.0f} instances/s")
    # top-m state + at most merge_at pending firings + one batch's (component, value, id)
    merge_at = default_merge_at(args.latents, args.m)
    bound = args.latents * (args.m * 12 + 8) + (merge_at + args.batch * args.k) * 20
    print(f"  peak state {large['state_bytes'] / 2**20:.2f} MiB after N={args.n}, "
          f"{small['state_bytes'] / 2**20:.2f} MiB after N={args.n // 10}; bound whatever N is "
          f"{bound / 2**20:.2f} MiB (peak / bound {large['state_bytes'] / bound:.2f}, want <= 1)")
    print(f"  peak state / dense [N, latents] float32 = {large['state_bytes'] / dense_bytes:.4f}")

    top = large["acc"].result()
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(args.n, args.dim, generator=g)
    vocab = load_vocabularies(list_vocabularies())

    def encoder(texts: list[str]) -> torch.Tensor:  # stands in for a text tower
        return torch.randn(len(texts), args.dim, generator=g)

    classes = {f"class {c}": [f"a photo of class {c}", f"class {c}"] for c in range(10)}
    t0 = time.perf_counter()
    desc = describe_components(top, ref, encoder, vocab, classes)
    seconds = time.perf_counter() - t0
    print(f"describe_components: {args.latents} components, D={args.dim}, "
          f"{len(vocab.concepts)} concepts, 10 classes: {seconds:.2f} s "
          f"(text encoding excluded: random stand-in); "
          f"dead {int((desc.semantic.norm(dim=1) == 0).sum())}")


if __name__ == "__main__":
    main()
