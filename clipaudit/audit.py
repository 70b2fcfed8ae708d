"""The audit, the one orchestrator of the pipeline's later stages:

    cache + SAE + heads -> attributions (attribution) -> descriptions (describe)
    -> findings (findings) -> rule verdicts (gate) -> audit folder (report)

The audit folder holds audit.json, the per-instance Parquet tables, the component
descriptions (``descriptions.safetensors``, reusable by a later audit), thumbnails,
junit.xml, summary.md, report.html and report.pdf.

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
from clipaudit.artifacts import sha256_file, sha256_json
from clipaudit.attribution.ablation import ablated_scores, ablation_effect, deletion_curves
from clipaudit.attribution.patching import Attributions, attribute_cls, class_relevance
from clipaudit.describe.components import ComponentDescriptions
from clipaudit.describe.config import DescribeConfig
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import Backbone, load_backbone_for
from clipaudit.extraction.cache_reader import ActivationCache
from clipaudit.extraction.hooks import VisionTower
from clipaudit.findings import make_finding, metadata_aucs, scatter_points, select_candidates
from clipaudit.findings.audit_concepts import AuditConcepts, audit_concepts
from clipaudit.heads import Head, LinearProbe, PromptSet, load_head, make_zero_shot_head
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.report.model import ReportConfig
from clipaudit.results import (
    AuditResult,
    ClassAudit,
    ComponentInfo,
    FindingConfig,
    HeadAudit,
    InstanceInfo,
    save_audit,
)
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)

_INDEX_COLUMNS = {"id", "path", "label", "sha256", "status", "reason", "shard", "row", "caption"}
DESCRIPTIONS_FNAME = "descriptions.safetensors"


@dataclass(frozen=True)
class FaithfulnessConfig:
    """Deletion curves: how faithful each component ranking is on this model."""

    instances: int = 256
    """Instances sampled for deletion curves."""
    steps: int = 16
    """Components removed per instance, one at a time."""


@dataclass(frozen=True)
class OutputConfig:
    """Which files the audit folder gets, and how much of the audit its reports show."""

    html: bool = True
    """Write report.html."""
    pdf: bool = True
    """Write report.pdf."""
    thumbnails_per_finding: int = 8
    """Top images kept per finding in audit.json (and as thumbnails)."""
    scatter_points: int = 300
    """Components per class kept for the relevance-vs-alignment scatter."""
    report: ReportConfig = ReportConfig()
    """What the reports show of the audit."""


@dataclass(frozen=True)
class AuditConfig:
    """How to audit (thresholds come from the rule file, not from here)."""

    rules: str = "default"
    """Rule file: a shipped name (default, dermatology, strict) or a path."""
    describe: DescribeConfig = DescribeConfig()
    """How components are described (vocabulary, reference model and set, top-m)."""
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()
    outputs: OutputConfig = OutputConfig()
    batch_size: int = 4096
    """Instances per batch when encoding and attributing from the cache."""
    seed: int = 0
    """Seeds the sampling of the faithfulness instances."""
    column_roles: tuple[str, ...] = ()
    """Metadata column roles, ``COLUMN=ROLE`` (artifact, protected or ignore), over the rule
    file's and the data set's (``clipaudit.columns``)."""


@dataclass(frozen=True)
class AuditOutcome:
    result: AuditResult
    audit_dpath: Path
    files: dict[str, Path] = field(default_factory=dict)
    exit_code: int = 0


@dataclass(frozen=True)
class _Data:
    """The audited instances: cached activations, ids, labels, metadata and SAE codes."""

    acts: torch.Tensor
    """[n, d] float32 activations at the hook point."""
    embeds: torch.Tensor
    """[n, D] float32 image embeddings (what heads read)."""
    ids: torch.Tensor
    """[n] instance ids."""
    labels: list[str | None]
    metadata: pd.DataFrame
    """The index's metadata columns, one row per instance."""
    codes: _Codes


@dataclass(frozen=True)
class _Stage:
    """What every head's audit shares."""

    sae: SAE
    tower: VisionTower
    descriptions: ComponentDescriptions
    finding_config: FindingConfig
    config: AuditConfig
    reporter: Reporter
    concepts: AuditConcepts


