"""Benchmark: ``clipaudit extract`` against a bare ``model.encode_image`` forward pass.

For each data size N it writes N JPEGs to a temporary folder, then times, in one
process and the same batch size:

- bare: ``model.encode_image`` under ``torch.no_grad()`` on the same images,
  decoded and preprocessed beforehand (so decoding is not counted);
- extract: the full ``clipaudit.extract`` on the same model (decoding in a
  worker process, hook capture, shard writes, index);

alternating them ``--repeats`` times, so that each pair sees the same machine load
(on a shared machine, throughput swings with other work). It prints the median
throughputs, the median of the per-pair ratios (target >= 0.9 on CPU for
ViT-B-32), and how far the peak RSS (VmHWM, reset just before each extract) rose
during extraction: it must not grow with N, since activations stream to disk shard
by shard.

    python benchmarks/extract.py                       # ViT-B-32, random weights, CPU
    python benchmarks/extract.py --sizes 256 512 --batch-size 32 --workers 1
    python benchmarks/extract.py --engine ray          # + the ray engine in a local Ray

With ``--engine ray`` each repeat times bare, the local engine and the ray engine in
turn, on a local Ray started once before the timings (its start-up is printed apart:
it is paid once per run, not per image); the ray engine's own per-run costs (building
the dataset, starting the actors, loading the model in each) are inside its time. It
prints ray / local (target >= 0.9 on 2 cores), the peak RSS growth of this process (the
writer) and the peak RSS of Ray's processes (raylet, GCS, decoding tasks, actors), which
must not grow with N either.

On a small CPU box the decoding worker competes with the model's threads: with 2
cores, one worker is enough (decoding a JPEG costs a few ms, a ViT-B-32 forward
tens of ms per image) and more only steals time from the forward pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipaudit.extraction.backbone import BackboneSpec, load_backbone  # noqa: E402
from clipaudit.extraction.cache import ExtractConfig, extract  # noqa: E402
from clipaudit.extraction.data import decode_image, load_image_source  # noqa: E402
from clipaudit.extraction.engines import RayConfig  # noqa: E402


def write_images(dpath: Path, n: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields with noise), 320 x 240, two classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320] / 320.0
    for i in range(n):
        label = dpath / ("a" if i % 2 else "b")
        label.mkdir(parents=True, exist_ok=True)
        base = np.stack([np.sin(xx * rng.uniform(1, 9) + rng.uniform(0, 6)) for _ in range(3)], -1)
        arr = (base + 1) * 110 + rng.normal(0, 12, base.shape) + yy[..., None] * 20
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(label / f"{i:05d}.jpg", quality=90)


def time_bare(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for s in range(0, len(pixels), batch_size):
            model.encode_image(pixels[s:s + batch_size])
        return time.perf_counter() - start


def _status_mib(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _tree_rss_mib(root: int) -> float:
    """Resident memory of every process below ``root`` (Ray's raylet, GCS and workers)."""
    parent: dict[int, int] = {}
    rss: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in stat.read_text().splitlines()
                          if ":" in line)
            pid = int(stat.parent.name)
            parent[pid] = int(fields["PPid"])
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        except (OSError, ValueError, KeyError):
            continue
    tree, todo = {root}, [root]
    while todo:
        cur = todo.pop()
        for pid, ppid in parent.items():
            if ppid == cur and pid not in tree:
                tree.add(pid)
                todo.append(pid)
    return sum(rss.get(pid, 0.0) for pid in tree - {root})


