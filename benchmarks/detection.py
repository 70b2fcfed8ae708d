"""Detection quality: does the gate fail exactly when a probe relies on a shortcut?

For every synthetic world, every artifact x class x co-occurrence rate in {0.75, 0.9,
1.0}, a clean control (no planted artifact) and, per artifact, the issue-20 control (the
artifact in half of each class, independent of the label): make the data set, extract
with the world's bundled CLIP, fit a probe, and audit the probe with the shipped rule
file (``dermatology`` for the dermatology world, ``default`` for any other), with nothing
set per world. (Only the probe: the ground truth is the probe's reliance; the prompt set
is the same in every scenario of a world.) One SAE per world, trained with the demo's
settings on a clean sample of the world that also describes the components.

Ground truth is causal, not the planting rate: for each artifact and class, pairs of
scenes of the *other* class rendered without and with the artifact (same scene, same
layout); the probe relies on the artifact for the class when its accuracy on those
images drops by at least 0.05 once the artifact is on them. The drop is measured on a
finite set of pairs, so it carries a 95% interval: a scenario counts as relied on when
the interval lies at or above 0.05, as not relied on when it lies below, and as
undecided when it holds 0.05 (the counterfactual set cannot tell which side the probe is
on; such scenarios are listed with the gate's verdict and kept out of the tallies, and
more pairs shrink their number). The gate's concept-reliance check decides on the same
footing: its 95% lower bound must reach the limit.

Per scenario it prints the causal drop, the gate's exit code, which routes named the
artifact (SAE finding, concept reliance, coverage failure), the SAE finding's rank and
share; then per world the SAE-coverage table and the tallies:
- relied-on shortcuts on which the gate fails naming the artifact (target: all);
- clean controls and not-relied-on scenarios on which the gate passes (target: all);
- undecided scenarios, and on how many of them the gate passed.

Usage: python benchmarks/detection.py [--n 1000] [--pairs 500] [--out .bench/detection]
       [--quick] [--worlds dermatology ...]
Seeds are fixed; the README quotes this script's output.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipaudit.audit import AuditConfig, FaithfulnessConfig, OutputConfig, run_audit
from clipaudit.demo import DemoConfig
from clipaudit.describe.config import DescribeConfig
from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.hooks import make_tower
from clipaudit.heads import ProbeConfig, fit_probe_on_cache, load_head, save_probe
from clipaudit.results import AuditResult, Finding
from clipaudit.sae import save_sae, train_sae

RATES = (0.75, 0.9, 1.0)
SEED = 0
MIN_DROP = 0.05
"""Issue 13: a probe relies on an artifact when its accuracy drops by at least this."""
SAE_ROUTE_CHECKS = ("forbidden-concept", "shortcut-share", "metadata-confirmed")
TALLIES = ("relied", "relied_ok", "clean", "clean_ok", "undecided", "undecided_ok")
RELIED_WORD = {True: "yes", False: "no", None: "undecided"}


@dataclass(frozen=True)
class WorldSpec:
    """What the benchmark needs of a synthetic world."""

    name: str
    rules: str
    """The shipped rule file the world's audits use."""
    backbone: BackboneSpec
    vocabularies: tuple[str, ...]
    classes: tuple[str, ...]
    artifacts: tuple[str, ...]
    make_dataset: Callable[..., Any]
    """(out_dpath, artifact, target_class, rate, n, seed) -> object with manifest_fpath."""
    render_pair: Callable[[Any, str, str], tuple[np.ndarray, np.ndarray]]
    """(seed, label, artifact) -> (image without, image with) of one scene."""


