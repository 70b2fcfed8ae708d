"""The audit at the paper's scale: time and memory against the number of instances.

Random-weight ViT-B-32 geometry (d = 768, embeddings 512), an SAE of 32,768 latents
with k = 64 (random TopK weights: the cost does not depend on training), a linear
probe of C = 1,000 classes, and synthetic activations written straight into the
activation cache's format (float16 shards of 8,192 rows, an index with paths, hashes,
labels and two metadata columns; embeddings are the tower's readout of the
activations). Labels are random, so the real audit and its permutation control are
both audits of labels that mean nothing: no verdict should fail.

For each N: the SAE encoding alone of the cache (the same rows, batches and threads),
then ``clipaudit audit`` in a child process (its wall time and peak RSS, ``wait4``),
the audit folder's size, the PDF's page count and the permutation control's counts.
Text embeddings (1,000 class names and the vocabulary) are encoded once per model by
a first, untimed audit on the smallest cache; the timed audits find them in the text
cache, as every audit after the first one with a model does (the first encoding's
time is printed).

Targets (issue 16): peak memory flat in N (within 10% from 100k to 1M) and under
4 GB; audit time at most 2x the SAE encoding; folder under 100 MB at 1M without the
per-instance table; no failing verdict under the permutation control.

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--out .bench/scale]
        [--classes 1000] [--latents 32768] [--k 64] [--threads 2]

Needs about 2.6 GB of disk per million instances (float16 acts and embeddings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SHARD = 8192
SEED = 0
BACKBONE = "ViT-B-32"


def write_cache(dpath: Path, n: int, n_classes: int, backbone, tower) -> None:
    """A complete activation cache of ``n`` synthetic rows in the extractor's format."""
    from clipaudit.artifacts import save_tensors, write_json, write_parquet
    from clipaudit.extraction.cache_reader import shard_fpath

    if (dpath / "manifest.json").is_file():
        return
    shutil.rmtree(dpath, ignore_errors=True)
    (dpath / "shards").mkdir(parents=True)
    g = torch.Generator().manual_seed(SEED)
    d = tower.width
    # a few hundred directions shared by the data: activations with structure, not noise
    basis = torch.randn(512, d, generator=g)
    hook = {"layer": tower.n_blocks - 1, "token": "cls"}
    provenance = {"backbone": backbone.provenance, "hook": hook, "data_sha256": f"synthetic-{n}",
                  "preprocess": backbone.provenance.get("preprocess")}
    rng = np.random.default_rng(SEED)
    labels = rng.integers(0, n_classes, n)
    n_shards = -(-n // SHARD)
    for k in range(n_shards):
        rows = range(k * SHARD, min(n, (k + 1) * SHARD))
        mix = torch.randn(len(rows), 512, generator=g) * (torch.rand(len(rows), 512, generator=g) < 0.02)
        acts = (mix @ basis + 0.3 * torch.randn(len(rows), d, generator=g)).half()
        with torch.no_grad():
            embeds = tower.readout_cls(acts.float()).half()
        meta = {"shard": k, "first_id": rows.start, "n_planned": len(rows), "n_ok": len(rows),
                "status": ["ok"] * len(rows), "reason": [None] * len(rows),
                "sha256": [f"{i:064x}" for i in rows], "batch_size": 256}
        save_tensors(shard_fpath(dpath, k), "cache-shard",
                     {"acts": acts, "embeds": embeds, "ids": torch.arange(rows.start, rows.stop)},
                     meta, provenance)
    index = pd.DataFrame({
        "id": np.arange(n), "path": [f"/data/images/{i:08d}.jpg" for i in range(n)],
        "label": [f"class {c:04d}" for c in labels], "sha256": [f"{i:064x}" for i in range(n)],
        "status": "ok", "reason": None, "has_watermark": rng.random(n) < 0.1,
        "site": rng.choice(["a", "b", "c"], n)})
    write_parquet(dpath / "index.parquet", "cache-index", index, provenance=provenance)
    payload = {"layout": {"shard_size": SHARD, "store_dtype": "float16", "max_image_pixels": None},
               "n_planned": n, "n_shards": n_shards, "d": d, "embed_dim": backbone.embed_dim,
               "token": "cls", "n_tokens": None, "source": {"root": "synthetic", "n_items": n},
               "created_with": {}, "complete": True, "n_ok": n, "n_skipped": 0, "skipped_reasons": {}}
    write_json(dpath / "manifest.json", "activation-cache", payload, provenance=provenance)


def write_models(root: Path, backbone, tower, n_latents: int, k: int, n_classes: int) -> dict[str, Path]:
    from clipaudit.heads import LinearProbe, save_probe
    from clipaudit.sae import save_sae
    from clipaudit.sae.model import TopKSAE

    paths = {"sae": root / f"sae-{n_latents}-{k}.safetensors", "probe": root / f"probe-{n_classes}.safetensors"}
    if not paths["sae"].is_file():
        torch.manual_seed(SEED)
        sae = TopKSAE(tower.width, n_latents, k, meta={
            "backbone": backbone.provenance, "hook": {"layer": tower.n_blocks - 1, "token": "cls"},
            "metrics": {"fvu": 0.2, "dead_fraction": 0.0}})
        save_sae(sae, paths["sae"])
    if not paths["probe"].is_file():
        g = torch.Generator().manual_seed(SEED + 1)
        probe = LinearProbe(torch.randn(n_classes, backbone.embed_dim, generator=g),
                            torch.zeros(n_classes), [f"class {c:04d}" for c in range(n_classes)], "l2",
                            meta={"provenance": {"backbone": backbone.provenance}})
        save_probe(probe, paths["probe"])
    return paths


@torch.no_grad()
def encode_only(cache_dpath: Path, sae_fpath: Path, batch_size: int) -> float:
    """Seconds to stream the cache and SAE-encode every row (the audit's main cost)."""
    from clipaudit.attribution.audit_pass import encode_rows
    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.sae import load_sae

    cache, sae = open_cache(cache_dpath, lean=True), load_sae(sae_fpath)
    step = encode_rows(sae, batch_size)
    start = time.perf_counter()
    for shard in cache.iter_shards(("acts",)):
        for s in range(0, len(shard["acts"]), step):
            sae.encode(shard["acts"][s:s + step])
    return time.perf_counter() - start


_PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "sys.stderr.write('\\npeak-rss-kib %d cpu-s %.1f\\n' % (u.ru_maxrss, u.ru_utime + u.ru_stime)); "
         "sys.exit(rc)")