class _TreePeak:
    """Samples the process tree's RSS every 0.1 s while a run lasts."""

    def __enter__(self) -> _TreePeak:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mib(os.getpid()))
            self._stop.wait(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_extract(source, out: Path, args: argparse.Namespace, engine: str = "local",
                 backbone=None) -> tuple[float, float, float]:
    """(seconds, peak RSS growth of this process over its RSS just before the run in MiB,
    peak RSS of the processes below it in MiB: Ray's, or the decoding workers')."""
    config = ExtractConfig(backbone=BackboneSpec(model=args.model, pretrained="random"),
                           batch_size=args.batch_size, num_workers=args.workers,
                           shard_size=args.shard_size, device="cpu",
                           engine=engine, ray=RayConfig(actors=args.ray_actors))
    before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    with _TreePeak() as tree:
        start = time.perf_counter()
        extract(source, out, config, backbone=backbone)
        seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    growth = peak - before if reset and peak is not None and before is not None else float("nan")
    return seconds, growth, tree.peak


def bench_size(args: argparse.Namespace, n: int, tmp: Path) -> dict:
    data = tmp / f"images-{n}"
    write_images(data, n)
    backbone = load_backbone(BackboneSpec(model=args.model, pretrained="random"), device="cpu", text=False)
    source = load_image_source(data)
    pixels = torch.stack([backbone.preprocess(decode_image(p)) for p in source.items["path"]])
    time_bare(backbone.model, pixels[:args.batch_size], args.batch_size)  # warm-up
    bare, ext, growth, on_ray, ray_mb = [], [], [], [], []
    for r in range(args.repeats):  # interleaved, so that all see the same machine load
        bare.append(time_bare(backbone.model, pixels, args.batch_size))
        seconds, grew, _ = time_extract(source, tmp / f"cache-{n}-{r}", args, backbone=backbone)
        ext.append(seconds)
        growth.append(grew)
        if args.engine == "ray":
            seconds, grew, tree = time_extract(source, tmp / f"ray-{n}-{r}", args, engine="ray",
                                               backbone=backbone)
            on_ray.append(seconds)
            ray_mb.append((grew, tree))
    ratios = sorted(b / e for b, e in zip(bare, ext))
    out = {"n": n, "bare_img_s": n / statistics.median(bare),
           "extract_img_s": n / statistics.median(ext), "ratio": statistics.median(ratios),
           "ratio_range": (ratios[0], ratios[-1]), "growth_mb": max(growth),
           "rss_mb": _status_mib("VmRSS") or float("nan")}
    if on_ray:
        ray_ratios = sorted(e / r for e, r in zip(ext, on_ray))
        out.update(ray_img_s=n / statistics.median(on_ray),
                   ray_ratio=statistics.median(ray_ratios),
                   ray_ratio_range=(ray_ratios[0], ray_ratios[-1]),
                   ray_bare_ratio=statistics.median(sorted(b / r for b, r in zip(bare, on_ray))),
                   ray_growth_mb=max(g for g, _ in ray_mb),
                   ray_tree_mb=max(t for _, t in ray_mb))
    return out


def start_local_ray(args: argparse.Namespace) -> float:
    """Start the local Ray the engine would start (same sizing); returns the seconds taken."""
    from clipaudit.extraction.ray_engine import _connect

    start = time.perf_counter()
    _connect(RayConfig(actors=args.ray_actors), args.workers, "cpu")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="pairs of (bare, extract) runs; the median ratio is printed")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: also time the ray engine (local Ray) in each repeat")
    parser.add_argument("--ray-actors", type=int, default=1,
                        help="model actors of the ray engine (CPU: cores shared among them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"model {args.model} (random weights), CPU, {args.threads} torch threads, "
          f"batch {args.batch_size}, {args.workers} decoding worker(s), shard {args.shard_size}")
    if args.engine == "ray":
        seconds = start_local_ray(args)
        print(f"local Ray started in {seconds:.1f} s (once per run; not in the timings); "
              f"{args.ray_actors} model actor(s)")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            r = bench_size(args, n, Path(tmp))
            print(f"N={r['n']:5d}  bare encode_image {r['bare_img_s']:7.2f} img/s  "
                  f"extract {r['extract_img_s']:7.2f} img/s  ratio {r['ratio']:.3f} "
                  f"(pairs {r['ratio_range'][0]:.3f}..{r['ratio_range'][1]:.3f})  "
                  f"peak RSS growth during extract {r['growth_mb']:+.0f} MiB "
                  f"(process RSS {r['rss_mb']:.0f} MiB, incl. the bare run's decoded "
                  "images)", flush=True)
            if "ray_img_s" in r:
                print(f"        ray engine {r['ray_img_s']:7.2f} img/s  ray / local "
                      f"{r['ray_ratio']:.3f} (repeats {r['ray_ratio_range'][0]:.3f}.."
                      f"{r['ray_ratio_range'][1]:.3f})  ray / bare {r['ray_bare_ratio']:.3f}  "
                      f"peak RSS growth of this process {r['ray_growth_mb']:+.0f} MiB, "
                      f"peak RSS of Ray's processes {r['ray_tree_mb']:.0f} MiB",
                      flush=True)


if __name__ == "__main__":
    main()
