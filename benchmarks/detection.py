"""Detection quality on the synthetic world (issue: findings).

For every artifact x class x co-occurrence rate in {0.75, 0.9, 1.0}, plus a clean
control (rate 0.5) per artifact: make the data set, extract with the bundled tiny
CLIP, fit a probe, audit the probe and the prompt set. One SAE, trained once on a
clean world sample, serves every scenario (the SAE decomposes the CLIP, not the
classifier); the same clean sample is the reference set that describes components.

A planted artifact counts as found when a finding of the target class has top
images dominated by the artifact (>= 75% carry it) or a metadata AUC >= 0.9 for the
artifact's column. Prints one row per scenario and the targets' tallies.

``--sweep`` then re-audits every scenario (same data, caches and probes) with SAEs of
other widths and other numbers of top instances m, and with SAEs of the demo's
settings from other seeds, one line of tallies each: how much the result depends on
those choices and on chance.

Usage: python benchmarks/detection.py [--n 1000] [--out .bench/detection] [--quick] [--sweep]
Seeds are fixed; the README quotes this script's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

from clipaudit.audit import AuditConfig, FaithfulnessConfig, OutputConfig, run_audit
from clipaudit.demo import DemoConfig, demo_prompts_fpath
from clipaudit.describe.config import DescribeConfig
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.hooks import VisionTower
from clipaudit.heads import ProbeConfig, fit_probe_on_cache, save_probe
from clipaudit.sae import save_sae, train_sae
from clipaudit.synthetic import ARTIFACTS, CLASSES, make_planted_dataset

RATES = (0.75, 0.9, 1.0)
SEED = 0
SWEEP_EXPANSIONS = (2, 4, 8)
SWEEP_TOP_M = (20, 100, 400)
SWEEP_SAE_SEEDS = (1, 2, 3, 4)


def _found(result, head_name, artifact, target, index):
    """(found, rank, share) of the planted artifact among the target class's findings.
    Top instances are ids of the reference set, so ``index`` is the reference index."""
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


def _train_sae(cache, expansion: int, out_fpath: Path, readout, seed: int = SEED) -> str:
    sae_config = dataclasses.replace(DemoConfig().sae, expansion=expansion, seed=seed)
    trained = train_sae(cache, sae_config, embed_readout=readout)
    save_sae(trained.sae, out_fpath)
    m = trained.metrics
    return (f"expansion {expansion}, k {sae_config.k}, seed {seed}: FVU {m.fvu:.4f}, "
            f"dead {m.dead_fraction:.2f}")


def _audit_all(scenarios, sae_fpath: Path, ref_cache, backbone, out: Path, top_m: int, verbose: bool) -> dict:
    tallies = {"planted>=0.9": 0, "found+first": 0, "controls": 0, "control_hits": 0,
               "probe>prompts": 0, "scenarios": 0}
    index = ref_cache.ok_index
    for artifact, target, rate, dpath in scenarios:
        outcome = run_audit(dpath / "cache", sae_fpath, out, probe=dpath / "probe.safetensors",
                            prompts=demo_prompts_fpath(),
                            config=AuditConfig(
                                rules="dermatology", outputs=OutputConfig(html=False, pdf=False),
                                faithfulness=FaithfulnessConfig(instances=64),
                                describe=DescribeConfig(vocabularies=("dermatology",),
                                                        reference_cache=ref_cache.dpath, top_m=top_m)),
                            backbone=backbone)
        result = outcome.result
        spur = {h.name: max((c.spurious_share for c in h.classes
                             if c.class_name == (target or "malignant")), default=0.0)
                for h in result.heads}
        if target is None:
            hits = [f.concept for f in _artifact_findings(result, "probe")]
            tallies["controls"] += 1
            tallies["control_hits"] += bool(hits)
            if verbose:
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
        if verbose:
            print(f"{artifact:<11}{target:<10}{rate:>5} | {cells[0]:<24}| {cells[1]:<26}| "
                  f"{spur['probe']:.3f} / {spur['zero-shot']:.3f}")
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per scenario")
    parser.add_argument("--out", type=Path, default=Path(".bench/detection"))
    parser.add_argument("--quick", action="store_true", help="rate 0.9 and controls only")
    parser.add_argument("--sweep", action="store_true",
                        help="also re-audit with SAE expansions x top-m values, one line each")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    backbone = load_backbone(BackboneSpec.bundled())
    readout = VisionTower(backbone.model).readout_cls
    demo, top_m = DemoConfig(), DescribeConfig().top_m

    start = time.perf_counter()
    sae_data = make_planted_dataset(args.out / "sae-data", artifact=None, n=4 * args.n, seed=SEED + 1)
    ref_cache = extract(sae_data.manifest_fpath, args.out / "sae-cache", ExtractConfig(num_workers=1),
                        backbone=backbone).cache
    sae_fpath = args.out / "sae.safetensors"
    print(f"SAE (the demo's settings) {_train_sae(ref_cache, demo.sae.expansion, sae_fpath, readout)}; "
          f"top_m {top_m}  ({time.perf_counter() - start:.0f} s)")

    plan = [(a, c, r) for a in ARTIFACTS for c in CLASSES for r in (RATES if not args.quick else (0.9,))]
    plan += [(a, None, 0.5) for a in ARTIFACTS]
    scenarios = []
    for i, (artifact, target, rate) in enumerate(plan):
        dpath = args.out / f"{artifact}-{target or 'control'}-{rate}"
        data = make_planted_dataset(dpath / "data", artifact=artifact if target else None,
                                    target_class=target or "malignant", rate=rate, n=args.n,
                                    seed=SEED + 10 + i)
        cache = extract(data.manifest_fpath, dpath / "cache", ExtractConfig(num_workers=1),
                        backbone=backbone).cache
        save_probe(fit_probe_on_cache(cache.dpath, config=ProbeConfig(seed=SEED)).probe,
                   dpath / "probe.safetensors")
        scenarios.append((artifact, target, rate, dpath))

    print(f"{'artifact':<11}{'class':<10}{'rate':>5} | {'probe: found rank share':<24}| "
          f"{'prompts: found rank share':<26}| spurious share probe / prompts")
    tallies = _audit_all(scenarios, sae_fpath, ref_cache, backbone, args.out / "audit", top_m, verbose=True)
    print(f"\nplanted at rate >= 0.9 found and ranked first (probe): "
          f"{tallies['found+first']}/{tallies['planted>=0.9']}")
    print(f"clean controls with an artifact finding: {tallies['control_hits']}/{tallies['controls']}")
    print(f"probe's spurious share > prompt set's: {tallies['probe>prompts']}/{tallies['scenarios']}")
    print(f"total time {time.perf_counter() - start:.0f} s")

    if args.sweep:
        print("\nsweep: same scenarios, other SAE widths and top-m (found+first at rate >= 0.9 | "
              "controls with an artifact finding)")
        for expansion in SWEEP_EXPANSIONS:
            fpath = args.out / f"sae-x{expansion}.safetensors"
            about = _train_sae(ref_cache, expansion, fpath, readout)
            for m in SWEEP_TOP_M:
                t = _audit_all(scenarios, fpath, ref_cache, backbone, args.out / "audit", m, verbose=False)
                print(f"  SAE {about}; top_m {m:>4}: {t['found+first']}/{t['planted>=0.9']} | "
                      f"{t['control_hits']}/{t['controls']}", flush=True)
        for seed in SWEEP_SAE_SEEDS:
            fpath = args.out / f"sae-seed{seed}.safetensors"
            about = _train_sae(ref_cache, demo.sae.expansion, fpath, readout, seed=seed)
            t = _audit_all(scenarios, fpath, ref_cache, backbone, args.out / "audit", top_m, verbose=False)
            print(f"  SAE {about}; top_m {top_m:>4}: {t['found+first']}/{t['planted>=0.9']} | "
                  f"{t['control_hits']}/{t['controls']}", flush=True)


if __name__ == "__main__":
    main()
