"""Speed of the synthetic world: images/second of make_planted_dataset (PNG files,
manifest and ground truth included) and of rendering alone.

Target: a planted-shortcut data set of a few thousand images in seconds.
Run: python benchmarks/synthetic.py [--n 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clipaudit.synthetic import ARTIFACTS, make_planted_dataset, render_scene, sample_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="images per data set")
    args = parser.parse_args()

    start = time.perf_counter()
    for i in range(args.n):
        rng = np.random.default_rng([0, i])
        render_scene(sample_scene(rng, artifact_probs={a: 0.3 for a in ARTIFACTS}), rng)
    render_s = time.perf_counter() - start
    print(f"render only:           {args.n} images in {render_s:6.2f} s = "
          f"{args.n / render_s:7.0f} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = make_planted_dataset(Path(tmp) / "planted", artifact="ruler", rate=0.9,
                                    n=args.n, seed=0)
        total_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in (data.dpath / "images").iterdir()) / 2**20
    print(f"make_planted_dataset:  {args.n} images in {total_s:6.2f} s = "
          f"{args.n / total_s:7.0f} images/s ({size_mb:.1f} MB of PNG)")
    print(f"target 'a few thousand images in seconds': {args.n} images took {total_s:.1f} s "
          f"({'met' if total_s < 10 else 'NOT met'} at < 10 s)")


if __name__ == "__main__":
    main()
