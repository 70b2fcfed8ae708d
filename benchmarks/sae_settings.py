"""SAE settings from the data against the old fixed defaults (expansion 8, k 32).

On a clean sample of the synthetic dermatology world through the bundled tiny CLIP
(d = 96; every artifact occurs in 20% of images, independently of the diagnosis),
trains one SAE with the settings ``train-sae`` now picks without options and one with
the former fixed defaults, same rows, same seed, and prints for each: latents, k, steps,
FVU, dead fraction and, per artifact column, the ROC AUC of the best single component
beside that of a cross-validated linear probe on the activations (can the SAE isolate
what the CLIP encodes?).

    python benchmarks/sae_settings.py [--n 2000] [--cache CACHE] [--seeds 0 1] [--ks 8 11]
                                      [--no-former]

``--ks`` adds SAEs with the data's expansion and steps but another k (how the k rule
was checked).

``--cache`` reuses an activation cache of world images (e.g. the demo's
clipaudit-demo/reference-cache) instead of making one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipaudit.extraction.cache import ExtractConfig, extract  # noqa: E402
from clipaudit.extraction.cache_reader import open_cache  # noqa: E402
from clipaudit.sae import SAETrainConfig, train_sae_on_cache  # noqa: E402
from clipaudit.sae.settings import choose_sae_settings  # noqa: E402

COLUMNS = ("has_ruler", "has_band_aid", "has_ink_marker", "has_hair", "has_vignette")


def _cache(args: argparse.Namespace, root: Path) -> Path:
    if args.cache is not None:
        return args.cache
    from clipaudit.synthetic import make_planted_dataset

    data = make_planted_dataset(root / "data", artifact=None, n=args.n, seed=args.seed + 1)
    return extract(data.manifest_fpath, root / "cache", ExtractConfig(num_workers=0)).dpath


def _best_component_aucs(sae, acts: torch.Tensor, truth: dict[str, np.ndarray]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        codes = sae.encode(acts)
    dense = torch.zeros(len(acts), sae.n_latents).scatter(1, codes.indices, codes.values.float())
    dense = dense.numpy()
    live = np.flatnonzero(dense.max(0) > 0)
    return {c: max(roc_auc_score(y, dense[:, j]) for j in live) for c, y in truth.items()}


def _probe_aucs(acts: torch.Tensor, truth: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    probe = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    return {c: float(roc_auc_score(y, cross_val_predict(probe, acts.numpy(), y, cv=folds,
                                                         method="decision_function")))
            for c, y in truth.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="clean world images")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ks", type=int, nargs="*", default=[])
    parser.add_argument("--no-former", action="store_true",
                        help="skip the former defaults (the slowest SAE)")
    args = parser.parse_args()
    args.seed = args.seeds[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = open_cache(_cache(args, root))
        acts = cache.load_acts().float()
        index = cache.ok_index.reset_index(drop=True)
        truth = {c: index[c].astype(str).str.lower().eq("true").to_numpy() for c in COLUMNS
                 if c in index}
        print(f"{len(acts)} rows of width {cache.d}; artifact prevalence "
              + ", ".join(f"{c} {y.mean():.2f}" for c, y in truth.items()))
        probe = _probe_aucs(acts, truth, args.seed)
        print("linear probe (3-fold CV) ROC AUC: " + ", ".join(f"{c} {v:.2f}" for c, v in probe.items()))
        configs = {}
        for seed in args.seeds:
            data = choose_sae_settings(SAETrainConfig(seed=seed), cache.d, len(acts)).config
            configs[f"from the data, seed {seed}"] = SAETrainConfig(seed=seed)
            for k in args.ks:
                configs[f"k {k} (else from the data), seed {seed}"] = SAETrainConfig(
                    n_latents=data.n_latents, k=k, steps=data.steps, seed=seed)
            if not args.no_former:
                configs[f"former defaults (8x, k 32), seed {seed}"] = SAETrainConfig(
                    expansion=8, k=32, seed=seed)
        for name, config in configs.items():
            settings = choose_sae_settings(config, cache.d, len(acts))
            start = time.perf_counter()
            result = train_sae_on_cache(cache.dpath, root / "sae.safetensors", config,
                                        embed_check=False)
            seconds = time.perf_counter() - start
            best = _best_component_aucs(result.sae, acts, truth)
            m = result.metrics
            print(f"\n{name}: {settings.n_latents} latents, k {settings.config.k}, "
                  f"{result.steps} steps ({seconds:.0f} s); FVU {m.fvu:.4f}, dead {m.dead_fraction:.1%}")
            print("  best single component ROC AUC: "
                  + ", ".join(f"{c} {v:.2f}" for c, v in best.items()))
            for warning in settings.warnings:
                print(f"  warning: {warning}")


if __name__ == "__main__":
    main()