def run_audit(cache_dpath: Path | str, sae_fpath: Path | str, out_dpath: Path | str, *,
              probe: Path | str | LinearProbe | None = None,
              prompts: Path | str | PromptSet | None = None,
              heads: Sequence[Head] = (), config: AuditConfig = AuditConfig(),
              baseline_dpath: Path | str | None = None, backbone: Backbone | None = None,
              reporter: Reporter = NULL_REPORTER) -> AuditOutcome:
    """Audit heads (a probe, a prompt set, and/or ready ``heads``) on a cache with an SAE,
    and write the audit folder. Returns the result and the gate's exit code (0 or 1)."""
    from clipaudit.columns import parse_role_overrides
    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.gate import evaluate, exit_code, load_ruleset
    from clipaudit.results import load_audit
    from clipaudit.sae import load_sae

    # fail fast on a bad rule file or role
    ruleset = load_ruleset(config.rules).with_column_roles(parse_role_overrides(config.column_roles))
    cache = open_cache(cache_dpath)
    hook = cache.provenance["hook"]
    backbone = backbone or load_backbone_for(cache.provenance["backbone"])
    tower = VisionTower(backbone.model)
    if hook["token"] != "cls" or hook["layer"] != tower.n_blocks - 1:
        raise InputError(f"{cache_dpath}: the audit runs at the default hook point (last block, cls); "
                         f"this cache is at layer {hook['layer']}, token {hook['token']}")
    sae = load_sae(sae_fpath, expect_backbone_id=backbone.id, expect_hook=hook, expect_d=cache.d)
    audited = make_heads(probe, prompts, backbone, heads)
    baseline_dpath = baseline_dpath or ruleset.baseline
    baseline = load_audit(baseline_dpath) if baseline_dpath else None

    data = _load_data(cache, sae, config.batch_size)
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    described = describe_for_audit(cache, data.codes, sae, sae_fpath, backbone, audited,
                                   config.describe, config.batch_size, reporter)
    descriptions, ref_cache = described.descriptions, described.cache
    files = {"descriptions": save_descriptions_for_audit(descriptions, out_dpath)}
    concepts = audit_concepts(cache, data, described, sae, ruleset, reporter)
    stage = _Stage(sae, tower, descriptions, ruleset.finding_config(), config, reporter, concepts)
    head_audits = []
    for head in audited:
        attr = attribute_cls(data.acts, data.ids, sae, head, tower, batch_size=config.batch_size,
                             reporter=reporter)
        files[f"attributions-{head.name}"] = attr.to_parquet(
            out_dpath / f"attributions-{head.name}.parquet", provenance={"head": head.name})
        head_audits.append(_audit_head(head, attr, data, stage))

    components, instances = _components_and_instances(head_audits, descriptions, sae,
                                                      ref_cache.ok_index.reset_index(drop=True),
                                                      out_dpath, config.outputs)
    result = AuditResult(
        audit_id=_audit_id(cache, sae_fpath, audited),
        provenance=_provenance(cache, backbone, sae, sae_fpath, audited, config),
        sae_metrics={k: float(v) for k, v in (sae.meta.get("metrics") or {}).items()
                     if isinstance(v, (int, float)) and v is not None},
        heads=head_audits, components=components, instances=instances,
        rules_file=ruleset.name, columns=concepts.columns, coverage=concepts.coverage,
        calibration=list(descriptions.calibration.classes) if descriptions.calibration else [],
    )
    verdicts = evaluate(result, ruleset, baseline=baseline)
    result = dataclasses.replace(result, verdicts=verdicts)
    files |= write_outputs(result, out_dpath, config.outputs)
    return AuditOutcome(result, out_dpath, files, exit_code(verdicts))


def write_outputs(result: AuditResult, out_dpath: Path,
                  outputs: OutputConfig = OutputConfig()) -> dict[str, Path]:
    """audit.json, junit.xml, summary.md and the reports."""
    from clipaudit.artifacts import atomic_path
    from clipaudit.gate import render_summary_md, write_junit

    files = {"audit": save_audit(result, out_dpath)}
    files["junit"] = out_dpath / "junit.xml"
    write_junit(result, files["junit"])
    files["summary"] = out_dpath / "summary.md"
    with atomic_path(files["summary"]) as tmp:
        tmp.write_text(render_summary_md(result))
    if outputs.html or outputs.pdf:
        from clipaudit.report import write_report

        paths = write_report(out_dpath, html=outputs.html, pdf=outputs.pdf, config=outputs.report)
        files |= {k: v for k, v in (("html", paths.html), ("pdf", paths.pdf)) if v is not None}
    return files


