"""Concept labels under each shipped vocabulary, with the scrambled-phrase floor.

Reads a finished demo (``clipaudit demo --out DIR``: its audit's component descriptions,
its SAE and its clean reference cache), relabels every component with each vocabulary
(and a combination) and prints: how many components are ``unlabelled (closest: ...)``,
the share of each class's evidence they carry (what the ``vocabulary-fit`` rule reads),
the ruler finding's label; and, for the ``dermatology`` labels without the floor, how
many components labelled with an artifact actually separate it (ROC AUC of the
component's activation against the artifact column on the reference set).

    clipaudit demo --out clipaudit-demo --no-pdf
    python benchmarks/vocabulary_fit.py clipaudit-demo
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipaudit.describe.components import (  # noqa: E402
    _alignment,
    _floored,
    concept_embeddings,
    load_descriptions,
)
from clipaudit.describe.concepts import load_vocabularies  # noqa: E402
from clipaudit.describe.labels import is_unlabelled  # noqa: E402
from clipaudit.extraction.backbone import BackboneSpec, load_backbone  # noqa: E402
from clipaudit.gate.check_vocabulary import unlabelled_shares  # noqa: E402
from clipaudit.results import load_audit  # noqa: E402

ARTIFACTS = {"ruler": "has_ruler", "band-aid": "has_band_aid", "ink marker": "has_ink_marker",
             "hair": "has_hair", "dark corners": "has_vignette"}


def labels_for(vocabs: list[str], desc, backbone, floor: str) -> list[str]:
    vocabulary = load_vocabularies(vocabs)
    align = _alignment(desc.semantic, concept_embeddings(vocabulary, backbone.encode_text),
                       desc.empty_text)
    score, best = align.max(dim=1)
    dead = desc.semantic.norm(dim=1) == 0
    concept = ["" if d else vocabulary.concepts[i] for i, d in zip(best.tolist(), dead.tolist())]
    return _floored(concept, score, desc.semantic, desc.empty_text, backbone.encode_text,
                    vocabulary, ("{}",), desc.semantic.shape[1], floor)


def artifact_label_aucs(demo: Path, labels: list[str]) -> list[tuple[int, str, float]]:
    from sklearn.metrics import roc_auc_score

    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.sae import load_sae

    cache = open_cache(demo / "reference-cache")
    sae = load_sae(demo / "sae.safetensors")
    with torch.no_grad():
        codes = sae.encode(cache.load_acts().float())
    dense = torch.zeros(len(codes.indices), sae.n_latents).scatter(
        1, codes.indices, codes.values.float()).numpy()
    index = cache.ok_index.reset_index(drop=True)
    out = []
    for j, label in enumerate(labels):
        if label in ARTIFACTS:
            truth = index[ARTIFACTS[label]].astype(str).str.lower().eq("true").to_numpy()
            out.append((j, label, float(roc_auc_score(truth, dense[:, j]))))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="folder of a finished `clipaudit demo`")
    args = parser.parse_args()
    desc = load_descriptions(args.demo / "audit" / "descriptions.safetensors")
    result = load_audit(args.demo / "audit")
    backbone = load_backbone(BackboneSpec())
    ruler = [f.component for h in result.heads for f in h.findings if f.concept == "ruler"]
    live = int((desc.semantic.norm(dim=1) > 0).sum())
    print(f"{live} live components of {len(desc.concept)}; ruler finding(s): {ruler}")
    for vocabs in (["dermatology"], ["general"], ["product"], ["general", "dermatology"]):
        labels = labels_for(vocabs, desc, backbone, "scrambled")
        heads = [dataclasses.replace(h, classes=[dataclasses.replace(c, components=[
            dataclasses.replace(p, concept=labels[p.component]) for p in c.components])
            for c in h.classes]) for h in result.heads]
        shares = unlabelled_shares(dataclasses.replace(result, heads=heads))
        n = sum(is_unlabelled(label) for label in labels)
        print(f"{'+'.join(vocabs):<20} unlabelled {n:3d}/{live}; unlabelled share of the evidence: "
              + ", ".join(f"{h}/{c} {v:.2f}" for h, c, v in shares)
              + f"; ruler finding: {[labels[j] for j in ruler]}")
    aucs = artifact_label_aucs(args.demo, labels_for(["dermatology"], desc, backbone, "off"))
    good = [a for a in aucs if a[2] >= 0.8]
    print(f"dermatology, no floor: {len(aucs)} components labelled with an artifact, {len(good)} "
          "of them separate it (ROC AUC >= 0.8): "
          + ", ".join(f"#{j} {label} {auc:.2f}" for j, label, auc in good))


if __name__ == "__main__":
    main()
