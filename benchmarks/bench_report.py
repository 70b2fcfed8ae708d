"""Report size and render time for a typical audit (target: HTML of a few hundred kB).

A synthetic audit folder: 2 heads x 5 classes, 300 scatter points per class,
3 findings per class and head with 8 top images each, 96 px photo-like PNG
thumbnails (what ``clipaudit audit`` writes). Prints sizes, timings and the
HTML size as a ratio of a 500 kB budget.

    python benchmarks/bench_report.py [--pdf]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipaudit.report import build_report_data, render_html, render_pdf
from clipaudit.results import (
    AblationEffect,
    AuditResult,
    ClassAudit,
    ComponentPoint,
    FaithfulnessCurve,
    Finding,
    HeadAudit,
    InstanceInfo,
    RuleVerdict,
    SliceEffect,
)

HTML_BUDGET = 500_000
N_CLASSES, N_POINTS, N_FINDINGS, N_TOP = 5, 300, 3, 8


def _photo(rng: np.random.Generator) -> Image.Image:
    """Smooth colour field plus sensor-like noise: compresses like a real photo."""
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    base = rng.uniform(60, 200, size=3)
    img = base + 50 * np.stack([xx, yy, xx * yy], -1) + rng.normal(0, 8, size=(96, 96, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_audit(dpath: Path) -> AuditResult:
    rng, nrng = random.Random(0), np.random.default_rng(0)
    classes = [f"class-{c}" for c in range(N_CLASSES)]
    n_instances = 2 * N_CLASSES * N_FINDINGS * N_TOP
    (dpath / "thumbnails").mkdir(parents=True)
    instances = []
    for i in range(n_instances):
        _photo(nrng).save(dpath / "thumbnails" / f"{i}.png")
        instances.append(InstanceInfo(i, f"/data/{i}.jpg", classes[i % N_CLASSES],
                                      f"thumbnails/{i}.png"))
    heads, next_instance = [], 0
    for head in ("probe", "zero-shot"):
        findings, class_audits = [], []
        for c in classes:
            for r in range(N_FINDINGS):
                top = list(range(next_instance, next_instance + N_TOP))
                next_instance += N_TOP
                effect = AblationEffect(r, c, -0.2, 0.9, 0.7, 5,
                                        [SliceEffect("has_ruler", v, 40, -0.3, 0.9, 0.6, 4)
                                         for v in ("True", "False")])
                findings.append(Finding(f"{head}:{c}:{r}", head, c, r, "shortcut", r + 1,
                                        0.2 - 0.05 * r, 0.2 - 0.05 * r, -0.03, 0.6, "ruler", 0.1, top,
                                        {"has_ruler": 0.9, "skin_tone": 0.55}, effect))
            points = [ComponentPoint(j, rng.uniform(-0.05, 0.1), rng.uniform(-0.1, 0.1),
                                     rng.random(), "concept") for j in range(N_POINTS)]
            class_audits.append(ClassAudit(c, 100, 0.9, 0.3, 0.1, points))
        curves = [FaithfulnessCurve(m, list(range(17)), [1 - 0.05 * s for s in range(17)], 0.5)
                  for m in ("act_x_grad", "logit_lens", "act_x_logit_lens", "activation",
                            "random")]
        heads.append(HeadAudit(head, "zero-shot" if head == "zero-shot" else "linear-probe",
                               classes, 0.9, class_audits, findings, curves))
    verdicts = [RuleVerdict("no-shortcuts", "shortcut", "fail", "component carries 20%",
                            h.name, c) for h in heads for c in classes]
    return AuditResult("bench", {"backbone": {"id": "ViT-B-32@x"}, "seed": 0},
                       {"fvu": 0.1}, heads, instances=instances, verdicts=verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pdf", action="store_true", help="also time the PDF")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dpath = Path(tmp)
        result = make_audit(dpath)
        t0 = time.perf_counter()
        data = build_report_data(result, dpath)
        t1 = time.perf_counter()
        page = render_html(data)
        t2 = time.perf_counter()
        thumbs = sum(len(t.src or "") for h in data.heads for c in h.classes for card in c.cards
                     for t in card.thumbnails)
        svgs = sum(len(c.scatter_svg) for h in data.heads for c in h.classes)
        n_findings = len(data.finding_rows)
        print(f"audit: {len(result.heads)} heads x {N_CLASSES} classes, {n_findings} findings, "
              f"{N_POINTS} points/class")
        print(f"build_report_data: {t1 - t0:.2f} s   render_html: {t2 - t1:.3f} s")
        print(f"html: {len(page) / 1e3:.0f} kB  (thumbnails {thumbs / 1e3:.0f} kB, "
              f"scatter svg {svgs / 1e3:.0f} kB, rest {(len(page) - thumbs - svgs) / 1e3:.0f} kB)")
        print(f"html / budget {HTML_BUDGET / 1e3:.0f} kB: {len(page) / HTML_BUDGET:.2f}")
        if args.pdf:
            t3 = time.perf_counter()
            pdf = render_pdf(data)
            print(f"render_pdf: {time.perf_counter() - t3:.1f} s   pdf: {len(pdf) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