def make_heads(probe: Path | str | LinearProbe | None, prompts: Path | str | PromptSet | None,
               backbone: Backbone, heads: Sequence[Head] = ()) -> list[Head]:
    """The heads to audit: a probe (file or object), a prompt set (file or object) and
    any ready heads, loaded through the head registry."""
    out: list[Head] = []
    if probe is not None:
        out.append(probe if isinstance(probe, LinearProbe) else load_head("linear-probe", probe, backbone))
    if prompts is not None:
        out.append(make_zero_shot_head(prompts, backbone.encode_text) if isinstance(prompts, PromptSet)
                   else load_head("zero-shot", prompts, backbone))
    out.extend(heads)
    if not out:
        raise InputError("nothing to audit: give a probe (--probe) and/or a prompt set (--prompts)")
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        raise InputError(f"two heads share a name ({', '.join(names)}); name each head differently")
    return out


# ------------------------------------------------------------------ steps


@dataclass(frozen=True)
class _Codes:
    """Every instance's SAE codes, kept sparse ([n, k]); one component's column on demand."""

    indices: torch.Tensor
    values: torch.Tensor

    def column(self, component: int) -> torch.Tensor:
        return (self.values * (self.indices == component)).sum(1)

    def rows(self, start: int, stop: int) -> _Codes:
        return _Codes(self.indices[start:stop], self.values[start:stop])


@torch.no_grad()
def _encode_all(sae: SAE, acts: torch.Tensor, batch_size: int) -> _Codes:
    parts = [sae.encode(acts[s:s + batch_size]) for s in range(0, len(acts), batch_size)]
    if not parts:
        return _Codes(torch.zeros(0, sae.k, dtype=torch.long), torch.zeros(0, sae.k))
    return _Codes(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]).float())


def _load_data(cache: ActivationCache, sae: SAE, batch_size: int) -> _Data:
    index = cache.ok_index.reset_index(drop=True)
    acts = cache.load_acts().float()
    ids = torch.tensor(index["id"].to_numpy(), dtype=torch.long)
    labels = ([None if pd.isna(x) else str(x) for x in index["label"]] if "label" in index
              else [None] * len(ids))
    metadata = index[[c for c in index.columns if c not in _INDEX_COLUMNS]].reset_index(drop=True)
    return _Data(acts, cache.load_embeds().float(), ids, labels, metadata,
                 _encode_all(sae, acts, batch_size))


def class_texts(heads: Sequence[Head]) -> dict[str, list[str]]:
    """Per class name, every text any head uses for it (names first, then prompts)."""
    texts: dict[str, list[str]] = {}
    for head in heads:
        for name, phrases in head.class_texts().items():
            known = texts.setdefault(name, [])
            known.extend(p for p in phrases if p not in known)
    return texts


@dataclass(frozen=True)
class Described:
    """Component descriptions and the reference set they were computed on."""

    descriptions: ComponentDescriptions
    cache: ActivationCache
    codes: _Codes
    """The reference set's SAE codes, rows in index order."""
    semantic_embeds: torch.Tensor
    """Image embeddings of the reference set by instance id, from the reference model (or,
    for reused descriptions of another reference model, from the audited CLIP)."""
    text_encoder: Any
    """The text encoder of the model ``semantic_embeds`` come from."""


