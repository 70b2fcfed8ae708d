"""Detection quality on the synthetic world (issue: findings).

For every artifact x class x co-occurrence rate in {0.75, 0.9, 1.0}, plus a clean
control (rate 0.5) per artifact: make the data set, extract with the bundled tiny
CLIP, fit a probe, audit the probe and the prompt set. One SAE, trained once on a
clean world sample, serves every scenario (the SAE decomposes the CLIP, not the
classifier); the same clean sample is the reference set that describes components.

A planted artifact counts as found when a finding of the target class has top
images dominated by the artifact (>= 75% carry it) or a metadata AUC >= 0.9 for the
artifact's column. Prints one row per scenario and the targets' tallies.

Usage: python benchmarks/detection.py [--n 1000] [--out .bench/detection] [--quick]
Seeds are fixed; the README quotes this script's output.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from clipaudit.audit import AuditConfig, run_audit
from clipaudit.backbone import load_backbone
from clipaudit.cache import ExtractConfig, extract
from clipaudit.demo import demo_prompts_fpath
from clipaudit.heads import ProbeConfig, fit_probe_on_cache, save_probe
from clipaudit.hooks import VisionTower
from clipaudit.sae import SAETrainConfig, save_sae, train_sae
from clipaudit.synthetic import ARTIFACTS, CLASSES, make_planted_dataset

RATES = (0.75, 0.9, 1.0)
SEED = 0


def _found(result, head_name, artifact, target, index):
    # top instances are ids of the reference set, so ``index`` is the reference index
    """(found, rank, share) of the planted artifact among the target class's findings."""
    column = f"has_{artifact}"
    flags = dict(zip(index["id"].astype(int), index[column].astype(bool)))
    head = result.head(head_name)
    for f in [f for f in head.findings if f.class_name == target]:
        top = [flags.get(i, False) for i in f.top_instances]
        dominated = bool(top) and sum(top) / len(top) >= 0.75
        if dominated or f.metadata_auc.get(column, 0.0) >= 0.9:
            return True, f.rank, f.share
    return False, None, None


def _artifact_findings(result, head_name):
    words = {"ruler", "band-aid", "band aid", "plaster", "marker", "ink", "hair", "corner", "vignett"}
    return [f for f in result.head(head_name).findings if any(w in f.concept.lower() for w in words)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per scenario")
    parser.add_argument("--out", type=Path, default=Path(".bench/detection"))
    parser.add_argument("--quick", action="store_true", help="rate 0.9 and controls only")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    backbone = load_backbone()
    readout = VisionTower(backbone.model).readout_cls

    start = time.perf_counter()
    sae_data = make_planted_dataset(args.out / "sae-data", artifact=None, n=4 * args.n, seed=SEED + 1)
    sae_cache = extract(sae_data.manifest_fpath, args.out / "sae-cache", ExtractConfig(num_workers=1),
                        backbone=backbone).cache
    trained = train_sae(sae_cache, SAETrainConfig(expansion=4, k=16, steps=1500, batch_size=256, seed=SEED),
                        embed_readout=readout)
    save_sae(trained.sae, args.out / "sae.safetensors")
    print(f"SAE: {trained.metrics}  ({time.perf_counter() - start:.0f} s)")

    scenarios = [(a, c, r) for a in ARTIFACTS for c in CLASSES for r in (RATES if not args.quick else (0.9,))]
    scenarios += [(a, None, 0.5) for a in ARTIFACTS]
    print(f"{'artifact':<11}{'class':<10}{'rate':>5} | {'probe: found rank share':<24}| "
          f"{'prompts: found rank share':<26}| spurious share probe / prompts")
    tallies = {"planted>=0.9": 0, "found+first": 0, "controls": 0, "control_hits": 0,
               "probe>prompts": 0, "scenarios": 0}
    for i, (artifact, target, rate) in enumerate(scenarios):
        name = f"{artifact}-{target or 'control'}-{rate}"
        data = make_planted_dataset(args.out / name / "data", artifact=artifact if target else None,
                                    target_class=target or "malignant", rate=rate, n=args.n,
                                    seed=SEED + 10 + i)
        cache = extract(data.manifest_fpath, args.out / name / "cache", ExtractConfig(num_workers=1),
                        backbone=backbone).cache
        save_probe(fit_probe_on_cache(cache.dpath, config=ProbeConfig(seed=SEED)).probe,
                   args.out / name / "probe.safetensors")
        outcome = run_audit(cache.dpath, args.out / "sae.safetensors", args.out / name / "audit",
                            probe=args.out / name / "probe.safetensors", prompts=demo_prompts_fpath(),
                            config=AuditConfig(rules="dermatology", vocabularies=("dermatology",),
                                               html=False, pdf=False, faithfulness_instances=64,
                                               reference_cache=sae_cache.dpath),
                            backbone=backbone)
        result, index = outcome.result, sae_cache.ok_index
        spur = {h.name: max((c.spurious_share for c in h.classes
                             if c.class_name == (target or "malignant")), default=0.0)
                for h in result.heads}
        if target is None:
            hits = [f.concept for f in _artifact_findings(result, "probe")]
            tallies["controls"] += 1
            tallies["control_hits"] += bool(hits)
            print(f"{artifact:<11}{'control':<10}{rate:>5} | artifact findings: {hits or 'none'}")
            continue
        cells = []
        for head in ("probe", "zero-shot"):
            found, rank, share = _found(result, head, artifact, target, index)
            cells.append(f"{'yes' if found else 'no':<5} {rank or '-':<4} {share or 0:.3f}")
        found, rank, _ = _found(result, "probe", artifact, target, index)
        tallies["scenarios"] += 1
        tallies["probe>prompts"] += spur["probe"] > spur["zero-shot"]
        if rate >= 0.9:
            tallies["planted>=0.9"] += 1
            tallies["found+first"] += found and rank == 1
        print(f"{artifact:<11}{target:<10}{rate:>5} | {cells[0]:<24}| {cells[1]:<26}| "
              f"{spur['probe']:.3f} / {spur['zero-shot']:.3f}")
    print(f"\nplanted at rate >= 0.9 found and ranked first (probe): "
          f"{tallies['found+first']}/{tallies['planted>=0.9']}")
    print(f"clean controls with an artifact finding: {tallies['control_hits']}/{tallies['controls']}")
    print(f"probe's spurious share > prompt set's: {tallies['probe>prompts']}/{tallies['scenarios']}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