"""A wrapper process whose only child is the audit: its RUSAGE_CHILDREN is the audit's peak."""


def run_audit(cache: Path, models: dict[str, Path], out: Path, env: dict[str, str],
              extra: list[str]) -> dict:
    """``clipaudit audit`` in a child process: wall time, peak RSS (MiB), CPU seconds (user +
    system: the figure to read on a shared machine), exit code, JSON."""
    shutil.rmtree(out, ignore_errors=True)
    heads = ["--probe", str(models["probe"])] if "probe" in models else []
    cmd = [sys.executable, "-c", _PEAK, sys.executable, "-c", "from clipaudit.cli import main; main()",
           "audit", str(cache), "--sae", str(models["sae"]), *heads, "--out", str(out), "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        sys.exit(f"audit failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    usage = proc.stderr.rsplit("peak-rss-kib", 1)[1].split()
    return {"wall_s": wall, "peak_mib": int(usage[0]) / 1024, "cpu_s": float(usage[2]),
            "exit": proc.returncode,
            "json": json.loads(proc.stdout)}


def pdf_pages(fpath: Path) -> int | None:
    """Pages of a PDF (pdfinfo from poppler-utils), None when there is none."""
    if not fpath.is_file():
        return None
    info = subprocess.run(["pdfinfo", str(fpath)], capture_output=True, text=True, check=True)
    return int(next(line.split()[1] for line in info.stdout.splitlines() if line.startswith("Pages:")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=Path(".bench/scale"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-pdf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from clipaudit.extraction.backbone import BackboneSpec, load_backbone
    from clipaudit.extraction.hooks import VisionTower

    args.out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(BackboneSpec(model=BACKBONE, pretrained="random", seed=SEED))
    tower = VisionTower(backbone.model)
    models = write_models(args.out, backbone, tower, args.latents, args.k, args.classes)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "XDG_CACHE_HOME": str(args.out / "xdg-cache")}
    extra = ["--no-pdf"] if args.no_pdf else []
    sizes = sorted(args.sizes)
    print(f"{BACKBONE} (random weights), d {tower.width}, SAE {args.latents} latents k {args.k}, "
          f"C {args.classes}, {args.threads} threads, batch {args.batch_size}")
    for n in sizes:
        start = time.perf_counter()
        write_cache(args.out / f"cache-{n}", n, args.classes, backbone, tower)
        print(f"cache of {n:,} rows ready ({time.perf_counter() - start:.0f} s)", flush=True)
    first = run_audit(args.out / f"cache-{sizes[0]}", models, args.out / "audit-warmup", env, ["--no-pdf"])
    print(f"warm-up audit (encodes the text embeddings once per model): {first['wall_s']:.0f} s", flush=True)
    print(f"{'N':>9} | {'encode s':>9} | {'audit s':>8} | {'CPU s':>7} | {'ratio':>5} | {'peak MiB':>8} | "
          f"{'folder MB':>9} | {'PDF pages':>9} | verdict | real findings (backed) | "
          f"permutation: findings (backed), failing")
    peaks = {}
    for n in sizes:
        cache = args.out / f"cache-{n}"
        encode_s = encode_only(cache, models["sae"], args.batch_size)
        out = args.out / f"audit-{n}"
        run = run_audit(cache, models, out, env, extra)
        peaks[n] = run["peak_mib"]
        folder = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
        pages = pdf_pages(out / "report.pdf")
        findings = run["json"]["findings"]
        control = run["json"]["permutation"] or {}
        failing = sum(v["status"] == "fail" and v["waived"] is None for v in run["json"]["verdicts"])
        print(f"{n:>9,} | {encode_s:>9.1f} | {run['wall_s']:>8.1f} | {run['cpu_s']:>7.1f} | "
              f"{run['wall_s'] / encode_s:>5.2f} | "
              f"{run['peak_mib']:>8.0f} | {folder:>9.1f} | {pages!s:>9} | {run['json']['verdict']:<7} "
              f"({failing} failing) | {len(findings)} ({sum(f['backed'] for f in findings)}) | "
              f"{control.get('n_findings')} ({control.get('n_backed')}), {control.get('n_failing')}",
              flush=True)
    if 100_000 in peaks and 1_000_000 in peaks:
        print(f"peak RSS 1M / 100k: {peaks[1_000_000] / peaks[100_000]:.3f} (target <= 1.10)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
