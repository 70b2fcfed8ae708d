"""clipaudit: audit CLIP-based classifiers for shortcuts (Dreyer et al. 2025).

The public API is re-exported here; everything else is internal.
"""

from clipaudit._version import __version__
from clipaudit.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.errors import (
    ArtifactError,
    ClipAuditError,
    InputError,
    MismatchError,
    ModelUnavailableError,
    RuleFileError,
)
from clipaudit.hooks import Capture, HookPoint, VisionTower

__all__ = [
    "__version__",
    "ArtifactError",
    "Backbone",
    "BackboneSpec",
    "Capture",
    "ClipAuditError",
    "HookPoint",
    "InputError",
    "MismatchError",
    "ModelUnavailableError",
    "RuleFileError",
    "VisionTower",
    "load_backbone",
]
