"""Do concept labels read well? Groups of synthetic images that share one attribute
stand in for a component's top instances; each group should be labelled with a
concept of that attribute from the dermatology vocabulary, by the bundled tiny CLIP.

Prints each group's label, score, clarity and top-3 concepts, and the hit rate.

    python benchmarks/bench_concept_labels.py [--per-group 20]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import torch

from clipaudit.describe.components import concept_embeddings, describe_components
from clipaudit.describe.concepts import load_vocabulary
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.synthetic.quality import encode_images
from clipaudit.synthetic.world import render_scene, sample_scene

# group -> (which scenes, concepts that count as a right label)
GROUPS = {
    "ruler": (lambda s: s.artifacts == {"ruler"}, {"ruler"}),
    "band-aid": (lambda s: s.artifacts == {"band_aid"}, {"band-aid"}),
    "ink marker": (lambda s: s.artifacts == {"ink_marker"}, {"ink marker"}),
    "hair": (lambda s: s.artifacts == {"hair"}, {"hair"}),
    "vignette": (lambda s: s.artifacts == {"vignette"}, {"dark corners"}),
    "malignant": (lambda s: s.diagnosis == "malignant" and not s.artifacts,
                  {"malignant melanoma", "irregular border", "dark lesion", "black lesion",
                   "brown lesion", "asymmetric lesion"}),
    "dark skin": (lambda s: s.skin_tone == "dark" and not s.artifacts, {"dark skin"}),
    "fair skin": (lambda s: s.skin_tone == "fair" and not s.artifacts, {"fair skin"}),
    "red lesion": (lambda s: s.lesion_colour == "red" and not s.artifacts, {"red lesion"}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-group", type=int, default=20)
    parser.add_argument("--scenes", type=int, default=1500)
    args = parser.parse_args()
    backbone = load_backbone(BackboneSpec.bundled())
    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng) for _ in range(args.scenes)]
    images = [render_scene(s, np.random.default_rng(10_000 + i)) for i, s in enumerate(scenes)]
    with torch.no_grad():
        embeds = encode_images(backbone, images)

    rows = []
    for pick, _ in GROUPS.values():
        ids = [i for i, s in enumerate(scenes) if pick(s)][:args.per_group]
        rows.append(ids + [-1] * (args.per_group - len(ids)))
    ids = torch.tensor(rows)
    top = SimpleNamespace(ids=ids, values=(ids >= 0).float(), counts=(ids >= 0).sum(1))
    vocab = load_vocabulary("dermatology")
    desc = describe_components(top, embeds, backbone.encode_text, vocab,
                               {"benign": ["benign nevus"], "malignant": ["malignant melanoma"]})
    concept_embeds = concept_embeddings(vocab, backbone.encode_text)
    hits = 0
    for j, (name, (_, right)) in enumerate(GROUPS.items()):
        top3 = [vocab.concepts[i] for i in desc.alignment(concept_embeds)[j].topk(3).indices]
        hit = desc.concept[j] in right
        hits += hit
        print(f"{name:11s} n={int(top.counts[j]):2d}  label {desc.concept[j]!r:22s} "
              f"score {float(desc.concept_score[j]):+.3f}  clarity {float(desc.clarity[j]):.2f}  "
              f"alpha(benign, malignant) {[round(a, 3) for a in desc.class_alignment[j].tolist()]}"
              f"  top3 {top3}  {'ok' if hit else 'MISS'}")
    print(f"labels right: {hits}/{len(GROUPS)}")


if __name__ == "__main__":
    main()
