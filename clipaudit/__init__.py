"""clipaudit: audit CLIP-based classifiers for shortcuts (Dreyer et al. 2025).

The public API is re-exported here; everything else is internal.
"""

from clipaudit._version import __version__
from clipaudit.attribution import Attributions, attribute_cls, attribute_images, class_relevance
from clipaudit.audit import AuditConfig, AuditOutcome, run_audit
from clipaudit.backbone import Backbone, BackboneSpec, load_backbone
from clipaudit.cache import ExtractConfig, extract, open_cache
from clipaudit.data import load_image_source
from clipaudit.errors import (
    ArtifactError,
    ClipAuditError,
    InputError,
    MismatchError,
    ModelUnavailableError,
    RuleFileError,
)
from clipaudit.heads import LinearProbe, ProbeConfig, ZeroShotHead, fit_probe, load_probe, save_probe
from clipaudit.hooks import Capture, HookPoint, VisionTower
from clipaudit.prompts import load_prompt_set, make_zero_shot_head
from clipaudit.results import AuditResult, load_audit

__all__ = [
    "__version__",
    "AuditConfig",
    "AuditOutcome",
    "AuditResult",
    "Attributions",
    "ExtractConfig",
    "LinearProbe",
    "ProbeConfig",
    "ZeroShotHead",
    "attribute_cls",
    "attribute_images",
    "class_relevance",
    "extract",
    "fit_probe",
    "load_audit",
    "load_image_source",
    "load_probe",
    "load_prompt_set",
    "make_zero_shot_head",
    "open_cache",
    "run_audit",
    "save_probe",
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
