"""Speed of the synthetic world: images/second of make_planted_dataset (PNG files,
masks, manifest, column roles and ground truth included), of make_counterfactual_dataset,
and of rendering alone, with and without artifact masks (their cost as a ratio).

Target: a planted-shortcut data set of a few thousand images in seconds.
Run: python benchmarks/synthetic.py [--n 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clipaudit.synthetic import (
    ARTIFACTS,
    make_counterfactual_dataset,
    make_planted_dataset,
    render_scene,
    render_scene_with_masks,
    sample_scene,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="images per data set")
    args = parser.parse_args()

    seconds = {}
    for name, render in (("render only", render_scene), ("render + masks", render_scene_with_masks)):
        start = time.perf_counter()
        for i in range(args.n):
            rng = np.random.default_rng([0, i])
            render(sample_scene(rng, artifact_probs={a: 0.3 for a in ARTIFACTS}), rng)
        seconds[name] = time.perf_counter() - start
        print(f"{name + ':':22s} {args.n} images in {seconds[name]:6.2f} s = "
              f"{args.n / seconds[name]:7.0f} images/s")
    print(f"masks cost x{seconds['render + masks'] / seconds['render only']:.2f} of rendering time")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = make_planted_dataset(Path(tmp) / "planted", artifact="ruler", rate=0.9,
                                    n=args.n, seed=0)
        total_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in (data.dpath / "images").iterdir()) / 2**20
    print(f"make_planted_dataset:  {args.n} images in {total_s:6.2f} s = "
          f"{args.n / total_s:7.0f} images/s ({size_mb:.1f} MB of PNG)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_counterfactual_dataset(Path(tmp) / "pairs", artifact="ruler", n=args.n // 2, seed=0)
        pairs_s = time.perf_counter() - start
    print(f"make_counterfactual_dataset: {args.n // 2} pairs ({args.n} images) in {pairs_s:6.2f} s = "
          f"{args.n / pairs_s:7.0f} images/s")
    print(f"target 'a few thousand images in seconds': {args.n} images took {total_s:.1f} s "
          f"({'met' if total_s < 10 else 'NOT met'} at < 10 s)")


if __name__ == "__main__":
    main()