def describe_for_audit(cache: ActivationCache, codes: _Codes, sae: SAE, sae_fpath: Path | str,
                       backbone: Backbone, heads: Sequence[Head], config: DescribeConfig,
                       batch_size: int, reporter: Reporter) -> Described:
    """What each component means, on the reference set (default: the audited data).

    Reuses ``config.reuse`` (an earlier audit's descriptions) when it was computed from
    the same SAE, reference model, reference set, vocabulary and top-m; only the class
    alignment (raw and calibrated) is then recomputed for these heads' classes.
    """
    from clipaudit.describe.components import (
        describe_components,
        encode_reference_images,
        realign_classes,
        top_activations,
    )
    from clipaudit.describe.concepts import load_vocabularies
    from clipaudit.extraction.backbone import load_backbone
    from clipaudit.extraction.cache_reader import open_cache

    ref_cache = cache
    if config.reference_cache is not None:
        ref_cache = open_cache(config.reference_cache)
        check_same_model(ref_cache, cache, config.reference_cache)
    ref_backbone = backbone if config.reference is None else load_backbone(config.reference)
    key = _descriptions_key(sae_fpath, ref_cache, ref_backbone, config)
    index = ref_cache.ok_index.reset_index(drop=True)
    ids = torch.tensor(index["id"].to_numpy(), dtype=torch.long)
    if ref_cache is not cache:  # another reference set: encode it (the audited data is encoded once)
        codes = _encode_all(sae, ref_cache.load_acts().float(), batch_size)
    labels = _labels_by_id(index, ids)
    if config.reuse is not None:
        reused = _reuse_descriptions(config.reuse, key)
        audited_ref = _by_id(ref_cache.load_embeds().float(), ids)
        ref = audited_ref if config.reference is None else None  # no re-encoding on reuse
        realigned = realign_classes(reused, ref_backbone.encode_text, class_texts(heads), ref, labels)
        if ref is None:  # text-defined concepts: read by the audited CLIP instead
            return Described(realigned, ref_cache, codes, audited_ref, backbone.encode_text)
        return Described(realigned, ref_cache, codes, ref, ref_backbone.encode_text)

    batches = ((ids[s:s + batch_size], codes.rows(s, s + batch_size))
               for s in range(0, len(ids), batch_size))
    top = top_activations(batches, sae.n_latents, m=config.top_m)
    if config.reference is None:
        ref = _by_id(ref_cache.load_embeds().float(), ids)
    else:
        ref = encode_reference_images(ref_backbone, index, reporter=reporter)
    vocabulary = load_vocabularies(list(config.vocabularies))
    descriptions = describe_components(top, ref, ref_backbone.encode_text, vocabulary,
                                       class_texts(heads), templates=config.concept_templates,
                                       provenance=key, reference_labels=labels)
    return Described(descriptions, ref_cache, codes, ref, ref_backbone.encode_text)


def _by_id(embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows in index order -> rows indexed by instance id (zero rows for missing ids)."""
    out = torch.zeros(int(ids.max()) + 1 if len(ids) else 0, embeds.shape[1])
    out[ids] = embeds
    return out


def _labels_by_id(index: pd.DataFrame, ids: torch.Tensor) -> list[str | None]:
    labels: list[str | None] = [None] * (int(ids.max()) + 1 if len(ids) else 0)
    if "label" in index:
        for i, label in zip(ids.tolist(), index["label"].tolist()):
            labels[i] = None if pd.isna(label) else str(label)
    return labels


def _descriptions_key(sae_fpath: Path | str, ref_cache: ActivationCache, ref_backbone: Backbone,
                      config: DescribeConfig) -> dict[str, Any]:
    """Everything descriptions depend on (the heads' classes aside)."""
    return {"sae_sha256": sha256_file(sae_fpath), "reference_model": ref_backbone.id,
            "reference_set": ref_cache.provenance.get("data_sha256"),
            "vocabularies": list(config.vocabularies), "templates": list(config.concept_templates),
            "top_m": config.top_m}


def _reuse_descriptions(path: Path, key: dict[str, Any]) -> ComponentDescriptions:
    from clipaudit.artifacts import require_match
    from clipaudit.describe.components import load_descriptions

    fpath = path / DESCRIPTIONS_FNAME if path.is_dir() else path
    descriptions = load_descriptions(fpath)
    for name, want in key.items():
        require_match(name.replace("_", " "), want, descriptions.provenance.get(name), fpath)
    log.info("reusing component descriptions from %s", fpath)
    return descriptions


def save_descriptions_for_audit(descriptions: ComponentDescriptions, out_dpath: Path) -> Path:
    from clipaudit.describe.components import save_descriptions

    return save_descriptions(out_dpath / DESCRIPTIONS_FNAME, descriptions)


def check_same_model(ref_cache: ActivationCache, cache: ActivationCache, ref_dpath: Path | str) -> None:
    """The reference cache must come from the audited CLIP at the audited hook point."""
    from clipaudit.artifacts import require_match

    require_match("backbone", cache.provenance["backbone"]["id"],
                  ref_cache.provenance["backbone"]["id"], ref_dpath)
    require_match("hook point", cache.provenance["hook"], ref_cache.provenance["hook"], ref_dpath)


def _audit_head(head: Head, attr: Attributions, data: _Data, stage: _Stage) -> HeadAudit:
    rel = class_relevance(attr, data.labels)
    descriptions = stage.descriptions
    columns = [descriptions.class_names.index(c) for c in head.class_names]
    alignment = descriptions.class_alignment[:, columns]
    reliance = stage.concepts.reliance_of(head)
    candidates = select_candidates(rel.share, alignment, descriptions.clarity, descriptions.concept,
                                   descriptions.concept_score, head.class_names, stage.finding_config,
                                   calibrated_jc=descriptions.calibrated_alignment[:, columns],
                                   forbidden_reliance=stage.concepts.forbidden_reliance(
                                       head, reliance, descriptions.concept))
    findings = _findings(head, candidates, data, stage)
    truth = torch.tensor([head.class_names.index(x) if x in head.class_names else -1
                          for x in data.labels], dtype=torch.long)
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
                                      descriptions.concept, stage.config.outputs.scatter_points,
                                      [f.component for f in of_class])))
    curves = _faithfulness(head, data, torch.where(known, truth, pred), stage)
    return HeadAudit(name=head.name, kind=head.kind, class_names=list(head.class_names),
                     accuracy=accuracy, classes=classes, findings=findings, faithfulness=curves,
                     concept_reliance=reliance)


