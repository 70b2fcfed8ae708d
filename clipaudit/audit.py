"""The audit: cache + SAE + heads -> attributions -> descriptions -> findings ->
rule verdicts -> audit folder (audit.json, Parquet tables, thumbnails, junit.xml,
summary.md, report.html, report.pdf).

It runs from the activation cache at the default hook point (last block, CLS),
where everything after extraction is cheap; the attribution library also works
from images at any hook point (``clipaudit.attribution.attribute_images``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from clipaudit._version import __version__
from clipaudit.ablation import ablated_scores, ablation_effect, deletion_curves
from clipaudit.artifacts import sha256_file, sha256_json
from clipaudit.attribution import Attributions, attribute_cls, class_relevance
from clipaudit.backbone import Backbone, BackboneSpec, load_backbone, load_backbone_for
from clipaudit.errors import InputError
from clipaudit.findings import make_finding, metadata_aucs, scatter_points, select_candidates
from clipaudit.heads import Head, LinearProbe, load_probe
from clipaudit.hooks import VisionTower
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.prompts import PromptSet, load_prompt_set, make_zero_shot_head
from clipaudit.results import (
    AuditResult,
    ClassAudit,
    ComponentInfo,
    FindingConfig,
    HeadAudit,
    InstanceInfo,
    save_audit,
)

log = logging.getLogger(__name__)

_INDEX_COLUMNS = {"id", "path", "label", "sha256", "status", "reason", "shard", "row", "caption"}


@dataclass(frozen=True)
class AuditConfig:
    """How to audit (thresholds come from the rule file, not from here)."""

    rules: str = "default"
    """Rule file: a shipped name (default, dermatology, strict) or a path."""
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
    mean embedding inherits it; a few hundred describe what the component means.
    Reports show the first ``thumbnails_per_finding`` of them."""
    faithfulness_instances: int = 256
    """Instances sampled for deletion curves."""
    faithfulness_steps: int = 16
    scatter_points: int = 300
    """Components per class shown in the relevance-vs-alignment scatter."""
    thumbnails_per_finding: int = 8
    batch_size: int = 4096
    seed: int = 0
    html: bool = True
    """Write report.html."""
    pdf: bool = True
    """Write report.pdf."""


@dataclass(frozen=True)
class AuditOutcome:
    result: AuditResult
    audit_dpath: Path
    files: dict[str, Path] = field(default_factory=dict)
    exit_code: int = 0


