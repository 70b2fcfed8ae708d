"""One image's prediction and the components that carry each class's evidence.

``explain_images`` is the ``clipaudit explain`` verb: it loads the SAE once, finds
the CLIP it was trained for (or takes the one given), loads the head and attributes
each image at the SAE's hook point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipaudit.attribution.patching import attribute_images
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import Backbone, BackboneSpec, load_backbone, load_backbone_for
from clipaudit.extraction.data import decode_image
from clipaudit.extraction.hooks import HookPoint, make_tower
from clipaudit.heads import Head, load_head
from clipaudit.sae.model import SAE


@dataclass(frozen=True)
class ComponentEvidence:
    component: int
    activation: float
    attribution: float
    concept: str | None = None
    """The concept label an audit gave the component (``--audit``); None without one."""


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


def explain_image(fpath: Path | str, sae: SAE, head: Head, backbone: Backbone, hook: HookPoint,
                  *, top: int = 5, gradient: str = "frozen") -> Explanation:
    """Attributions of one image for every class (any hook point), top components first."""
    image = backbone.preprocess(decode_image(fpath)).unsqueeze(0).to(backbone.device)
    attr = attribute_images(image, torch.tensor([0]), sae, head, make_tower(backbone.model), hook,
                            gradient=gradient)
    classes = []
    for c, name in enumerate(head.class_names):
        order = attr.values[:, c].abs().argsort(descending=True)[:top]
        classes.append(ClassEvidence(
            class_name=name, score=float(attr.scores[0, c]), error=float(attr.error[0, c]),
            bias=float(attr.bias[0, c]),
            top=[ComponentEvidence(int(attr.components[i]), float(attr.activations[i]),
                                   float(attr.values[i, c])) for i in order.tolist()]))
    return Explanation(str(fpath), head.class_names[int(attr.scores[0].argmax())], classes)


@dataclass(frozen=True)
class ExplainConfig:
    """How ``clipaudit explain`` attributes images."""

    top: int = 5
    """Components shown per class."""
    hook: HookPoint | None = None
    """Hook point; None: the one the SAE was trained at."""
    gradient: str = "frozen"
    """``frozen`` (attributions add up to the score) or ``exact`` (the paper's autograd)."""
    audit: Path | None = None
    """Audit folder of the same SAE whose concept labels name the components."""


def explain_images(images: Sequence[Path | str], sae_fpath: Path | str, *,
                   probe: Path | str | None = None, prompts: Path | str | None = None,
                   backbone: Backbone | BackboneSpec | None = None,
                   config: ExplainConfig = ExplainConfig()) -> list[Explanation]:
    """Explain each image's prediction by one head (the probe, else the prompt set).

    ``backbone``: the CLIP the SAE was trained for; None reads it from the SAE file,
    which foreign SAE formats do not record (then an InputError says how to name it).
    """
    from clipaudit.sae import check_sae_matches, import_sae

    if (probe is None) == (prompts is None):
        raise InputError("explain needs exactly one head: --probe FILE or --prompts FILE")
    sae = import_sae(sae_fpath)
    recorded = sae.meta.get("backbone")
    if isinstance(backbone, BackboneSpec):
        backbone = load_backbone(backbone)
    elif backbone is None:
        if not isinstance(recorded, dict) or not recorded.get("id"):
            raise InputError(f"{sae_fpath}: this SAE file does not record the CLIP it was trained "
                             "for; name it with --model NAME --pretrained TAG or --checkpoint FILE "
                             "--model-config CONFIG.json")
        backbone = load_backbone_for(recorded)
    hook = config.hook
    if hook is None:
        recorded_hook = sae.meta.get("hook")
        if not isinstance(recorded_hook, dict):
            raise InputError(f"{sae_fpath}: this SAE file does not record its hook point; "
                             "give it with --layer and --token")
        hook = HookPoint.from_dict(recorded_hook)
    tower = make_tower(backbone.model)
    width = tower.pooled_dim if hook.token == "pooled" else tower.width
    check_sae_matches(sae, sae_fpath, expect_backbone_id=backbone.id, expect_d=width)
    head = (load_head("linear-probe", probe, backbone) if probe is not None
            else load_head("zero-shot", prompts, backbone))  # type: ignore[arg-type]
    labels = audit_concept_labels(config.audit, sae_fpath) if config.audit is not None else None
    explanations = [explain_image(f, sae, head, backbone, hook, top=config.top,
                                  gradient=config.gradient) for f in images]
    return explanations if labels is None else [with_concepts(e, labels) for e in explanations]


def audit_concept_labels(audit_dpath: Path | str, sae_fpath: Path | str) -> dict[int, str]:
    """Component -> concept label, as the audit in ``audit_dpath`` described them.

    Read from the audit's ``descriptions.safetensors`` (every component); refused
    (MismatchError, naming both hashes) when the audit ran another SAE."""
    from clipaudit.artifacts import require_match, sha256_file
    from clipaudit.describe.components import load_descriptions
    from clipaudit.results import load_audit

    audit_dpath = Path(audit_dpath)
    result = load_audit(audit_dpath)  # ArtifactError when it is not an audit folder
    fpath = audit_dpath / "descriptions.safetensors"
    audited = (result.provenance.get("sae") or {}).get("sha256")
    require_match("SAE sha256", sha256_file(sae_fpath), audited, audit_dpath / "audit.json")
    if not fpath.is_file():  # an audit written before descriptions were saved: findings only
        return {c.component: c.concept for c in result.components}
    descriptions = load_descriptions(fpath)
    return {j: label for j, label in enumerate(descriptions.concept) if label}


def with_concepts(explanation: Explanation, labels: dict[int, str]) -> Explanation:
    """The explanation with each component's audit label filled in ("" when the audit had
    none: a component that never fired on its reference set)."""
    return dataclasses.replace(explanation, classes=[
        dataclasses.replace(cls, top=[dataclasses.replace(c, concept=labels.get(c.component, ""))
                                      for c in cls.top])
        for cls in explanation.classes])
