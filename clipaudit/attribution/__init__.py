"""Stage 4: which components carry each class's evidence, and what removing them does.

``patching`` computes attributions (attribution patching, A = z x dy/dz) and per-class
relevance; ``ablation`` removes components (ablation effects, deletion curves);
``explain`` attributes single images; ``heatmaps`` shows where in an image a component's
activation comes from (``overlays`` draws it, ``localization`` scores it against a known
region, ``heatmap_files`` writes the audit's).
"""

from clipaudit.attribution.ablation import ablated_scores, ablation_effect, deletion_curves
from clipaudit.attribution.explain import Explanation, explain_image, explain_images
from clipaudit.attribution.heatmap_files import HeatmapConfig, add_heatmaps, load_heatmap_values
from clipaudit.attribution.heatmaps import (
    Heatmaps,
    NoSpatialTokensError,
    SpatialTokens,
    component_heatmaps,
    list_heatmap_methods,
    register_token_source,
)
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
    "HeatmapConfig",
    "Heatmaps",
    "NoSpatialTokensError",
    "Relevance",
    "SpatialTokens",
    "ablated_scores",
    "ablation_effect",
    "add_heatmaps",
    "attribute_cls",
    "attribute_images",
    "class_relevance",
    "component_heatmaps",
    "deletion_curves",
    "explain_image",
    "explain_images",
    "list_heatmap_methods",
    "load_heatmap_values",
    "register_token_source",
]
