"""How far clipaudit's default attributions (frozen norms and head normalisation) agree
with the paper's plain-autograd ones (``--gradient exact``), and which is more faithful.

On the bundled tiny CLIP: a planted ruler -> malignant data set and a clean reference
set of the synthetic world (as ``clipaudit demo``), an SAE with the demo's settings
trained on the reference set, a linear probe and the demo's prompt set. For every
instance and class: the Spearman rank correlation of the two modes' attributions over
the instance's active components, and the overlap of their top-5 components (by
attribution, largest first). Deletion curves (256 instances) for both rankings.

Run: python benchmarks/gradient_modes.py [--n 2000] [--out .bench/gradient_modes]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from clipaudit.attribution.ablation import deletion_curves
from clipaudit.attribution.patching import Attributions, attribute_cls
from clipaudit.demo import DemoConfig, demo_prompts_fpath
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.cache_reader import open_cache
from clipaudit.extraction.hooks import cache_readout
from clipaudit.heads import fit_probe_on_cache, load_head
from clipaudit.sae import load_sae, train_sae_on_cache
from clipaudit.synthetic import make_planted_dataset


def per_instance_class(attr: Attributions) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per instance: its active components and their [k, C] attributions."""
    order = torch.argsort(attr.rows, stable=True)
    rows, comps, vals = attr.rows[order], attr.components[order], attr.values[order]
    bounds = torch.searchsorted(rows, torch.arange(len(attr.ids) + 1))
    out = [vals[bounds[i]:bounds[i + 1]].numpy() for i in range(len(attr.ids))]
    keys = [comps[bounds[i]:bounds[i + 1]].numpy() for i in range(len(attr.ids))]
    return np.asarray(keys, dtype=object), np.asarray(attr.ids), out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def agreement(frozen: Attributions, exact: Attributions, top: int = 5) -> dict[str, float]:
    keys_f, _, vals_f = per_instance_class(frozen)
    keys_e, _, vals_e = per_instance_class(exact)
    rhos, overlaps = [], []
    for kf, vf, ke, ve in zip(keys_f, vals_f, keys_e, vals_e):
        assert np.array_equal(kf, ke)  # the same active components in both modes
        if len(kf) < 3:
            continue
        for c in range(vf.shape[1]):
            rhos.append(spearman(vf[:, c], ve[:, c]))
            n = min(top, len(kf))
            top_f = set(kf[np.argsort(-vf[:, c])[:n]])
            top_e = set(kf[np.argsort(-ve[:, c])[:n]])
            overlaps.append(len(top_f & top_e) / n)
    rhos_a = np.asarray([r for r in rhos if np.isfinite(r)])
    return {"median_spearman": float(np.median(rhos_a)), "q10_spearman": float(np.quantile(rhos_a, 0.1)),
            "mean_top5_overlap": float(np.mean(overlaps)), "median_top5_overlap": float(np.median(overlaps)),
            "n_pairs": len(rhos_a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="audited images (and as many reference images)")
    parser.add_argument("--out", type=Path, default=Path(".bench/gradient_modes"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    demo = DemoConfig()
    backbone = load_backbone(BackboneSpec.bundled())
    data = make_planted_dataset(args.out / "data", artifact="ruler", target_class="malignant", rate=0.9,
                                n=args.n, seed=args.seed)
    ref = make_planted_dataset(args.out / "reference", artifact=None, n=args.n, seed=args.seed + 1)
    caches = {name: extract(m, args.out / name, ExtractConfig(num_workers=1), backbone=backbone).dpath
              for name, m in (("cache", data.manifest_fpath), ("reference-cache", ref.manifest_fpath))}
    sae_fpath = args.out / "sae.safetensors"
    train_sae_on_cache(caches["reference-cache"], sae_fpath, demo.sae)
    sae = load_sae(sae_fpath)
    cache = open_cache(caches["cache"])
    acts = cache.load_acts().float()
    ids = torch.arange(len(acts))
    readout = cache_readout(backbone.model, cache.provenance["hook"])
    heads = {"probe": fit_probe_on_cache(caches["cache"]).probe,
             "zero-shot": load_head("zero-shot", demo_prompts_fpath(), backbone)}
    print(f"bundled tiny CLIP, {len(acts)} instances, SAE {sae.n_latents} latents k={sae.k}; "
          f"rest of tower: {readout.description}")
    for name, head in heads.items():
        frozen = attribute_cls(acts, ids, sae, head, readout)
        exact = attribute_cls(acts, ids, sae, head, readout, gradient="exact")
        stats = agreement(frozen, exact)
        target = frozen.scores.argmax(1)
        sample = torch.randperm(len(acts), generator=torch.Generator().manual_seed(args.seed))[:256]
        curves = {c.method: c.auc for c in deletion_curves(acts[sample], sae, head, readout, target[sample])}
        print(f"{name:9s} median Spearman {stats['median_spearman']:.3f} (10th percentile "
              f"{stats['q10_spearman']:.3f}), top-5 overlap mean {stats['mean_top5_overlap']:.3f} "
              f"median {stats['median_top5_overlap']:.2f} over {stats['n_pairs']} instance-class pairs; "
              f"deletion AUC frozen {curves['act_x_grad']:.3f} exact {curves['act_x_grad_exact']:.3f} "
              f"random {curves['random']:.3f} (lower = more faithful)")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
