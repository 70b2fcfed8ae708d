"""The issue-16 setup: a 1,000-class prompt set over 5,000 images, as a new user runs it.

5,000 clean world images (bundled tiny CLIP, d = 96), relabelled with 1,000 random
class names so that every class has exactly 5 instances; an SAE with the demo's
settings (192 latents, k 16) trained on their cache; a zero-shot prompt set of the
1,000 names; then ``clipaudit audit`` in a subprocess with the default rules. Prints
the audit's wall time, the peak memory of the audit process (ru_maxrss of the child),
the audit folder's size, report.html's size, report.pdf's page count and the verdicts.

Targets (issue 16): under 90 s and 2 GB, folder under 60 MB, PDF under 60 pages.

With 5 instances per class the default rules refuse to audit (a verdict needs 20
instances per class, ``thresholds.min_instances``); the benchmark audits with a rule
file that extends the default one and lowers ``min_instances`` to the instances per
class, as the refusal message suggests.

    python benchmarks/many_classes.py [--out .bench/many-classes] [--classes 1000]
        [--per-class 5] [--code DIR]   # --code: run the audit of another checkout

Data, cache and SAE are kept in --out and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

SEED = 0
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "bri", "dun", "fel", "gor",
              "hap", "jin", "kur", "lam", "mor", "nib", "pel", "quo", "ros", "tav", "wix")


def class_names(n: int, seed: int = SEED) -> list[str]:
    """``n`` distinct random pseudo-words (two or three syllables and a suffix)."""
    rng = random.Random(seed)
    names: dict[str, None] = {}
    while len(names) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        names.setdefault(f"{word} {rng.choice(('bird', 'tool', 'plant', 'fish', 'car', 'stone'))}")
    return list(names)


def prepare(out: Path, n_classes: int, per_class: int) -> dict[str, Path]:
    """Data set, cache, SAE and prompt set (reused when present)."""
    from clipaudit.demo import DemoConfig
    from clipaudit.extraction.cache import ExtractConfig, extract
    from clipaudit.sae import train_sae_on_cache
    from clipaudit.synthetic import make_planted_dataset

    n = n_classes * per_class
    paths = {"cache": out / "cache", "sae": out / "sae.safetensors", "prompts": out / "prompts.yaml"}
    if all((p / "manifest.json").is_file() if p.name == "cache" else p.is_file()
           for p in paths.values()):
        return paths
    data = make_planted_dataset(out / "data", artifact=None, n=n, seed=SEED, overwrite=True)
    names = class_names(n_classes)
    labels = [name for name in names for _ in range(per_class)]
    random.Random(SEED).shuffle(labels)
    manifest = pd.read_csv(data.manifest_fpath)
    manifest["label"] = labels
    manifest.to_csv(out / "data" / "manifest-many.csv", index=False)
    shutil.rmtree(paths["cache"], ignore_errors=True)
    extract(out / "data" / "manifest-many.csv", paths["cache"],
            ExtractConfig(backbone=DemoConfig().backbone, num_workers=1))
    train_sae_on_cache(paths["cache"], paths["sae"], DemoConfig().sae)
    lines = ["classes:"] + [f"  {json.dumps(name)}: {{names: [{json.dumps(name)}]}}" for name in names]
    paths["prompts"].write_text("\n".join(lines) + "\n")
    return paths


def folder_bytes(dpath: Path) -> int:
    return sum(p.stat().st_size for p in dpath.rglob("*") if p.is_file())


def run_audit_cli(paths: dict[str, Path], audit_dpath: Path, code: Path | None,
                  extra: list[str]) -> dict:
    """``clipaudit audit`` in a child process: wall time, peak RSS, exit code."""
    from scale import run_audit

    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    run = run_audit(paths["cache"], {"sae": paths["sae"]}, audit_dpath, env,
                    ["--prompts", str(paths["prompts"]), *extra])
    return {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"], "peak_rss_mib": run["peak_mib"],
            "exit_code": run["exit"], "json": run["json"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/many-classes"))
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--code", type=Path, default=None,
                        help="run the audit with another checkout's clipaudit (PYTHONPATH)")
    parser.add_argument("extra", nargs="*", help="more options for clipaudit audit (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = prepare(args.out, args.classes, args.per_class)
    print(f"data, cache, SAE and prompt set ready ({time.perf_counter() - start:.0f} s): "
          f"{args.classes} classes x {args.per_class} instances")
    audit_dpath = args.out / "audit"
    from scale import pdf_pages

    rules = args.out / f"rules-min-{args.per_class}.yaml"
    rules.write_text(f"version: 1\nextends: default\nthresholds:\n  min_instances: {args.per_class}\n")
    run = run_audit_cli(paths, audit_dpath, args.code, ["--rules", str(rules), *args.extra])
    verdicts = run["json"]["verdicts"]
    statuses = pd.Series([v["status"] for v in verdicts]).value_counts().to_dict()
    html = audit_dpath / "report.html"
    print(f"audit: {run['wall_s']:.1f} s (target 90; {run['cpu_s']:.1f} CPU s), peak RSS "
          f"{run['peak_rss_mib']:.0f} MiB (target 2048), exit code {run['exit_code']}")
    print(f"folder: {folder_bytes(audit_dpath) / 1e6:.1f} MB (target 60); report.html "
          f"{html.stat().st_size / 1e6 if html.is_file() else 0:.2f} MB; report.pdf "
          f"{pdf_pages(audit_dpath / 'report.pdf')} pages (target 60)")
    print(f"verdict {run['json']['verdict']}: {statuses.get('fail', 0)} failing, "
          f"{statuses.get('warn', 0)} warnings, {statuses.get('pass', 0)} passing; "
          f"{len(run['json']['findings'])} findings")
    for p in sorted(audit_dpath.iterdir()):
        size = folder_bytes(p) if p.is_dir() else p.stat().st_size
        print(f"  {p.name:<40} {size / 1e6:8.2f} MB")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