def world_spec(name: str) -> WorldSpec:
    """A registered synthetic world as the benchmark uses it: its bundled CLIP, its shipped
    vocabularies, and the shipped rule file of its domain where there is one (``default``
    otherwise); nothing else is set per world."""
    from clipaudit.gate import list_rulesets
    from clipaudit.synthetic import get_world, make_planted_dataset

    w = get_world(name)
    shipped = set(list_rulesets())

    def make(out: Path, artifact: str | None, target: str, rate: float, n: int, seed: int) -> Any:
        return make_planted_dataset(out, artifact=artifact, target_class=target, rate=rate, n=n,
                                    seed=seed, world=w)

    def pair(rng_seed: Any, label: str, artifact: str) -> tuple[np.ndarray, np.ndarray]:
        images = []
        for present in (False, True):
            rng = np.random.default_rng(rng_seed)
            scene = w.sample_scene(rng, label=label, forced_artifacts={artifact: present})
            images.append(w.render_scene(scene, rng).image)
        return images[0], images[1]

    return WorldSpec(w.name, w.name if w.name in shipped else "default",
                     BackboneSpec(model=w.clip_model), tuple(w.vocabularies), tuple(w.classes),
                     tuple(w.artifacts), make, pair)


WORLDS: tuple[str, ...] = ("dermatology", "birds")


# ------------------------------------------------------------------ causal ground truth


@torch.no_grad()
def _embed(backbone: Backbone, images: Sequence[np.ndarray], batch: int = 256) -> torch.Tensor:
    out = []
    for s in range(0, len(images), batch):
        x = torch.stack([backbone.preprocess(Image.fromarray(a)) for a in images[s:s + batch]])
        out.append(backbone.model.encode_image(x.to(backbone.device)).float().cpu())
    return torch.cat(out)


