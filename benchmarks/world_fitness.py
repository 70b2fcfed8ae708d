"""Are the synthetic worlds and their bundled CLIPs fit to benchmark shortcut detection?

Per world and artifact (``clipaudit.synthetic.fitness``): the causal accuracy drop of a
linear probe fitted on the world's CLIP embeddings where the artifact marks every image
of the world's default target class (rate 1.0; it should be well over 0.05), the same
for a probe fitted where the artifact is independent of the label (rate 0.5; it should
stay small), and, on a clean reference set, how decodable the artifact is from the
activations and how well the best single component of an SAE trained with the demo's
settings isolates it (>= 0.9: findable by SAE findings; decodable but lower: a case for
the coverage check).

Usage: python benchmarks/world_fitness.py [--worlds birds dermatology] [--n 1000]
       [--pairs 200] [--reference 2000] [--out .bench/world_fitness]
Seeds are fixed; the README quotes this script's output.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from clipaudit.synthetic import list_worlds
from clipaudit.synthetic.fitness import FitnessConfig, measure_fitness

MIN_DROP = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", default=["birds", "dermatology"],
                        choices=list_worlds())
    parser.add_argument("--n", type=int, default=1000, help="images per planted data set")
    parser.add_argument("--pairs", type=int, default=200, help="counterfactual pairs per artifact")
    parser.add_argument("--reference", type=int, default=2000, help="clean reference images")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path(".bench/world_fitness"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    config = FitnessConfig(n=args.n, n_pairs=args.pairs, n_reference=args.reference)
    for world in args.worlds:
        start = time.perf_counter()
        rows = measure_fitness(world, args.out / world, config)
        print(f"\n== {world}: probes on {args.n} images, {args.pairs} counterfactual pairs, "
              f"SAE (demo settings) on {args.reference} clean images "
              f"({time.perf_counter() - start:.0f} s)")
        print(f"{'artifact':<12}{'class':<11}{'acc clean':>10}{'rate 1.0':>10}{'drop':>8}"
              f"{'control drop':>14}{'decodable':>11}{'best comp.':>12}")
        for r in rows:
            print(f"{r.artifact:<12}{r.target_class:<11}{r.planted.accuracy_clean:>10.3f}"
                  f"{r.planted.accuracy_artifact:>10.3f}{r.planted.drop:>+8.3f}"
                  f"{r.control.drop:>+14.3f}{r.decodable_auc:>11.3f}"
                  f"{r.best_component_auc:>8.3f} #{r.best_component:<3}")
        relied = sum(r.planted.drop >= MIN_DROP for r in rows)
        calm = sum(r.control.drop < MIN_DROP for r in rows)
        isolated = sum(r.best_component_auc >= 0.9 for r in rows)
        print(f"{world}: planted at rate 1.0 and relied on (drop >= {MIN_DROP}): {relied}/{len(rows)}; "
              f"independent of the label and not relied on: {calm}/{len(rows)}; isolated by one "
              f"SAE component (AUC >= 0.9): {isolated}/{len(rows)}", flush=True)


if __name__ == "__main__":
    main()
