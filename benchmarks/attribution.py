"""Attribution speed (issue: classifier heads and attribution patching).

Prints, each measured in this one run:
1. from the cache (default hook point): attributions for N instances x 10 classes,
   8192 latents, k = 32, d = 768, next to the SAE encoding alone (target: attribution
   adds <= 50% on top of encoding);
2. from images: forward + attribution for all classes as a ratio of the bare
   ``encode_image`` forward on the same images (target >= 0.8, default hook point);
3. the paper's reference approach (a full forward and backward pass per image per
   prompt, with hooks), reimplemented here: the speed-up for 10 classes.

Usage: python benchmarks/attribution.py [--instances 100000] [--images 64]
Random weights (ViT-B-32 architecture); CPU.
"""

from __future__ import annotations

import argparse
import time

import open_clip
import torch

from clipaudit.attribution.patching import attribute_cls, attribute_images
from clipaudit.extraction.hooks import HookPoint, VisionTower
from clipaudit.heads import LinearProbe
from clipaudit.sae import TopKSAE


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _reference_attribution(model, images, sae, head, layer: int) -> torch.Tensor:
    """maxdreyer/attributing-clip style: for every image and every class, a full
    forward pass with the SAE hooked in and a backward pass for that class."""
    block = model.visual.transformer.resblocks[layer]
    out = []
    for i in range(len(images)):
        per_class = []
        for c in range(len(head.class_names)):
            holder = {}

            def hook(module, inputs, output, holder=holder):
                z = sae.encode_dense(output[:, 0]).detach().requires_grad_(True)
                h_hat = sae.decode_dense(z)
                holder["z"] = z
                patched = h_hat + (output[:, 0] - h_hat).detach()
                return torch.cat([patched[:, None], output[:, 1:]], 1)

            handle = block.register_forward_hook(hook)
            try:
                score = head.scores(model.encode_image(images[i:i + 1]))[0, c]
            finally:
                handle.remove()
            (grad,) = torch.autograd.grad(score, holder["z"])
            per_class.append((holder["z"] * grad).detach())
        out.append(torch.stack(per_class, -1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--reference-images", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = open_clip.create_model("ViT-B-32").eval()
    tower = VisionTower(model)
    d, n_classes = tower.width, 10
    sae = TopKSAE(d, 8192, 32)
    head = LinearProbe(torch.randn(n_classes, 512), torch.randn(n_classes),
                       [f"class{i}" for i in range(n_classes)], "l2")

    # 1. from the cache
    acts = torch.randn(args.instances, d)
    ids = torch.arange(args.instances)
    batch = 4096

    def encode_only():
        with torch.no_grad():
            for s in range(0, len(acts), batch):
                sae.encode(acts[s:s + batch])

    t_encode = _time(encode_only)
    t_attr = _time(lambda: attribute_cls(acts, ids, sae, head, tower, batch_size=batch))
    print(f"[cache] {args.instances} instances x {n_classes} classes, 8192 latents, k=32, d={d}")
    print(f"[cache] SAE encoding alone   : {t_encode:8.2f} s")
    print(f"[cache] attribution (total)  : {t_attr:8.2f} s   overhead over encoding: "
          f"{(t_attr / t_encode - 1) * 100:+.0f}%  (target <= +50%)")

    # 2. from images, default hook point
    images = torch.randn(args.images, 3, 224, 224)
    hook = HookPoint()

    def bare():
        with torch.no_grad():
            for s in range(0, len(images), 32):
                model.encode_image(images[s:s + 32])

    def audit_from_images():
        with torch.no_grad():
            for s in range(0, len(images), 32):
                cap = tower.capture(images[s:s + 32], hook)
                attribute_cls(cap.acts, ids[s:s + 32], sae, head, tower)

    t_bare, t_audit = _time(bare, 2), _time(audit_from_images, 2)
    print(f"[images] {args.images} images: bare encode_image {args.images / t_bare:6.1f} img/s, "
          f"forward + attribution {args.images / t_audit:6.1f} img/s, ratio {t_bare / t_audit:.2f} "
          "(target >= 0.8)")

    # general autograd path (any hook point), for reference
    t_general = _time(lambda: [attribute_images(images[s:s + 32], ids[s:s + 32], sae, head, tower,
                                                HookPoint(-2)) for s in range(0, len(images), 32)])
    print(f"[images] block -2 (batched autograd path): {args.images / t_general:6.1f} img/s")

    # 3. the paper's reference approach
    n_ref = args.reference_images
    t_ref = _time(lambda: _reference_attribution(model, images[:n_ref], sae, head, -1))
    per_image_ref = t_ref / n_ref
    per_image_ours = t_audit / args.images
    print(f"[reference] forward+backward per image per class: {per_image_ref * 1000:8.1f} ms/image; "
          f"clipaudit: {per_image_ours * 1000:6.1f} ms/image; speed-up x{per_image_ref / per_image_ours:.1f} "
          f"for {n_classes} classes")


if __name__ == "__main__":
    main()
