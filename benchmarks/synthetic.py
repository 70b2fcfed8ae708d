"""Speed of a synthetic world: images/second of make_planted_dataset (PNG files,
masks, manifest, column roles and ground truth included), of make_counterfactual_dataset,
and of rendering alone, with and without artifact masks (their cost as a ratio; the
birds world always computes its masks, so it shows rendering with masks only).

Target: a planted-shortcut data set of a few thousand images in seconds.
Run: python benchmarks/synthetic.py [--n 3000] [--world dermatology|birds]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clipaudit.synthetic import (
    get_world,
    list_worlds,
    make_counterfactual_dataset,
    make_planted_dataset,
    render_scene,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000, help="images per data set")
    parser.add_argument("--world", default="dermatology", choices=list_worlds())
    args = parser.parse_args()
    world = get_world(args.world)

    seconds = {}
    renderers = {"render + masks": world.render_scene}
    if world.name == "dermatology":
        renderers = {"render only": render_scene, **renderers}
    for name, render in renderers.items():
        start = time.perf_counter()
        for i in range(args.n):
            rng = np.random.default_rng([0, i])
            render(world.sample_scene(rng, artifact_probs={a: 0.3 for a in world.artifacts}), rng)
        seconds[name] = time.perf_counter() - start
        print(f"{name + ':':22s} {args.n} images in {seconds[name]:6.2f} s = "
              f"{args.n / seconds[name]:7.0f} images/s")
    if "render only" in seconds:
        print(f"masks cost x{seconds['render + masks'] / seconds['render only']:.2f} of rendering time")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = make_planted_dataset(Path(tmp) / "planted", artifact=world.default_artifact,
                                    rate=0.9, n=args.n, seed=0, world=world)
        total_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in (data.dpath / "images").iterdir()) / 2**20
    print(f"make_planted_dataset:  {args.n} images in {total_s:6.2f} s = "
          f"{args.n / total_s:7.0f} images/s ({size_mb:.1f} MB of PNG)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_counterfactual_dataset(Path(tmp) / "pairs", artifact=world.default_artifact,
                                    n=args.n // 2, seed=0, world=world)
        pairs_s = time.perf_counter() - start
    print(f"make_counterfactual_dataset: {args.n // 2} pairs ({args.n} images) in {pairs_s:6.2f} s = "
          f"{args.n / pairs_s:7.0f} images/s")
    print(f"target 'a few thousand images in seconds': {args.n} images took {total_s:.1f} s "
          f"({'met' if total_s < 10 else 'NOT met'} at < 10 s)")


if __name__ == "__main__":
    main()
