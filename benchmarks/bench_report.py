"""Report size and render time for a typical audit (target: HTML of a few hundred kB).

A synthetic audit folder as ``clipaudit audit`` writes it: 2 heads x 5 classes, 300
scatter points per class, 3 findings per class and head with 8 top images each (no
image shared by two findings); per top image a 192 px PNG thumbnail and a 192 px PNG
heatmap overlay (``heatmaps/c<component>-i<instance>-overlay.png``). The images stand
in for photos: 1/f^1.4 noise (the spectrum of natural images) under a few hard-edged
shapes. At the report's 128 px they compress like photos: JPEG at quality 82 takes
4.4 kB per image (4.1-4.6 kB on crops of ten of scikit-image's colour sample photos),
WebP at quality 80 0.70 of that (0.74 on the photos). The first version of this
benchmark drew 96 px images of per-pixel noise and no overlays; noise is a poor stand-in
for photos (WebP smooths it away: 0.27 of the JPEG for 192 px noise shown at 128 px).

Prints sizes, timings and the HTML size as a ratio of a 500 kB budget.

    python benchmarks/bench_report.py [--pdf] [--thumbnail-px 128] [--per-card 6]
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipaudit.attribution.overlays import render_overlay
from clipaudit.report import build_report_data, render_html, render_pdf
from clipaudit.report.model import ReportConfig
from clipaudit.results import (
    AblationEffect,
    AuditResult,
    ClassAudit,
    ComponentHeatmap,
    ComponentInfo,
    ComponentPoint,
    FaithfulnessCurve,
    Finding,
    HeadAudit,
    HeatmapsInfo,
    InstanceInfo,
    RuleVerdict,
    SliceEffect,
)

HTML_BUDGET = 500_000
N_CLASSES, N_POINTS, N_FINDINGS, N_TOP = 5, 300, 3, 8
IMAGE_PX, GRID = 192, 7  # what the audit writes: 192 px images; a ViT-B/32's 7x7 patches


def _pink(rng: np.random.Generator, px: int, alpha: float) -> np.ndarray:
    """Noise with a 1/f^alpha amplitude spectrum, zero mean and unit deviation."""
    f = np.sqrt(np.fft.fftfreq(px)[:, None] ** 2 + np.fft.rfftfreq(px)[None, :] ** 2)
    amplitude = 1 / np.maximum(f, 1 / px) ** alpha
    field = np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(px, px))
    return (field - field.mean()) / field.std()


def _photo(rng: np.random.Generator, px: int = IMAGE_PX) -> Image.Image:
    """A photo's stand-in: 1/f^1.4 luminance and colour, a few objects, texture on top."""
    lum, c1, c2 = _pink(rng, px, 1.4), _pink(rng, px, 1.9), _pink(rng, px, 1.9)
    img = rng.uniform(70, 180) + rng.normal(0, 25, size=3) + 40 * lum[..., None] \
        + 12 * np.stack([c1, c2, -c1 - c2], -1)
    picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.integers(0, px, 2)
        w, h = rng.integers(px // 8, px // 2, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    textured = np.asarray(picture, np.float32) + 6 * _pink(rng, px, 1.4)[..., None]
    return Image.fromarray(np.clip(textured, 0, 255).astype(np.uint8))


def _heatmap(rng: np.random.Generator, instance: int, component: int, picture: Image.Image,
             dpath: Path) -> ComponentHeatmap:
    """An overlay as the audit draws it: the model's 224 px view under a map with one peak."""
    peak = [int(v) for v in rng.integers(0, GRID, 2)]
    heat = rng.random((GRID, GRID)) * 0.2
    heat[peak[0], peak[1]] = 1.0
    name = f"heatmaps/c{component}-i{instance}"
    render_overlay(picture.resize((224, 224)), heat, IMAGE_PX, peak).save(dpath / f"{name}-overlay.png")
    return ComponentHeatmap(instance, f"{name}-overlay.png", f"{name}-map.png", peak, 1.0)


def make_audit(dpath: Path) -> AuditResult:
    rng, nrng = random.Random(0), np.random.default_rng(0)
    classes = [f"class-{c}" for c in range(N_CLASSES)]
    n_instances = 2 * N_CLASSES * N_FINDINGS * N_TOP
    (dpath / "thumbnails").mkdir(parents=True)
    (dpath / "heatmaps").mkdir()
    instances, pictures = [], []
    for i in range(n_instances):
        pictures.append(_photo(nrng))
        pictures[-1].save(dpath / "thumbnails" / f"{i}.png")
        instances.append(InstanceInfo(i, f"/data/{i}.jpg", classes[i % N_CLASSES],
                                      f"thumbnails/{i}.png"))
    heads, components, next_instance = [], [], 0
    for head in ("probe", "zero-shot"):
        findings, class_audits = [], []
        for c in classes:
            for r in range(N_FINDINGS):
                top = list(range(next_instance, next_instance + N_TOP))
                next_instance += N_TOP
                component = N_POINTS + len(components)  # each finding its own component
                components.append(ComponentInfo(
                    component, "ruler", 0.1, 0.6, top,
                    heatmaps=[_heatmap(nrng, i, component, pictures[i], dpath) for i in top]))
                effect = AblationEffect(r, c, -0.2, 0.9, 0.7, 5,
                                        [SliceEffect("has_ruler", v, 40, -0.3, 0.9, 0.6, 4)
                                         for v in ("True", "False")])
                findings.append(Finding(f"{head}:{c}:{r}", head, c, component, "shortcut", r + 1,
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
                       {"fvu": 0.1}, heads, components=components, instances=instances,
                       verdicts=verdicts,
                       heatmaps=HeatmapsInfo("relevance", [GRID, GRID], None, "relevance: bench maps"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pdf", action="store_true", help="also time the PDF")
    parser.add_argument("--thumbnail-px", type=int, default=ReportConfig.thumbnail_px,
                        help="ReportConfig.thumbnail_px (what a smaller size would save)")
    parser.add_argument("--per-card", type=int, default=ReportConfig.thumbnails_per_finding,
                        help="ReportConfig.thumbnails_per_finding")
    args = parser.parse_args()
    config = ReportConfig(thumbnail_px=args.thumbnail_px, thumbnails_per_finding=args.per_card)
    with tempfile.TemporaryDirectory() as tmp:
        dpath = Path(tmp)
        result = make_audit(dpath)
        t0 = time.perf_counter()
        data = build_report_data(result, dpath, config)
        t1 = time.perf_counter()
        page = render_html(data)
        t2 = time.perf_counter()
        images = [len(u) for u in re.findall(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", page)]
        svgs = sum(len(svg) for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S))
        n_findings = len(data.finding_rows)
        print(f"audit: {len(result.heads)} heads x {N_CLASSES} classes, {n_findings} findings, "
              f"{N_POINTS} points/class")
        print(f"build_report_data: {t1 - t0:.2f} s   render_html: {t2 - t1:.3f} s")
        print(f"html: {len(page) / 1e3:.0f} kB  (images {sum(images) / 1e3:.0f} kB: {len(images)} "
              f"thumbnails and overlays, {sum(images) / max(1, len(images)) / 1e3:.1f} kB each; "
              f"scatter svg {svgs / 1e3:.0f} kB, rest {(len(page) - sum(images) - svgs) / 1e3:.0f} kB)")
        print(f"html / budget {HTML_BUDGET / 1e3:.0f} kB: {len(page) / HTML_BUDGET:.2f}")
        if args.pdf:
            t3 = time.perf_counter()  # as write_report does: the PDF's own data, its encodings
            pdf = render_pdf(build_report_data(result, dpath, config, print_mode=True))
            print(f"build and render_pdf: {time.perf_counter() - t3:.1f} s   pdf: {len(pdf) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