def run_audit(cache_dpath: Path | str, sae_fpath: Path | str, out_dpath: Path | str, *,
              probe: Path | str | LinearProbe | None = None,
              prompts: Path | str | PromptSet | None = None, config: AuditConfig = AuditConfig(),
              baseline_dpath: Path | str | None = None, backbone: Backbone | None = None,
              reporter: Reporter = NULL_REPORTER) -> AuditOutcome:
    """Audit a linear probe and/or a zero-shot prompt set on a cache with an SAE, and
    write the audit folder. Returns the result and the gate's exit code (0 or 1)."""
    from clipaudit.cache import open_cache
    from clipaudit.gate import evaluate, exit_code, load_ruleset
    from clipaudit.results import load_audit
    from clipaudit.sae import load_sae

    ruleset = load_ruleset(config.rules)  # fail fast on a bad rule file
    cache = open_cache(cache_dpath)
    hook = cache.provenance["hook"]
    backbone = backbone or load_backbone_for(cache.provenance["backbone"])
    tower = VisionTower(backbone.model)
    if hook["token"] != "cls" or hook["layer"] != tower.n_blocks - 1:
        raise InputError(f"{cache_dpath}: the audit runs at the default hook point (last block, cls); "
                         f"this cache is at layer {hook['layer']}, token {hook['token']}")
    sae = load_sae(sae_fpath, expect_backbone_id=backbone.id, expect_hook=hook, expect_d=cache.d)
    heads = make_heads(probe, prompts, backbone)
    baseline_dpath = baseline_dpath or ruleset.baseline
    baseline = load_audit(baseline_dpath) if baseline_dpath else None

    index = cache.ok_index.reset_index(drop=True)
    acts = cache.load_acts().float()
    ids = torch.tensor(index["id"].to_numpy(), dtype=torch.long)
    labels = [None if pd.isna(x) else str(x) for x in index["label"]] if "label" in index else [None] * len(ids)
    metadata = index[[c for c in index.columns if c not in _INDEX_COLUMNS]]

    codes = _encode_all(sae, acts, config.batch_size)
    ref_cache = cache
    if config.reference_cache is not None:
        ref_cache = open_cache(config.reference_cache)
        check_same_model(ref_cache, cache, config.reference_cache)
    descriptions = _describe(sae, ref_cache, backbone, heads, config, reporter,
                             codes=codes if ref_cache is cache else None)
    finding_config: FindingConfig = ruleset.finding_config()
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)

    head_audits, files = [], {}
    for head in heads:
        attr = attribute_cls(acts, ids, sae, head, tower, batch_size=config.batch_size, reporter=reporter)
        files[f"attributions-{head.name}"] = attr.to_parquet(
            out_dpath / f"attributions-{head.name}.parquet", provenance={"head": head.name})
        head_audits.append(_audit_head(head, attr, acts, labels, metadata, sae, tower, descriptions,
                                       finding_config, codes, config, reporter))

    components, instances = _components_and_instances(head_audits, descriptions, sae,
                                                      ref_cache.ok_index.reset_index(drop=True),
                                                      out_dpath, config)
    result = AuditResult(
        audit_id=_audit_id(cache, sae_fpath, heads),
        provenance=_provenance(cache, backbone, sae, sae_fpath, heads, config),
        sae_metrics={k: float(v) for k, v in (sae.meta.get("metrics") or {}).items()
                     if isinstance(v, (int, float)) and v is not None},
        heads=head_audits, components=components, instances=instances,
        rules_file=ruleset.name,
    )
    verdicts = evaluate(result, ruleset, baseline=baseline)
    result = dataclasses.replace(result, verdicts=verdicts)
    files |= write_outputs(result, out_dpath, html=config.html, pdf=config.pdf)
    return AuditOutcome(result, out_dpath, files, exit_code(verdicts))


def write_outputs(result: AuditResult, out_dpath: Path, *, html: bool, pdf: bool) -> dict[str, Path]:
    """audit.json, junit.xml, summary.md and the reports."""
    from clipaudit.artifacts import atomic_path
    from clipaudit.gate import render_summary_md, write_junit

    files = {"audit": save_audit(result, out_dpath)}
    files["junit"] = out_dpath / "junit.xml"
    write_junit(result, files["junit"])
    files["summary"] = out_dpath / "summary.md"
    with atomic_path(files["summary"]) as tmp:
        tmp.write_text(render_summary_md(result))
    if html or pdf:
        from clipaudit.report import write_report

        paths = write_report(out_dpath, html=html, pdf=pdf)
        files |= {k: v for k, v in (("html", paths.html), ("pdf", paths.pdf)) if v is not None}
    return files


def make_heads(probe: Path | str | LinearProbe | None, prompts: Path | str | PromptSet | None,
               backbone: Backbone) -> list[Head]:
    """The heads to audit: a probe (file or object) and/or a prompt set (file or object)."""
    heads: list[Head] = []
    if probe is not None:
        if not isinstance(probe, LinearProbe):
            probe = load_probe(probe, expect_backbone_id=backbone.id, expect_dim=backbone.embed_dim)
        heads.append(probe)
    if prompts is not None:
        if not isinstance(prompts, PromptSet):
            prompts = load_prompt_set(prompts)
        heads.append(make_zero_shot_head(prompts, backbone.encode_text))
    if not heads:
        raise InputError("nothing to audit: give a probe (--probe) and/or a prompt set (--prompts)")
    return heads


# ------------------------------------------------------------------ steps


@dataclass(frozen=True)
class _Codes:
    """Every instance's SAE codes, kept sparse ([n, k]); one component's column on demand."""

    indices: torch.Tensor
    values: torch.Tensor

    def column(self, component: int) -> torch.Tensor:
        return (self.values * (self.indices == component)).sum(1)


