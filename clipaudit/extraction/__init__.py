"""Stage 1: images -> activation cache.

``data`` reads image folders and manifests and decodes images robustly; ``backbone``
loads a CLIP; ``hooks`` splits its image tower at the hook point; ``cache`` runs the
tower over the images and writes the sharded, resumable cache that ``cache_reader``
opens; ``sources`` is the interface the SAE trainer reads activations through.
"""

from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone, load_backbone_for
from clipaudit.extraction.cache import ExtractConfig, ExtractResult, extract
from clipaudit.extraction.cache_reader import ActivationCache, open_cache
from clipaudit.extraction.data import ImageSource, load_image_source
from clipaudit.extraction.hooks import Capture, HookPoint, VisionTower
from clipaudit.extraction.sources import ActivationSource, InMemorySource

__all__ = [
    "ActivationCache",
    "ActivationSource",
    "Backbone",
    "BackboneSpec",
    "Capture",
    "ExtractConfig",
    "ExtractResult",
    "HookPoint",
    "ImageSource",
    "InMemorySource",
    "VisionTower",
    "extract",
    "load_backbone",
    "load_backbone_for",
    "load_image_source",
    "open_cache",
]