def counterfactual_pairs(world: WorldSpec, backbone: Backbone, n_pairs: int
                         ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Per (artifact, class): embeddings of ``n_pairs`` scenes of the other classes without
    and with the artifact, and their labels."""
    out = {}
    for a_i, artifact in enumerate(world.artifacts):
        for c_i, target in enumerate(world.classes):
            others = [c for c in world.classes if c != target]
            labels = [others[i % len(others)] for i in range(n_pairs)]
            pairs = [world.render_pair([SEED, 7919, a_i, c_i, i], label, artifact)
                     for i, label in enumerate(labels)]
            out[(artifact, target)] = (_embed(backbone, [p[0] for p in pairs]),
                                       _embed(backbone, [p[1] for p in pairs]), labels)
    return out


@dataclass(frozen=True)
class Drop:
    """The probe's causal accuracy drop on one counterfactual set, with its 95% interval
    (normal approximation over the paired per-scene differences)."""

    value: float
    low: float
    high: float

    @property
    def relied(self) -> bool | None:
        """True when the interval lies at or above ``MIN_DROP``, False when it lies below,
        None (undecided) when the counterfactual set cannot tell."""
        if self.low >= MIN_DROP:
            return True
        if self.high < MIN_DROP:
            return False
        return None


def causal_drop(probe: Any, pairs: tuple[torch.Tensor, torch.Tensor, list[str]]) -> Drop:
    """Accuracy on the other classes' images without the artifact minus with it: per
    scene, correct without minus correct with (each scene is its own control)."""
    clean, with_artifact, labels = pairs
    truth = torch.tensor([probe.class_names.index(x) for x in labels])

    def correct(e: torch.Tensor) -> torch.Tensor:
        return (probe.scores(e).argmax(1) == truth).double()

    diff = correct(clean) - correct(with_artifact)
    value = float(diff.mean())
    half = 1.96 * float(diff.std()) / max(len(diff), 1) ** 0.5 if len(diff) > 1 else 1.0
    return Drop(value, value - half, value + half)


# ------------------------------------------------------------------ which route named it


def _names_artifact(f: Finding, column: str, artifact: str, flags: dict[int, bool]) -> bool:
    top = [flags.get(i, False) for i in f.top_instances]
    dominated = bool(top) and sum(top) / len(top) >= 0.75
    return dominated or f.metadata_auc.get(column, 0.0) >= 0.9


def routes(result: AuditResult, artifact: str, target: str | None,
           flags: dict[int, bool]) -> tuple[list[str], Finding | None]:
    """Failing routes that name the artifact (for ``target``, or any class), and the SAE
    finding that does."""
    column = f"has_{artifact}"
    named, finding = [], None
    by_id = {f.id: f for h in result.heads for f in h.findings}
    for v in result.verdicts:
        if v.status != "fail" or v.waived is not None:
            continue
        if target is not None and v.class_name not in (None, target):
            continue
        if v.check in SAE_ROUTE_CHECKS:
            for item in v.details.get("violations", []):
                f = by_id.get(item.get("finding"))
                if f is not None and _names_artifact(f, column, artifact, flags):
                    named.append("SAE finding")
                    if finding is None or f.rank < finding.rank:
                        finding = f
        elif v.check == "concept-reliance" and f"`{column}`" in v.message:
            named.append("concept reliance")
        elif v.check == "sae-coverage" and f"`{column}`" in v.message:
            named.append("coverage failure")
    return sorted(set(named)), finding


# ------------------------------------------------------------------ one world


def run_world(world: WorldSpec, args: argparse.Namespace) -> dict[str, int]:
    out = args.out / world.name
    backbone = load_backbone(world.backbone)
    readout = make_tower(backbone.model).pooled_readout
    start = time.perf_counter()
    ref_data = world.make_dataset(out / "reference-data", None, world.classes[-1], 0.5, 4 * args.n,
                                  SEED + 1)
    ref_cache = extract(ref_data.manifest_fpath, out / "reference-cache",
                        ExtractConfig(num_workers=1), backbone=backbone).cache
    sae_config = dataclasses.replace(DemoConfig().sae, seed=SEED)
    trained = train_sae(ref_cache, sae_config, embed_readout=readout)
    sae_fpath = out / "sae.safetensors"
    save_sae(trained.sae, sae_fpath)
    flags_of = {a: dict(zip(ref_cache.ok_index["id"].astype(int),
                            ref_cache.ok_index[f"has_{a}"].astype(bool))) for a in world.artifacts}
    pairs = counterfactual_pairs(world, backbone, args.pairs)
    print(f"\n== world {world.name} ({backbone.id}), rules {world.rules}; SAE expansion "
          f"{sae_config.expansion}, k {sae_config.k} (FVU {trained.metrics.fvu:.4f}, dead "
          f"{trained.metrics.dead_fraction:.2f}) on {4 * args.n} clean images, which also "
          f"describe the components; {args.pairs} counterfactual pairs per artifact and class "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    plan: list[tuple[str | None, str | None, float]] = []
    rates = (0.9,) if args.quick else RATES
    plan += [(a, c, r) for a in world.artifacts for c in world.classes for r in rates]
    plan += [(None, None, 0.5)] + [(a, None, 0.5) for a in world.artifacts]
    print(f"{'scenario':<28}{'drop [95% interval]':>26}  relied    exit  "
          f"{'routes naming the artifact':<38}{'rank':>4} {'share':>6}  ok")
    tallies = dict.fromkeys(TALLIES, 0)
    coverage = None
    for i, (artifact, target, rate) in enumerate(plan):
        name = (f"{artifact}->{target} {rate}" if target else
                f"{artifact or 'none'} half of each class" if artifact else "clean control")
        dpath = out / f"s{i:02d}"
        data = world.make_dataset(dpath / "data", artifact, target or world.classes[-1], rate,
                                  args.n, SEED + 10 + i)
        cache = extract(data.manifest_fpath, dpath / "cache", ExtractConfig(num_workers=1),
                        backbone=backbone).cache
        probe_fpath = dpath / "probe.safetensors"
        save_probe(fit_probe_on_cache(cache.dpath, config=ProbeConfig(seed=SEED)).probe, probe_fpath)
        probe = load_head("linear-probe", probe_fpath, backbone)
        outcome = run_audit(
            cache.dpath, sae_fpath, dpath / "audit", probe=probe_fpath,
            config=AuditConfig(rules=world.rules, outputs=OutputConfig(html=False, pdf=False),
                               faithfulness=FaithfulnessConfig(instances=64),
                               describe=DescribeConfig(vocabularies=world.vocabularies,
                                                       reference_cache=ref_cache.dpath)),
            backbone=backbone)
        result = outcome.result
        coverage = coverage or result.coverage
        if artifact is not None and target is not None:
            drop = causal_drop(probe, pairs[(artifact, target)])
            relied = drop.relied
            named, finding = routes(result, artifact, target, flags_of[artifact])
        else:  # controls: every artifact and class; a control whose probe picked up a
            # reliance by chance counts as relied on (and the gate must fail it)
            drops = {k: causal_drop(probe, v) for k, v in pairs.items()}
            verdicts = [d.relied for d in drops.values()]
            relied = True if True in verdicts else None if None in verdicts else False
            deciding = {k: d for k, d in drops.items() if d.relied == relied}
            (art, cls), drop = max(deciding.items(), key=lambda kv: (kv[1].low, kv[1].value))
            if relied is not False:
                named, finding = routes(result, art, cls, flags_of[art])
            else:
                named, finding = ([], None) if artifact is None else \
                    routes(result, artifact, None, flags_of[artifact])
            name += f" (max drop: {art}->{cls})"
        failed_naming = outcome.exit_code == 1 and bool(named)
        ok = failed_naming if relied else outcome.exit_code == 0
        key = {True: "relied", False: "clean", None: "undecided"}[relied]
        tallies[key] += 1
        tallies[key + "_ok"] += ok
        failing = sorted({f"{v.rule}[{v.class_name or '-'}]" for v in result.verdicts
                          if v.status == "fail" and v.waived is None})
        mark = ("ok" if ok else "MISS") if relied is not None else \
            ("(gate failed naming it)" if failed_naming else f"(gate exit {outcome.exit_code})")
        print(f"{name:<28}{drop.value:>+7.3f} [{drop.low:+.3f}, {drop.high:+.3f}]  "
              f"{RELIED_WORD[relied]:<9} {outcome.exit_code:>4}  "
              f"{', '.join(named) or '-':<38}{finding.rank if finding else '-':>4} "
              f"{finding.share if finding else 0:>6.3f}  {mark}"
              + ("" if ok or relied is None else f"  failing: {', '.join(failing) or 'none'}"),
              flush=True)

    print(f"\nSAE coverage on the reference set ({world.name}): column | decodable (CV linear "
          "probe AUC) | best component AUC | best concept group AUC")
    for c in coverage or []:
        print(f"  {c.column:<18} {c.decodable_auc or float('nan'):.3f}  "
              f"{c.best_component_auc or float('nan'):.3f} (#{c.best_component})  "
              f"{c.best_concept_auc or float('nan'):.3f} ({c.best_concept})")
    print(f"\n{world.name}: relied-on shortcuts on which the gate fails naming the artifact: "
          f"{tallies['relied_ok']}/{tallies['relied']}; controls and not-relied-on scenarios on "
          f"which the gate passes: {tallies['clean_ok']}/{tallies['clean']}; undecided (the "
          f"interval holds {MIN_DROP}): {tallies['undecided']}, on which the gate passed "
          f"{tallies['undecided_ok']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per scenario")
    parser.add_argument("--pairs", type=int, default=500,
                        help="counterfactual pairs per artifact and class")
    parser.add_argument("--out", type=Path, default=Path(".bench/detection"))
    parser.add_argument("--quick", action="store_true", help="rate 0.9 and controls only")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    totals = dict.fromkeys(TALLIES, 0)
    for name in args.worlds:
        for k, v in run_world(world_spec(name), args).items():
            totals[k] += v
    print(f"\nall worlds: relied-on shortcuts failed naming the artifact {totals['relied_ok']}/"
          f"{totals['relied']}; controls and not-relied-on scenarios passed "
          f"{totals['clean_ok']}/{totals['clean']}; undecided {totals['undecided']} (the gate "
          f"passed {totals['undecided_ok']})")


if __name__ == "__main__":
    main()
