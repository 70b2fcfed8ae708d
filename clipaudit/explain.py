"""One image's prediction and the components that carry each class's evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipaudit.attribution import attribute_images
from clipaudit.backbone import Backbone
from clipaudit.data import decode_image
from clipaudit.heads import Head
from clipaudit.hooks import HookPoint, VisionTower


@dataclass(frozen=True)
class ComponentEvidence:
    component: int
    activation: float
    attribution: float


@dataclass(frozen=True)
class ClassEvidence:
    class_name: str
    score: float
    error: float
    """Evidence the SAE does not reconstruct."""
    bias: float
    top: list[ComponentEvidence] = field(default_factory=list)


@dataclass(frozen=True)
class Explanation:
    image: str
    prediction: str
    classes: list[ClassEvidence]


def explain_image(fpath: Path | str, sae, head: Head, backbone: Backbone, hook: HookPoint,
                  *, top: int = 5) -> Explanation:
    """Attributions of one image for every class (any hook point), top components first."""
    image = backbone.preprocess(decode_image(fpath)).unsqueeze(0).to(backbone.device)
    attr = attribute_images(image, torch.tensor([0]), sae, head, VisionTower(backbone.model), hook)
    classes = []
    for c, name in enumerate(head.class_names):
        order = attr.values[:, c].abs().argsort(descending=True)[:top]
        classes.append(ClassEvidence(
            class_name=name, score=float(attr.scores[0, c]), error=float(attr.error[0, c]),
            bias=float(attr.bias[0, c]),
            top=[ComponentEvidence(int(attr.components[i]), float(attr.activations[i]),
                                   float(attr.values[i, c])) for i in order.tolist()]))
    return Explanation(str(fpath), head.class_names[int(attr.scores[0].argmax())], classes)
