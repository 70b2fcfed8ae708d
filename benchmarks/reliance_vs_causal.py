"""How far the gate's concept reliance lies from the causal drop it stands in for.

Reads a finished run of ``benchmarks/detection.py`` (its ``--out`` folder: per world the
reference cache, per scenario the probe and the audit) and, for every scenario, artifact
and class, sets the audit's concept-reliance record for the artifact's column
(``has_<artifact>``: estimate and 95% lower bound) beside the probe's causal accuracy
drop on re-rendered pairs (the benchmark's ground truth, recomputed with the same seeds).
Prints the pairs that disagree by more than ``--tolerance`` and, per world, the bias and
mean absolute error of the estimate, and how often the gate's decision (lower bound at
0.05) and the causal test's (interval at or above 0.05) differ.

Usage: python benchmarks/reliance_vs_causal.py [--out .bench/detection] [--pairs 500]
       [--tolerance 0.03] [--worlds dermatology birds]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import detection as bench  # noqa: E402  (the benchmark's own worlds, pairs and seeds)

from clipaudit.extraction.backbone import load_backbone  # noqa: E402
from clipaudit.heads import load_head  # noqa: E402


def records(audit_fpath: Path) -> dict[tuple[str, str], dict]:
    """The probe's concept-reliance records of one audit, by (concept, class)."""
    result = json.loads(audit_fpath.read_text())["result"]
    head = next(h for h in result["heads"] if h["kind"] == "linear-probe")
    return {(r["concept"], r["class_name"]): r for r in head["concept_reliance"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/detection"))
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--worlds", nargs="+", default=list(bench.WORLDS), choices=list(bench.WORLDS))
    args = parser.parse_args()
    for name in args.worlds:
        root = args.out / name
        scenarios = sorted(root.glob("s[0-9]*"))
        if not scenarios:
            sys.exit(f"{root}: no scenarios; run benchmarks/detection.py --out {args.out} first")
        world = bench.world_spec(name)
        backbone = load_backbone(world.backbone)
        pairs = bench.counterfactual_pairs(world, backbone, args.pairs)
        print(f"\n== {name}: {len(scenarios)} scenarios; pairs differing by more than "
              f"{args.tolerance}")
        print(f"{'scenario':<9}{'column':<16}{'class':<12}{'causal [95%]':>24}{'estimate':>10}"
              f"{'bound':>8}  decisions")
        errors, disagree, n = [], 0, 0
        for dpath in scenarios:
            probe = load_head("linear-probe", dpath / "probe.safetensors", backbone)
            measured = records(dpath / "audit" / "audit.json")
            for artifact in world.artifacts:
                for cls in world.classes:
                    r = measured.get((f"has_{artifact}", cls))
                    if r is None or r["reliance"] is None:
                        continue
                    drop = bench.causal_drop(probe, pairs[(artifact, cls)])
                    error = r["reliance"] - drop.value
                    errors.append(error)
                    gate = (r["reliance_low"] if r["reliance_low"] is not None
                            else r["reliance"]) >= bench.MIN_DROP
                    decided = drop.relied
                    differs = decided is not None and decided != gate
                    disagree += differs
                    n += 1
                    if abs(error) > args.tolerance or differs:
                        low = r["reliance_low"] if r["reliance_low"] is not None else float("nan")
                        print(f"{dpath.name:<9}{'has_' + artifact:<16}{cls:<12}"
                              f"{drop.value:>+8.3f} [{drop.low:+.3f}, {drop.high:+.3f}]"
                              f"{r['reliance']:>+10.3f}{low:>+8.3f}"
                              f"  {'gate fails' if gate else 'gate passes'}, causal "
                              f"{bench.RELIED_WORD[decided]}{'  <- differ' if differs else ''}",
                              flush=True)
        e = np.array(errors)
        print(f"{name}: {n} pairs; estimate - causal: mean {e.mean():+.3f}, mean absolute "
              f"{np.abs(e).mean():.3f}, beyond {args.tolerance}: {(np.abs(e) > args.tolerance).sum()}; "
              f"decisions that differ where the causal test decides: {disagree}")


if __name__ == "__main__":
    main()
