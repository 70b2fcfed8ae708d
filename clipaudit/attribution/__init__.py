"""Stage 4: which components carry each class's evidence, and what removing them does.

``patching`` computes attributions (attribution patching, A = z x dy/dz) and per-class
relevance; ``ablation`` removes components (ablation effects, deletion curves);
``explain`` attributes single images.
"""

from clipaudit.attribution.ablation import ablated_scores, ablation_effect, deletion_curves
from clipaudit.attribution.explain import Explanation, explain_image, explain_images
from clipaudit.attribution.patching import (
    GRADIENT_MODES,
    Attributions,
    Relevance,
    attribute_cls,
    attribute_images,
    class_relevance,
)

__all__ = [
    "GRADIENT_MODES",
    "Attributions",
    "Explanation",
    "Relevance",
    "ablated_scores",
    "ablation_effect",
    "attribute_cls",
    "attribute_images",
    "class_relevance",
    "deletion_curves",
    "explain_image",
    "explain_images",
]