@torch.no_grad()
def _encode_all(sae, acts: torch.Tensor, batch_size: int) -> _Codes:
    parts = [sae.encode(acts[s:s + batch_size]) for s in range(0, len(acts), batch_size)]
    return _Codes(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]).float())


def _class_texts(heads: Sequence[Head]) -> dict[str, list[str]]:
    """Per class name, every name and prompt any head uses for it."""
    texts: dict[str, list[str]] = {}
    for head in heads:
        for name in head.class_names:
            texts.setdefault(name, [name])
            for prompt in getattr(head, "prompts", {}).get(name, []):
                if prompt not in texts[name]:
                    texts[name].append(prompt)
    return texts


def _describe(sae, ref_cache, backbone, heads, config: AuditConfig, reporter, codes: _Codes | None = None):
    """Top activating instances of the reference set and what they mean."""
    from clipaudit.concepts import load_vocabularies
    from clipaudit.describe import describe_components, encode_reference_images, top_activations

    index = ref_cache.ok_index.reset_index(drop=True)
    ids = torch.tensor(index["id"].to_numpy(), dtype=torch.long)
    if codes is None:  # another reference set: encode it (the audited data is encoded once)
        codes = _encode_all(sae, ref_cache.load_acts().float(), config.batch_size)
    step = config.batch_size
    batches = ((ids[s:s + step], _Codes(codes.indices[s:s + step], codes.values[s:s + step]))
               for s in range(0, len(ids), step))
    top = top_activations(batches, sae.n_latents, m=config.top_m)
    if config.reference is None:
        ref_backbone = backbone
        embeds = ref_cache.load_embeds().float()
        ref = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, embeds.shape[1])
        ref[ids] = embeds
    else:
        ref_backbone = load_backbone(config.reference)
        ref = encode_reference_images(ref_backbone, index, reporter=reporter)
    vocabulary = load_vocabularies(list(config.vocabularies))
    return describe_components(top, ref, ref_backbone.encode_text, vocabulary, _class_texts(heads),
                               templates=config.concept_templates)


def check_same_model(ref_cache, cache, ref_dpath) -> None:
    """The reference cache must come from the audited CLIP at the audited hook point."""
    from clipaudit.artifacts import require_match

    require_match("backbone", cache.provenance["backbone"]["id"],
                  ref_cache.provenance["backbone"]["id"], ref_dpath)
    require_match("hook point", cache.provenance["hook"], ref_cache.provenance["hook"], ref_dpath)


def _audit_head(head: Head, attr: Attributions, acts, labels, metadata: pd.DataFrame, sae, tower,
                descriptions, finding_config: FindingConfig, codes: _Codes, config: AuditConfig,
                reporter: Reporter) -> HeadAudit:
    rel = class_relevance(attr, labels)
    col = [descriptions.class_names.index(c) for c in head.class_names]
    alignment = descriptions.class_alignment[:, col]
    candidates = select_candidates(rel.share, alignment, descriptions.clarity, descriptions.concept,
                                   descriptions.concept_score, head.class_names, finding_config)
    clean = ablated_scores(acts, sae, head, tower, [])
    findings, rank = [], {}
    with reporter.task(f"findings ({head.name})", total=len(candidates)) as task:
        for cand in candidates:
            rank[cand.class_name] = rank.get(cand.class_name, 0) + 1
            top = descriptions.top.instances(cand.component)[: config.thumbnails_per_finding]
            aucs = metadata_aucs(codes.column(cand.component).numpy(), metadata)
            effect = ablation_effect(acts, sae, head, tower, cand.component, cand.class_name, labels,
                                     metadata, clean_scores=clean, codes=codes)
            findings.append(make_finding(head.name, cand, rank[cand.class_name], top, aucs, effect))
            task.advance()
    truth = torch.tensor([head.class_names.index(x) if x in head.class_names else -1 for x in labels])
    pred = attr.predictions
    known = truth >= 0
    accuracy = float((pred[known] == truth[known]).float().mean()) if known.any() else None
    classes = []
    for c, name in enumerate(head.class_names):
        of_class = [f for f in findings if f.class_name == name]
        mask = truth == c if rel.by == "label" else pred == c
        acc = float((pred[mask] == c).float().mean()) if rel.by == "label" and mask.any() else None
        classes.append(ClassAudit(
            class_name=name, n_instances=int(rel.n_instances[c]), accuracy=acc,
            spurious_share=float(sum(f.share for f in of_class)),
            unexplained_share=float(rel.unexplained_share[c]),
            components=scatter_points(rel.share[:, c], alignment[:, c], descriptions.clarity,
                                      descriptions.concept, config.scatter_points,
                                      [f.component for f in of_class])))
    target = torch.where(known, truth, pred)
    sample = torch.randperm(len(acts), generator=torch.Generator().manual_seed(config.seed))
    sample = sample[: config.faithfulness_instances]
    curves = deletion_curves(acts[sample], sae, head, tower, target[sample],
                             steps=config.faithfulness_steps, seed=config.seed)
    return HeadAudit(name=head.name, kind=head.kind, class_names=list(head.class_names),
                     accuracy=accuracy, classes=classes, findings=findings, faithfulness=curves)


