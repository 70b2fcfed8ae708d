"""Stage 1: images -> activation cache.

``data`` reads image folders and manifests and decodes images robustly; ``backbone``
loads a CLIP (``weights`` finds its files); ``hooks`` defines hook points and splits an
image tower at one (``towers`` holds the families beyond open_clip's ViT, ``readout``
the rest of a tower from its pooled vector); ``cache`` runs the
tower over the images and writes the sharded, resumable cache that ``cache_reader``
opens; ``sources`` is the interface the SAE trainer reads activations through.
"""

from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone, load_backbone_for
from clipaudit.extraction.cache import ExtractConfig, ExtractResult, extract
from clipaudit.extraction.cache_reader import ActivationCache, open_cache
from clipaudit.extraction.data import ImageSource, load_image_source
from clipaudit.extraction.hooks import (
    Capture,
    HookPoint,
    Tower,
    VisionTower,
    list_tower_families,
    make_tower,
)
from clipaudit.extraction.readout import PooledReadout
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
    "PooledReadout",
    "Tower",
    "VisionTower",
    "extract",
    "load_backbone",
    "load_backbone_for",
    "list_tower_families",
    "load_image_source",
    "make_tower",
    "open_cache",
]
