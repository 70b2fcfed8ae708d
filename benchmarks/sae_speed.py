"""Training-step throughput of clipaudit's TopK SAE on CPU (or CUDA), against a dense
PyTorch autograd implementation of the same step and against the encoder's forward
matmul alone, all measured in this run.

    python benchmarks/sae_speed.py                 # d=768, 32768 latents, k=64, batch 1024
    python benchmarks/sae_speed.py --threads 2 --steps 5

Targets (issue 4): clipaudit's step >= 3x the dense step's throughput, and a full
step costing <= 2x the encoder forward matmul. Each variant reports its best and
median step time (shared machines are noisy; "best" is what the code can do). Peak
memory is reported per variant (each runs in its own process), plus training peak
memory for two data-set sizes to show that it does not grow with the number of rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def _setup(args, device):
    from clipaudit.sae import SAETrainConfig, TopKSAE
    from clipaudit.sae.train import initialise_sae

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.d, generator=gen) + 0.5
    config = SAETrainConfig(n_latents=args.n_latents, k=args.k, batch_size=args.batch, seed=0)
    sae = TopKSAE(args.d, args.n_latents, args.k)
    variance = initialise_sae(sae, x, config)
    return sae.to(device), config, x.to(device), variance


def run_variant(args) -> dict:
    device = torch.device(args.device)
    sae, config, x, variance = _setup(args, device)
    if args.variant == "matmul":
        xc = x * sae.scale - sae.b_dec.detach()
        W, b = sae.W_enc.detach(), sae.b_enc.detach()
        seconds = _timed(lambda: torch.addmm(b, xc, W.T), args.steps, args.warmup, device)
    elif args.variant == "clipaudit":
        from clipaudit.sae import SAETrainer

        trainer = SAETrainer(sae, config, total_steps=10**6, dead_after_samples=10**9,
                             data_variance=variance)
        seconds = _timed(lambda: trainer.step(x), args.steps, args.warmup, device)
    else:
        step = _dense_step(sae, x, variance)
        seconds = _timed(step, args.steps, args.warmup, device)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else _peak_rss_mib())
    return {"variant": args.variant, "best": min(seconds), "median": statistics.median(seconds),
            "peak_mib": peak}


def _dense_step(sae, x, variance):
    """The same training step written the straightforward way: dense codes, dense
    decoder matmul, autograd everywhere."""
    W_enc = sae.W_enc.detach().clone().requires_grad_()
    b_enc = sae.b_enc.detach().clone().requires_grad_()
    W_dec = sae.W_dec.detach().contiguous().requires_grad_()
    b_dec = sae.b_dec.detach().clone().requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=6.25e-10, fused=True)
    xs = x * sae.scale

    def step():
        pre = (xs - b_dec) @ W_enc.T + b_enc
        vals, idx = pre.topk(sae.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
        x_hat = z @ W_dec.T + b_dec
        loss = (x_hat - xs).pow(2).sum(1).mean() / variance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(0, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=0, keepdim=True))

    return step


def run_memory(args) -> dict:
    """Train a small SAE on a streamed synthetic source of ``args.rows`` rows."""
    from clipaudit.sae import SAETrainConfig, train_sae

    class Streamed:
        """Rows generated on the fly: nothing is held in memory but the current batch."""

        d, n_rows, provenance = 256, args.rows, {}

        def iter_batches(self, batch_size, *, shuffle=False, seed=0, fields=("acts",)):
            gen = torch.Generator().manual_seed(seed)
            for start in range(0, self.n_rows, batch_size):
                yield {"acts": torch.randn(min(batch_size, self.n_rows - start), self.d,
                                           generator=gen)}

    before = _peak_rss_mib()
    train_sae(Streamed(), SAETrainConfig(n_latents=2048, k=32, epochs=1, batch_size=1024,
                                         device=args.device))
    return {"rows": args.rows, "peak_mib": _peak_rss_mib(), "before_mib": before}


def _child(args, **overrides) -> dict:
    cmd = [sys.executable, __file__, "--child"]
    for key, value in {**vars(args), **overrides}.items():
        if key not in ("child",):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=32768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the CI machines are shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        result = run_memory(args) if args.variant == "memory" else run_variant(args)
        print(json.dumps(result))
        return

    print(f"TopK SAE training step: d={args.d}, n_latents={args.n_latents}, k={args.k}, "
          f"batch={args.batch}, device={args.device}, threads={args.threads}, "
          f"torch {torch.__version__}")
    results = {v: _child(args, variant=v) for v in ("matmul", "clipaudit", "dense")}
    print(f"  {'':<24} {'best':>9} {'median':>9} {'samples/s':>10} {'peak':>9}")
    for name, label in (("clipaudit", "clipaudit sparse step"), ("dense", "dense autograd step"),
                        ("matmul", "encoder forward matmul")):
        r = results[name]
        print(f"  {label:<24} {r['best'] * 1e3:6.0f} ms {r['median'] * 1e3:6.0f} ms "
              f"{args.batch / r['best']:10.0f} {r['peak_mib']:5.0f} MiB")
    for stat in ("best", "median"):
        ours, dense, mm = (results[v][stat] for v in ("clipaudit", "dense", "matmul"))
        print(f"  {stat:>6}: speed-up over dense autograd {dense / ours:.2f}x (target >= 3x); "
              f"step / encoder matmul {ours / mm:.2f}x (target <= 2x)")
    print("training peak memory vs data-set size (streamed source, d=256, 2048 latents, 1 epoch):")
    for rows in (20_000, 200_000):
        r = _child(args, variant="memory", rows=rows)
        print(f"  {rows:>8} rows: peak {r['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
