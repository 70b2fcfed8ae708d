"""One image's prediction and the components that carry each class's evidence.

``explain_images`` is the ``clipaudit explain`` verb: it loads the SAE once, finds
the CLIP it was trained for (or takes the one given), loads the head and attributes
each image at the SAE's hook point. With ``ExplainConfig.heatmap`` it also writes a
PNG per image: the model's view of the image, then the heatmap of each of the
components that carry the most evidence for the predicted class
(``clipaudit.attribution.heatmaps``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipaudit.artifacts import atomic_path
from clipaudit.attribution.heatmaps import DEFAULT_METHOD, check_method, component_heatmaps
from clipaudit.attribution.overlays import model_view, render_panel
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
    heatmap: list[list[float]] | None = None
    """[rows][cols] where the activation comes from (predicted class, with ``--heatmap``)."""


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
    heatmap: str | None = None
    """The heatmap PNG written for this image (``ExplainConfig.heatmap``), else None."""


def explain_image(fpath: Path | str, sae: SAE, head: Head, backbone: Backbone, hook: HookPoint,
                  *, top: int = 5, gradient: str = "frozen",
                  heatmap: HeatmapRequest | None = None) -> Explanation:
    """Attributions of one image for every class (any hook point), top components first;
    with ``heatmap``, the predicted class's top components' heatmaps too."""
    tensor, view = model_view(backbone.preprocess, decode_image(fpath))
    image = tensor.unsqueeze(0).to(backbone.device)
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
    predicted = int(attr.scores[0].argmax())
    explanation = Explanation(str(fpath), head.class_names[predicted], classes)
    if heatmap is None:
        return explanation
    evidence = attr.values[:, predicted]
    positive = [int(i) for i in evidence.argsort(descending=True) if evidence[i] > 0]
    chosen = [(int(attr.components[i]), float(evidence[i])) for i in positive[:heatmap.components]]
    return _with_heatmap(explanation, predicted, chosen, image, view, sae, backbone, hook, heatmap)


@dataclass(frozen=True)
class HeatmapRequest:
    """Where and how ``explain_image`` draws heatmaps."""

    fpath: Path
    method: str = DEFAULT_METHOD
    components: int = 4
    px: int = 160


def _with_heatmap(explanation: Explanation, predicted: int, chosen: list[tuple[int, float]],
                  image: torch.Tensor, view: Any, sae: SAE, backbone: Backbone, hook: HookPoint,
                  request: HeatmapRequest) -> Explanation:
    """The maps of ``chosen`` (component, evidence) pairs, drawn into one PNG."""
    cls = explanation.classes[predicted]
    title = f"predicted {cls.class_name} (score {cls.score:.3f})"
    values: dict[int, list[list[float]]] = {}
    tiles = []
    if chosen:
        maps = component_heatmaps(image.repeat(len(chosen), 1, 1, 1), [j for j, _ in chosen],
                                  sae, backbone.model, hook, method=request.method)
        peaks = maps.peaks().tolist()
        for i, (j, evidence) in enumerate(chosen):
            tiles.append((f"component {j}\nevidence {evidence:+.3f}", maps.maps[i].numpy(), peaks[i]))
            values[j] = maps.maps[i].tolist()
        title += f"; heatmaps: {maps.method}"
    else:
        title += ": no component adds evidence"
    panel = render_panel(view, tiles, request.px, title)
    with atomic_path(request.fpath) as tmp:
        panel.save(tmp, format="PNG")
    top = [dataclasses.replace(e, heatmap=values.get(e.component)) for e in cls.top]
    classes = list(explanation.classes)
    classes[predicted] = dataclasses.replace(cls, top=top)
    return dataclasses.replace(explanation, classes=classes, heatmap=str(request.fpath))


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
    heatmap: Path | None = None
    """Write a PNG of the predicted class's top components' heatmaps here (several images:
    one file each, named <stem>-<n>-<image stem><suffix>)."""
    heatmap_method: str = DEFAULT_METHOD
    """How heatmaps are made: relevance, gradient, activation or occlusion."""
    heatmap_components: int = 4
    """Components drawn in the heatmap PNG (the predicted class's strongest positive ones)."""


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
    if config.heatmap is not None:
        check_method(config.heatmap_method)
        if Path(config.heatmap).suffix.lower() != ".png":
            raise InputError(f"{config.heatmap}: the heatmap is written as PNG; name a .png file")
        if config.heatmap_components < 1:
            raise InputError(f"heatmap components must be at least 1, got {config.heatmap_components}")
    labels = audit_concept_labels(config.audit, sae_fpath) if config.audit is not None else None
    explanations = [explain_image(f, sae, head, backbone, hook, top=config.top,
                                  gradient=config.gradient,
                                  heatmap=_request(config, i, f, len(images)))
                    for i, f in enumerate(images)]
    return explanations if labels is None else [with_concepts(e, labels) for e in explanations]


def _request(config: ExplainConfig, i: int, image: Path | str, n_images: int) -> HeatmapRequest | None:
    if config.heatmap is None:
        return None
    out = Path(config.heatmap)
    if n_images > 1:
        out = out.with_name(f"{out.stem}-{i}-{Path(image).stem}{out.suffix}")
    return HeatmapRequest(out, config.heatmap_method, config.heatmap_components)


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
