"""clipaudit: audit CLIP-based classifiers for shortcuts (Dreyer et al. 2025).

The pipeline, one package per stage (docs/architecture.md):

    extraction  images -> activation cache            (extract)
    sae         activation cache -> sparse autoencoder (train_sae_on_cache, load_sae)
    heads       the classifiers audited               (fit_probe_on_cache, load_head)
    attribution which components carry the evidence   (attribute_cls, explain_images)
    describe    what each component means             (describe_components)
    findings    which relied-on components are shortcuts
    gate        rule files -> verdicts, exit code      (apply_rules, load_ruleset)
    report      audit folder -> HTML and PDF           (write_report)
    audit.py    the orchestrator                       (run_audit)

Every verb of the CLI has its library function here. Names are imported on first
use, so ``import clipaudit`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipaudit._version import __version__

_EXPORTS: dict[str, str] = {
    # extraction
    "Backbone": "clipaudit.extraction.backbone",
    "BackboneSpec": "clipaudit.extraction.backbone",
    "load_backbone": "clipaudit.extraction.backbone",
    "Capture": "clipaudit.extraction.hooks",
    "HookPoint": "clipaudit.extraction.hooks",
    "Tower": "clipaudit.extraction.hooks",
    "VisionTower": "clipaudit.extraction.hooks",
    "make_tower": "clipaudit.extraction.hooks",
    "list_tower_families": "clipaudit.extraction.hooks",
    "cache_readout": "clipaudit.extraction.hooks",
    "ExtractConfig": "clipaudit.extraction.cache",
    "extract": "clipaudit.extraction.cache",
    "open_cache": "clipaudit.extraction.cache_reader",
    "load_image_source": "clipaudit.extraction.data",
    # sae
    "SAETrainConfig": "clipaudit.sae",
    "train_sae_on_cache": "clipaudit.sae",
    "load_sae": "clipaudit.sae",
    "sae_info": "clipaudit.sae",
    # heads
    "Head": "clipaudit.heads",
    "LinearProbe": "clipaudit.heads",
    "ProbeConfig": "clipaudit.heads",
    "ZeroShotHead": "clipaudit.heads",
    "fit_probe": "clipaudit.heads",
    "fit_probe_on_cache": "clipaudit.heads",
    "list_heads": "clipaudit.heads",
    "load_head": "clipaudit.heads",
    "load_probe": "clipaudit.heads",
    "load_prompt_set": "clipaudit.heads",
    "make_zero_shot_head": "clipaudit.heads",
    "register_head_type": "clipaudit.heads",
    "save_probe": "clipaudit.heads",
    # attribution
    "Attributions": "clipaudit.attribution",
    "attribute_cls": "clipaudit.attribution",
    "attribute_images": "clipaudit.attribution",
    "class_relevance": "clipaudit.attribution",
    "explain_images": "clipaudit.attribution",
    "component_heatmaps": "clipaudit.attribution",
    "list_heatmap_methods": "clipaudit.attribution",
    # describe
    "DescribeConfig": "clipaudit.describe.config",
    "describe_components": "clipaudit.describe",
    "list_vocabularies": "clipaudit.describe",
    # audit, gate, report
    "AuditConfig": "clipaudit.audit",
    "AuditOutcome": "clipaudit.audit",
    "StatisticsConfig": "clipaudit.findings.statistics",
    "run_audit": "clipaudit.audit",
    "AuditResult": "clipaudit.results",
    "load_audit": "clipaudit.results",
    "apply_rules": "clipaudit.gate",
    "load_ruleset": "clipaudit.gate",
    "write_report": "clipaudit.report",
    # demo and the synthetic world
    "DemoConfig": "clipaudit.demo",
    "run_demo": "clipaudit.demo",
    "make_planted_dataset": "clipaudit.synthetic",
    "train_tiny_clip": "clipaudit.synthetic",
    # errors
    "ClipAuditError": "clipaudit.errors",
    "InputError": "clipaudit.errors",
    "ArtifactError": "clipaudit.errors",
    "MismatchError": "clipaudit.errors",
    "ModelUnavailableError": "clipaudit.errors",
    "RuleFileError": "clipaudit.errors",
}

__all__ = [
    "__version__",
    "Backbone",
    "BackboneSpec",
    "load_backbone",
    "Capture",
    "HookPoint",
    "Tower",
    "VisionTower",
    "make_tower",
    "list_tower_families",
    "cache_readout",
    "ExtractConfig",
    "extract",
    "open_cache",
    "load_image_source",
    "SAETrainConfig",
    "train_sae_on_cache",
    "load_sae",
    "sae_info",
    "Head",
    "LinearProbe",
    "ProbeConfig",
    "ZeroShotHead",
    "fit_probe",
    "fit_probe_on_cache",
    "list_heads",
    "load_head",
    "load_probe",
    "load_prompt_set",
    "make_zero_shot_head",
    "register_head_type",
    "save_probe",
    "Attributions",
    "attribute_cls",
    "attribute_images",
    "class_relevance",
    "explain_images",
    "component_heatmaps",
    "list_heatmap_methods",
    "DescribeConfig",
    "describe_components",
    "list_vocabularies",
    "AuditConfig",
    "AuditOutcome",
    "StatisticsConfig",
    "run_audit",
    "AuditResult",
    "load_audit",
    "apply_rules",
    "load_ruleset",
    "write_report",
    "DemoConfig",
    "run_demo",
    "make_planted_dataset",
    "train_tiny_clip",
    "ClipAuditError",
    "InputError",
    "ArtifactError",
    "MismatchError",
    "ModelUnavailableError",
    "RuleFileError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from clipaudit.attribution import (
        Attributions,
        attribute_cls,
        attribute_images,
        class_relevance,
        component_heatmaps,
        explain_images,
        list_heatmap_methods,
    )
    from clipaudit.audit import AuditConfig, AuditOutcome, run_audit
    from clipaudit.demo import DemoConfig, run_demo
    from clipaudit.describe import describe_components, list_vocabularies
    from clipaudit.describe.config import DescribeConfig
    from clipaudit.errors import (
        ArtifactError,
        ClipAuditError,
        InputError,
        MismatchError,
        ModelUnavailableError,
        RuleFileError,
    )
    from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone
    from clipaudit.extraction.cache import ExtractConfig, extract
    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.extraction.data import load_image_source
    from clipaudit.extraction.hooks import (
        Capture,
        HookPoint,
        Tower,
        VisionTower,
        cache_readout,
        list_tower_families,
        make_tower,
    )
    from clipaudit.gate import apply_rules, load_ruleset
    from clipaudit.heads import (
        Head,
        LinearProbe,
        ProbeConfig,
        ZeroShotHead,
        fit_probe,
        fit_probe_on_cache,
        list_heads,
        load_head,
        load_probe,
        load_prompt_set,
        make_zero_shot_head,
        register_head_type,
        save_probe,
    )
    from clipaudit.report import write_report
    from clipaudit.results import AuditResult, load_audit
    from clipaudit.sae import SAETrainConfig, load_sae, sae_info, train_sae_on_cache
    from clipaudit.synthetic import make_planted_dataset, train_tiny_clip