def _findings(head: Head, candidates: Sequence[Any], data: _Data, stage: _Stage) -> list[Any]:
    """Each candidate with its evidence: top images, metadata AUCs, ablation effect."""
    clean = ablated_scores(data.acts, stage.sae, head, stage.tower, [])
    findings, rank = [], {}
    with stage.reporter.task(f"findings ({head.name})", total=len(candidates)) as task:
        for cand in candidates:
            rank[cand.class_name] = rank.get(cand.class_name, 0) + 1
            top = stage.descriptions.top.instances(cand.component)
            aucs = metadata_aucs(data.codes.column(cand.component).numpy(), data.metadata)
            effect = ablation_effect(data.acts, stage.sae, head, stage.tower, cand.component,
                                     cand.class_name, data.labels, data.metadata,
                                     clean_scores=clean, codes=data.codes)
            findings.append(make_finding(head.name, cand, rank[cand.class_name],
                                         top[: stage.config.outputs.thumbnails_per_finding], aucs, effect))
            task.advance()
    return findings


def _faithfulness(head: Head, data: _Data, target: torch.Tensor, stage: _Stage) -> list[Any]:
    config = stage.config
    sample = torch.randperm(len(data.acts), generator=torch.Generator().manual_seed(config.seed))
    sample = sample[: config.faithfulness.instances]
    return deletion_curves(data.acts[sample], stage.sae, head, stage.tower, target[sample],
                           steps=config.faithfulness.steps, seed=config.seed)


def _components_and_instances(head_audits: Sequence[HeadAudit], descriptions: ComponentDescriptions,
                              sae: SAE, index: pd.DataFrame, out_dpath: Path,
                              outputs: OutputConfig) -> tuple[list[ComponentInfo], list[InstanceInfo]]:
    from clipaudit.describe.components import write_thumbnails

    wanted = sorted({f.component for h in head_audits for f in h.findings})
    components = []
    directions = sae.W_dec.detach().float()
    for j in wanted:
        direction = directions[:, j] / directions[:, j].norm().clamp_min(1e-12)
        components.append(ComponentInfo(
            component=j, concept=descriptions.concept[j],
            concept_score=float(descriptions.concept_score[j]),
            clarity=float(descriptions.clarity[j]),
            top_instances=descriptions.top.instances(j)[: outputs.thumbnails_per_finding],
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


def _provenance(cache: ActivationCache, backbone: Backbone, sae: SAE, sae_fpath: Path | str,
                heads: Sequence[Head], config: AuditConfig) -> dict[str, Any]:
    describe = config.describe
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
        "heads": [h.provenance() for h in heads],
        "reference": dataclasses.asdict(describe.reference) if describe.reference else "audited model",
        "reference_set": str(describe.reference_cache) if describe.reference_cache else "audited data",
        "vocabularies": list(describe.vocabularies),
        "top_m": describe.top_m,
        "rules": str(config.rules),
        "seed": config.seed,
    }


def _audit_id(cache: ActivationCache, sae_fpath: Path | str, heads: Sequence[Head]) -> str:
    key = sha256_json({"data": cache.provenance.get("data_sha256"), "sae": sha256_file(sae_fpath),
                       "heads": [h.name for h in heads],
                       "time": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    return key[:12]
