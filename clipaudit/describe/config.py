"""How components are described (the describe stage's configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipaudit.extraction.backbone import BackboneSpec


@dataclass(frozen=True)
class DescribeConfig:
    """Which images, model and words say what each component means."""

    vocabularies: tuple[str, ...] = ("general",)
    """Concept vocabularies: built-in names or files (one concept per line, or YAML)."""
    concept_templates: tuple[str, ...] = ("{}",)
    """Templates each concept phrasing is put in before text encoding."""
    reference: BackboneSpec | None = None
    """Reference CLIP for component semantics (None: the audited CLIP)."""
    reference_cache: Path | None = None
    """Activation cache (same CLIP and hook point) whose images describe the components
    (None: the audited data). A broad set in which artifacts occur independently of the
    classes keeps a shortcut's top images from being mostly of the class it serves."""
    top_m: int = 400
    """Top activating instances per component that its semantic embedding and clarity
    are computed from (instances where it does not fire never count). Many, not a
    handful: a component's strongest few activations share incidental context (the
    lesion colour, skin tone or class that makes the artifact most salient), and their
    mean embedding inherits it; a few hundred describe what the component means."""
    label_floor: str = "scrambled"
    """``scrambled``: a component whose best term aligns with it no more than the
    vocabulary's phrases with shuffled letters do is labelled ``unlabelled (closest:
    TERM)`` and matches no rule-file concept; ``off``: always the nearest term (the
    paper's labels)."""
    reuse: Path | None = None
    """Descriptions of an earlier audit (its folder or descriptions.safetensors) to reuse
    instead of recomputing; refused unless made from the same SAE, reference model,
    reference set, vocabularies and top-m. Class alignments are recomputed."""
    text_cache: str = "auto"
    """Where text embeddings (vocabulary, class texts) are cached per reference model:
    auto ($XDG_CACHE_HOME/clipaudit/text-embeddings), off, or a folder."""