def _components_and_instances(head_audits, descriptions, sae, index: pd.DataFrame, out_dpath: Path,
                              config: AuditConfig) -> tuple[list[ComponentInfo], list[InstanceInfo]]:
    from clipaudit.describe import write_thumbnails

    wanted = sorted({f.component for h in head_audits for f in h.findings})
    components = []
    directions = sae.W_dec.detach().float()
    for j in wanted:
        direction = directions[:, j] / directions[:, j].norm().clamp_min(1e-12)
        components.append(ComponentInfo(
            component=j, concept=descriptions.concept[j],
            concept_score=float(descriptions.concept_score[j]),
            clarity=float(descriptions.clarity[j]),
            top_instances=descriptions.top.instances(j)[: config.thumbnails_per_finding],
            direction=[round(float(x), 6) for x in direction]))
    instance_ids = sorted({i for c in components for i in c.top_instances})
    items = index[index["id"].isin(instance_ids)]
    thumbs = write_thumbnails(instance_ids, items, out_dpath / "thumbnails")
    by_id = items.set_index("id")
    instances = [
        InstanceInfo(id=int(i), path=str(by_id.at[i, "path"]),
                     label=None if "label" not in by_id or pd.isna(by_id.at[i, "label"])
                     else str(by_id.at[i, "label"]),
                     thumbnail=thumbs.get(int(i)))
        for i in instance_ids if i in by_id.index
    ]
    return components, instances


def _head_provenance(head: Head) -> dict[str, Any]:
    if isinstance(head, LinearProbe):
        return {"name": head.name, "kind": head.kind, "sha256": head.meta.get("sha256"),
                "normalisation": head.normalisation, "metrics": head.meta.get("metrics")}
    return {"name": head.name, "kind": head.kind, **head.meta}


def _provenance(cache, backbone: Backbone, sae, sae_fpath, heads, config: AuditConfig) -> dict[str, Any]:
    return {
        "clipaudit_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone.provenance,
        "hook": cache.provenance["hook"],
        "data_sha256": cache.provenance.get("data_sha256"),
        "cache": str(cache.dpath),
        "sae": {"path": str(sae_fpath), "sha256": sha256_file(sae_fpath),
                "backbone_id": (sae.meta.get("backbone") or {}).get("id"),
                "n_latents": sae.n_latents, "k": sae.k, "seed": sae.meta.get("seed")},
        "heads": [_head_provenance(h) for h in heads],
        "reference": dataclasses.asdict(config.reference) if config.reference else "audited model",
        "reference_set": str(config.reference_cache) if config.reference_cache else "audited data",
        "vocabularies": list(config.vocabularies),
        "top_m": config.top_m,
        "rules": str(config.rules),
        "seed": config.seed,
    }


def _audit_id(cache, sae_fpath, heads) -> str:
    key = sha256_json({"data": cache.provenance.get("data_sha256"), "sae": sha256_file(sae_fpath),
                       "heads": [h.name for h in heads],
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    return key[:12]

