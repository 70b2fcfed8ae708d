"""The audit, the one orchestrator of the pipeline's later stages:

    cache + SAE + heads -> one streaming pass (attribution) -> descriptions (describe)
    -> candidates, intervals, chance levels, evidence (findings) -> permutation control
    -> rule verdicts (gate) -> audit folder (report)

The audit streams: it reads the cache shard by shard, encodes each shard with the
SAE once, accumulates each head's per-class relevance and the components' top
activations, and spills the sparse codes to a scratch folder inside the audit folder
(removed when done) for the passes that need them once the findings are known. Its
memory is bounded by the SAE and the number of classes (a few bytes per instance
aside: predictions and labels), never by the number of instances; see
``clipaudit.attribution.audit_pass`` and ``clipaudit.audit_heads``.

The audit folder holds audit.json, the component descriptions
(``descriptions.safetensors``, reusable by a later audit), thumbnails, junit.xml,
summary.md, report.html and report.pdf, and on request the per-instance attribution
tables (``attributions-<head>/``, ``OutputConfig.attributions``).

It runs from the activation cache at the pooled hook point of any tower (or the
last block's class token of a class-token ViT, the same vector), where the rest of
the tower is a norm and an affine projection (``clipaudit.extraction.hooks.cache_readout``)
and attributions have a closed form (the ``frozen`` gradient); the attribution library
also works from images at any hook point and with the ``exact`` gradient
(``clipaudit.attribution.attribute_images``, ``attribute_cls``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clipaudit._version import __version__
from clipaudit.artifacts import sha256_file, sha256_json
from clipaudit.attribution.audit_pass import encode_rows, first_pass
from clipaudit.attribution.heatmap_files import HeatmapConfig, add_heatmaps
from clipaudit.attribution.patching import check_gradient
from clipaudit.attribution.table import ATTRIBUTION_CLASSES, AttributionTableConfig
from clipaudit.describe.components import ComponentDescriptions, TopActivations
from clipaudit.describe.config import DescribeConfig
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import Backbone, load_backbone_for
from clipaudit.extraction.cache_reader import ActivationCache
from clipaudit.extraction.hooks import cache_readout
from clipaudit.findings.audit_concepts import audit_concepts
from clipaudit.findings.concept_evidence import InstanceSet
from clipaudit.findings.statistics import StatisticsConfig
from clipaudit.heads import Head, LinearProbe, PromptSet, load_head, make_zero_shot_head
from clipaudit.heads.labels import HeadLabels, check_heads_against_labels
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.report.model import ReportConfig
from clipaudit.results import AUDIT_FNAME, AuditResult, ComponentInfo, InstanceInfo, save_audit
from clipaudit.sae.model import SAE
from clipaudit.staging import staged_output

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
    """Components kept for the relevance-vs-alignment scatter of a class with findings
    (classes without findings keep fewer: 20,000 points shared among them, 10 at least)."""
    report: ReportConfig = ReportConfig()
    """What the reports show of the audit."""
    attributions: AttributionTableConfig = AttributionTableConfig()
    """The optional per-instance attribution tables (attributions-<head>/)."""
    heatmaps: HeatmapConfig = HeatmapConfig()
    """Heatmaps of the findings' top images (``heatmaps/``)."""


@dataclass(frozen=True)
class AuditConfig:
    """How to audit (thresholds come from the rule file, not from here)."""

    rules: str = "default"
    """Rule file: a shipped name (default, dermatology, strict) or a path."""
    label_map: Path | None = None
    """YAML (class: label) or CSV (class,label) file mapping the heads' class names to the
    data's labels, where they differ (default: class names must equal labels)."""
    describe: DescribeConfig = DescribeConfig()
    """How components are described (vocabulary, reference model and set, top-m)."""
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()
    statistics: StatisticsConfig = StatisticsConfig()
    """Bootstrap intervals, chance levels and the permutation control."""
    outputs: OutputConfig = OutputConfig()
    batch_size: int = 4096
    """Instances per batch when encoding and attributing from the cache (at most: wide
    SAEs encode fewer at once, so the encoder's pre-activations stay under 128 MB)."""
    gradient: str = "frozen"
    """``frozen``: norm scales and the head's normalisation held fixed, attributions add up
    to the score and have a closed form (what the streaming audit computes). ``exact``
    (plain autograd, as the paper's code) is refused by the audit: use ``explain
    --gradient exact`` or ``attribute_cls(..., gradient="exact")``; the deletion curves
    of every audit compare both rankings."""
    seed: int = 0
    """Seeds the faithfulness sample, the bootstrap, the permutation control and the
    concept sample."""
    column_roles: tuple[str, ...] = ()
    """Metadata column roles, ``COLUMN=ROLE`` (artifact, protected or ignore), over the rule
    file's and the data set's (``clipaudit.columns``)."""
    concept_rows: int = 20_000
    """Instances (a random sample of the audited data, and of the reference set) on which
    column coverage, concept directions and concept reliance are measured and the class
    alignment is calibrated: what those hold in memory is this many rows of activations
    and embeddings, however large the data."""

    def validate(self) -> None:
        if self.outputs.attributions.classes not in ATTRIBUTION_CLASSES:
            raise InputError(f"attribution classes {self.outputs.attributions.classes!r}: use one "
                             f"of {', '.join(ATTRIBUTION_CLASSES)}")
        s = self.statistics
        if s.resamples < 10 or not 0.5 <= s.level < 1 or not 0 < s.fdr < 1:
            raise InputError(f"statistics: resamples must be >= 10 (got {s.resamples}), the level in "
                             f"[0.5, 1) (got {s.level}), the false discovery rate in (0, 1) "
                             f"(got {s.fdr})")
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if self.concept_rows < 100:
            raise InputError(f"concept rows must be at least 100, got {self.concept_rows}")
        check_gradient(self.gradient)
        if self.gradient != "frozen":
            raise InputError(
                f"gradient {self.gradient!r}: the audit computes attributions in closed form from "
                "the cache, with norm scales frozen (gradient frozen); the exact gradient is "
                "available per image (clipaudit explain --gradient exact) and in the library "
                "(attribute_cls(..., gradient='exact')), and every audit's deletion curves "
                "compare the two rankings")


@dataclass(frozen=True)
class AuditOutcome:
    result: AuditResult
    audit_dpath: Path
    files: dict[str, Path] = field(default_factory=dict)
    exit_code: int = 0


@dataclass(frozen=True)
class Instances:
    """The audited instances in cache row order: what the audit keeps of each (labels as
    categoricals, metadata columns), a few bytes per instance."""

    ids: np.ndarray
    labels: pd.Series | None
    """Categorical labels (NaN: unknown); None when the index has no label column."""
    metadata: pd.DataFrame

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool(self.labels.notna().any())

    def truth(self, class_names: Sequence[str], matched: HeadLabels | None = None) -> np.ndarray:
        """int64 [n]: each instance's label as an index into ``class_names`` (through the
        label map of ``matched``); -1 unlabelled (counted by prediction), -2 a label of
        no class (left out)."""
        if self.labels is None:
            return np.full(len(self.ids), -1, dtype=np.int64)
        cat = self.labels.astype("category")
        lookup = {name: i for i, name in enumerate(class_names)}
        to_class = matched.label_to_class if matched is not None else {}
        lut = np.array([lookup.get(to_class.get(str(c), str(c)), -2) for c in cat.cat.categories]
                       + [-1], dtype=np.int64)
        return lut[cat.cat.codes.to_numpy()]


def load_instances(cache: ActivationCache) -> Instances:
    index = cache.ok_index
    labels = index["label"].reset_index(drop=True) if "label" in index else None
    metadata = index[[c for c in index.columns if c not in _INDEX_COLUMNS]].reset_index(drop=True)
    return Instances(index["id"].to_numpy(dtype=np.int64), labels, metadata)


@staged_output("out_dpath", command="audit", replaces=AUDIT_FNAME)  # replaced whole or not at all
def run_audit(cache_dpath: Path | str, sae_fpath: Path | str, out_dpath: Path | str, *,
              probe: Path | str | LinearProbe | None = None,
              prompts: Path | str | PromptSet | None = None,
              heads: Sequence[Head] = (), config: AuditConfig = AuditConfig(),
              baseline_dpath: Path | str | None = None, backbone: Backbone | None = None,
              reporter: Reporter = NULL_REPORTER) -> AuditOutcome:
    """Audit heads (a probe, a prompt set, and/or ready ``heads``) on a cache with an SAE,
    and write the audit folder. Returns the result and the gate's exit code (0 or 1)."""
    from clipaudit import audit_heads as stages
    from clipaudit.columns import parse_role_overrides
    from clipaudit.extraction.cache_reader import open_cache
    from clipaudit.gate import evaluate, exit_code, load_ruleset
    from clipaudit.results import load_audit
    from clipaudit.sae import load_sae

    config.validate()
    # fail fast on a bad rule file or column role
    ruleset = load_ruleset(config.rules).with_column_roles(parse_role_overrides(config.column_roles))
    cache = open_cache(cache_dpath, lean=True)
    hook = cache.provenance["hook"]
    backbone = backbone or load_backbone_for(cache.provenance["backbone"])
    tower = cache_readout(backbone.model, hook, cache_dpath)
    if not tower.is_affine:
        raise InputError(f"{cache_dpath}: the rest of this tower after the pooled vector "
                         f"({tower.description}) is not affine, so attributions have no closed "
                         "form and the audit cannot stream them; attribute single images with "
                         "clipaudit explain (autograd)")
    sae = load_sae(sae_fpath, expect_backbone_id=backbone.id, expect_hook=hook, expect_d=cache.d)
    audited = make_heads(probe, prompts, backbone, heads, encode_text=_text_encoder(backbone, config))
    # every class must match the data's labels, with enough instances, before any work
    matched = check_heads_against_labels(audited, cache, label_map=config.label_map,
                                         min_instances=ruleset.thresholds.min_instances,
                                         batch_size=config.batch_size)
    baseline_dpath = baseline_dpath or ruleset.baseline
    baseline = load_audit(baseline_dpath) if baseline_dpath else None

    instances = load_instances(cache)
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    describe_here = config.describe.reuse is None and config.describe.reference_cache is None
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=out_dpath) as spill_dpath:
        truths = [instances.truth(h.class_names, matched[h.name]) for h in audited]
        first = first_pass(cache, sae, audited, tower, truths,
                           instances.has_labels, Path(spill_dpath), batch_size=config.batch_size,
                           top_m=config.describe.top_m if describe_here else None,
                           table=config.outputs.attributions, out_dpath=out_dpath, reporter=reporter)
        files = {f"attributions-{p.head.name}": p.table for p in first.heads if p.table is not None}
        # the concept checks and the calibration read a bounded sample of each set
        audited_sample = sample_instances(cache, sae, config.concept_rows, config.seed,
                                          config.batch_size, spill=first.spill)
        ref_cache = _reference_cache(cache, config.describe)
        reference_sample = (audited_sample if ref_cache is cache else
                            sample_instances(ref_cache, sae, config.concept_rows, config.seed,
                                             config.batch_size))
        described = describe_for_audit(cache, first.top, sae, sae_fpath, backbone, audited,
                                       config.describe, config.batch_size, reporter,
                                       ref_cache=ref_cache, sample=reference_sample)
        descriptions = described.descriptions
        files["descriptions"] = save_descriptions_for_audit(descriptions, out_dpath)
        concepts = audit_concepts(cache, audited_sample, reference_sample, described, sae, ruleset,
                                  reporter, seed=config.seed,
                                  label_maps={h.name: matched[h.name].label_to_class for h in audited})
        ctx = stages.AuditContext(
            sae, tower, cache, first, descriptions, instances.metadata, ruleset.finding_config(),
            config.statistics, config.seed, config.outputs.thumbnails_per_finding,
            config.outputs.scatter_points, config.faithfulness.instances, config.faithfulness.steps,
            reporter, concepts)
        selections = [stages.select(p, p.relevance, p.assign, ctx, config.seed)  # type: ignore[arg-type]
                      for p in first.heads]  # first_pass sets every relevance
        shuffled = ([stages.shuffled_selection(p, ctx) for p in first.heads]
                    if config.statistics.permutation else [])
        evidence = stages.gather_evidence(
            selections, [c.component for s in shuffled for c in s.candidates], ctx)
        backed = stages.backed_keys(selections, config.statistics.fdr)
        head_audits = [stages.head_audit(s, evidence, ctx, b) for s, b in zip(selections, backed)]
        components, infos = _components_and_instances(head_audits, descriptions, sae, ref_cache,
                                                      out_dpath, config.outputs)
        components, heatmaps = add_heatmaps(
            components, pd.DataFrame({"id": [i.id for i in infos], "path": [i.path for i in infos]}),
            backbone.model, backbone.preprocess, sae, hook, out_dpath, config.outputs.heatmaps,
            reporter=reporter)
        result = AuditResult(
            audit_id=_audit_id(cache, sae_fpath, audited, config),
            provenance=_provenance(cache, backbone, sae, sae_fpath, audited, config),
            sae_metrics={k: float(v) for k, v in (sae.meta.get("metrics") or {}).items()
                         if isinstance(v, (int, float)) and v is not None},
            heads=head_audits, components=components, instances=infos,
            rules_file=ruleset.name, heatmaps=heatmaps, columns=concepts.columns,
            coverage=concepts.coverage,
            calibration=list(descriptions.calibration.classes) if descriptions.calibration else [],
        )
        if shuffled:
            result = dataclasses.replace(result, permutation=stages.permutation_control(
                shuffled, evidence, result, ruleset, ctx))
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

        paths = write_report(out_dpath, html=outputs.html, pdf=outputs.pdf, config=outputs.report,
                             result=result)
        files |= {k: v for k, v in (("html", paths.html), ("pdf", paths.pdf)) if v is not None}
    return files


def make_heads(probe: Path | str | LinearProbe | None, prompts: Path | str | PromptSet | None,
               backbone: Backbone, heads: Sequence[Head] = (),
               encode_text: Any = None) -> list[Head]:
    """The heads to audit: a probe (file or object), a prompt set (file or object) and
    any ready heads, loaded through the head registry. ``encode_text`` (default the
    backbone's) encodes a prompt set, e.g. through the text cache."""
    out: list[Head] = []
    if probe is not None:
        out.append(probe if isinstance(probe, LinearProbe) else load_head("linear-probe", probe, backbone))
    if prompts is not None:
        if isinstance(prompts, PromptSet) or encode_text is not None:
            from clipaudit.heads.zero_shot import load_prompt_set

            prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts)
            out.append(make_zero_shot_head(prompt_set, encode_text or backbone.encode_text))
        else:
            out.append(load_head("zero-shot", prompts, backbone))
    out.extend(heads)
    if not out:
        raise InputError("nothing to audit: give a probe (--probe) and/or a prompt set (--prompts)")
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        raise InputError(f"two heads share a name ({', '.join(names)}); name each head differently")
    return out


def _text_encoder(backbone: Backbone, config: AuditConfig) -> Any:
    from clipaudit.describe.text_cache import cached_text_encoder, resolve_text_cache

    return cached_text_encoder(backbone.encode_text, backbone.id,
                               resolve_text_cache(config.describe.text_cache))


# ------------------------------------------------------------------ steps


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
    """Component descriptions and what the concept checks read of the reference set."""

    descriptions: ComponentDescriptions
    semantic_embeds: Any
    """Image embeddings of the reference set by instance id (indexable by an id tensor),
    from the reference model (or, for reused descriptions of another reference model, from
    the audited CLIP)."""
    text_encoder: Any
    """The text encoder of the model ``semantic_embeds`` come from."""


def _reference_cache(cache: ActivationCache, config: DescribeConfig) -> ActivationCache:
    """The set components are described on: the audited data, or ``config.reference_cache``
    (same model and hook point)."""
    from clipaudit.extraction.cache_reader import open_cache

    if config.reference_cache is None:
        return cache
    ref_cache = open_cache(config.reference_cache, lean=True)
    check_same_model(ref_cache, cache, config.reference_cache)
    return ref_cache


@torch.no_grad()
def sample_instances(cache: ActivationCache, sae: SAE, max_rows: int, seed: int,
                     batch_size: int, spill: Any = None) -> InstanceSet:
    """At most ``max_rows`` instances of ``cache`` (a seeded random sample, in row order)
    with their activations, embeddings, labels, metadata and SAE codes; the codes are read
    from ``spill`` (the first pass's ``CodeSpill`` of this cache) when given, not encoded
    again."""
    from clipaudit.sae.model import cat_codes

    index = cache.ok_index.reset_index(drop=True)
    n = len(index)
    rows = (np.arange(n) if n <= max_rows else
            np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False)))
    picked = index.iloc[rows].reset_index(drop=True)
    acts = cache.take("acts", rows).float() if len(rows) else torch.zeros(0, cache.d)
    embeds = cache.take("embeds", rows).float() if len(rows) else torch.zeros(0, cache.embed_dim)
    indices, values = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1)
    if spill is not None and len(rows):
        indices, values = spill.rows(rows)
    elif len(rows):
        step = encode_rows(sae, batch_size)
        codes = cat_codes([sae.encode(acts[s:s + step]) for s in range(0, len(acts), step)])
        indices, values = codes.indices, codes.values.float()
    labels: list[str | None] = ([None if pd.isna(x) else str(x) for x in picked["label"]]
                                if "label" in picked else [None] * len(picked))
    metadata = picked[[c for c in picked.columns if c not in _INDEX_COLUMNS]]
    metadata = metadata.astype({c: object for c in metadata.columns
                                if isinstance(metadata[c].dtype, pd.CategoricalDtype)})
    return InstanceSet(
        torch.tensor(picked["id"].to_numpy(), dtype=torch.long), embeds, acts, labels, metadata,
        indices, values)


def describe_for_audit(cache: ActivationCache, top: TopActivations | None, sae: SAE,
                       sae_fpath: Path | str, backbone: Backbone, heads: Sequence[Head],
                       config: DescribeConfig, batch_size: int,
                       reporter: Reporter, *, ref_cache: ActivationCache | None = None,
                       sample: InstanceSet | None = None) -> Described:
    """What each component means, on the reference set (default: the audited data, whose
    top activations ``top`` the audit's pass already collected).

    Reuses ``config.reuse`` (an earlier audit's descriptions) when it was computed from
    the same SAE, reference model, reference set, vocabulary and top-m; only the class
    alignment (raw and calibrated) is then recomputed for these heads' classes (text
    encoding only). Text embeddings go through the text cache (``config.text_cache``).
    ``sample`` (a sample of the reference set, ``sample_instances``) anchors the
    calibration when the reference model is the audited one.
    """
    from clipaudit.describe.components import (
        describe_components,
        encode_reference_images,
        realign_classes,
    )
    from clipaudit.describe.concepts import load_vocabularies
    from clipaudit.describe.text_cache import cached_text_encoder, resolve_text_cache
    from clipaudit.extraction.backbone import load_backbone
    from clipaudit.extraction.cache_reader import index_rows

    ref_cache = ref_cache if ref_cache is not None else _reference_cache(cache, config)
    ref_backbone = backbone if config.reference is None else load_backbone(config.reference)
    encode_text = cached_text_encoder(ref_backbone.encode_text, ref_backbone.id,
                                      resolve_text_cache(config.text_cache))
    key = _descriptions_key(sae_fpath, ref_cache, ref_backbone, config)
    same_model = config.reference is None
    cal_embeds = sample.embeds if sample is not None and same_model else None
    cal_labels = sample.labels if sample is not None and same_model else None
    if config.reuse is not None:
        reused = _reuse_descriptions(config.reuse, key)
        realigned = realign_classes(reused, encode_text, class_texts(heads), cal_embeds, cal_labels)
        if same_model:
            return Described(realigned, EmbeddingsById(ref_cache), encode_text)
        # no re-encoding on reuse: text-defined concepts are read by the audited CLIP instead
        audited_text = cached_text_encoder(backbone.encode_text, backbone.id,
                                           resolve_text_cache(config.text_cache))
        return Described(realigned, EmbeddingsById(ref_cache), audited_text)

    if top is None or ref_cache is not cache:  # another reference set: one pass over it
        top = _top_activations(ref_cache, sae, config.top_m, batch_size, reporter)
    ref: Any
    if same_model:
        ref = EmbeddingsById(ref_cache)
        labels = cal_labels
    else:
        items = index_rows(ref_cache.dpath, ref_cache.ok_index["id"].tolist(), ["path"])
        ref = encode_reference_images(ref_backbone, items, reporter=reporter)
        labels = _labels_by_id(ref_cache.ok_index, ref.shape[0])
    vocabulary = load_vocabularies(list(config.vocabularies))
    descriptions = describe_components(top, ref, encode_text, vocabulary, class_texts(heads),
                                       templates=config.concept_templates, provenance=key,
                                       label_floor=config.label_floor, reference_labels=labels,
                                       calibration_embeds=cal_embeds)
    return Described(descriptions, ref, encode_text)


def _labels_by_id(index: pd.DataFrame, n: int) -> list[str | None]:
    """Labels indexed by instance id (None: unlabelled or no such id)."""
    labels: list[str | None] = [None] * n
    if "label" in index:
        for i, label in zip(index["id"].tolist(), index["label"].tolist()):
            if i < n:
                labels[i] = None if pd.isna(label) else str(label)
    return labels


@torch.no_grad()
def _top_activations(cache: ActivationCache, sae: SAE, m: int, batch_size: int,
                     reporter: Reporter) -> TopActivations:
    from clipaudit.describe.components import TopActivationsAccumulator

    acc = TopActivationsAccumulator(sae.n_latents, m)
    step = encode_rows(sae, batch_size)
    with reporter.task("encoding the reference set", total=cache.n_ok) as task:
        for shard in cache.iter_shards(("acts", "ids")):
            for s in range(0, len(shard["ids"]), step):
                acc.update(shard["ids"][s:s + step], sae.encode(shard["acts"][s:s + step]))
                task.advance(len(shard["ids"][s:s + step]))
    return acc.result()


class EmbeddingsById:
    """A cache's image embeddings indexed by instance id, read on demand (the rows the
    descriptions need: top-m per component), never all at once. Ids the cache lacks
    read as zero rows."""

    def __init__(self, cache: ActivationCache) -> None:
        self.cache = cache
        self._ids = cache.ok_index["id"].to_numpy(dtype=np.int64)
        n = int(self._ids.max()) + 1 if len(self._ids) else 0
        self.shape = (n, cache.embed_dim)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).numpy()
        rows = np.searchsorted(self._ids, flat)
        rows = np.minimum(rows, max(len(self._ids) - 1, 0))
        present = (self._ids[rows] == flat) if len(self._ids) else np.zeros(len(flat), bool)
        out = torch.zeros(len(flat), self.shape[1])
        if present.any():
            out[torch.from_numpy(present)] = self.cache.take("embeds", rows[present])
        return out.reshape(*ids.shape, self.shape[1])


def _descriptions_key(sae_fpath: Path | str, ref_cache: ActivationCache, ref_backbone: Backbone,
                      config: DescribeConfig) -> dict[str, Any]:
    """Everything descriptions depend on (the heads' classes aside)."""
    return {"sae_sha256": sha256_file(sae_fpath), "reference_model": ref_backbone.id,
            "reference_set": ref_cache.provenance.get("data_sha256"),
            "vocabularies": list(config.vocabularies), "templates": list(config.concept_templates),
            "top_m": config.top_m, "label_floor": config.label_floor}


def _reuse_descriptions(path: Path, key: dict[str, Any]) -> ComponentDescriptions:
    from clipaudit.artifacts import require_match
    from clipaudit.describe.components import load_descriptions

    fpath = path / DESCRIPTIONS_FNAME if path.is_dir() else path
    descriptions = load_descriptions(fpath)
    for name, want in key.items():
        require_match(name.replace("_", " "), want, descriptions.provenance.get(name), fpath)
    log.info("reusing component descriptions from %s", fpath)
    return descriptions


DESCRIPTIONS_TOP_KEPT = 32
"""Top instances per component kept in the audit's descriptions file (what a reuse shows)."""


def save_descriptions_for_audit(descriptions: ComponentDescriptions, out_dpath: Path) -> Path:
    """The descriptions a later audit can reuse, without what it recomputes (the class
    alignment) and with the first 32 top instances of each component (the semantic
    embeddings were computed from all top-m): bounded by the SAE, not by the classes."""
    from clipaudit.describe.components import save_descriptions

    return save_descriptions(out_dpath / DESCRIPTIONS_FNAME, descriptions,
                             top_kept=DESCRIPTIONS_TOP_KEPT, class_alignment=False)


def check_same_model(ref_cache: ActivationCache, cache: ActivationCache, ref_dpath: Path | str) -> None:
    """The reference cache must come from the audited CLIP at the audited hook point."""
    from clipaudit.artifacts import require_match

    require_match("backbone", cache.provenance["backbone"]["id"],
                  ref_cache.provenance["backbone"]["id"], ref_dpath)
    require_match("hook point", cache.provenance["hook"], ref_cache.provenance["hook"], ref_dpath)


def _components_and_instances(head_audits: Sequence[Any], descriptions: ComponentDescriptions,
                              sae: SAE, ref_cache: ActivationCache, out_dpath: Path,
                              outputs: OutputConfig) -> tuple[list[ComponentInfo], list[InstanceInfo]]:
    from clipaudit.describe.components import write_thumbnails
    from clipaudit.extraction.cache_reader import index_rows

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
    items = index_rows(ref_cache.dpath, instance_ids, ["path", "label"])
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
        "gradient": config.gradient,
        "label_map": ({"path": str(config.label_map), "sha256": sha256_file(config.label_map)}
                      if config.label_map is not None else None),
        "seed": config.seed,
        "statistics": dataclasses.asdict(config.statistics),
    }


def _audit_id(cache: ActivationCache, sae_fpath: Path | str, heads: Sequence[Head],
              config: AuditConfig) -> str:
    """Deterministic: the same data, SAE, heads and settings give the same id, so an audit
    run twice gives the same audit.json apart from its dates. The rule file is left out:
    ``rules apply`` re-judges an audit under its id."""
    settings = dataclasses.asdict(dataclasses.replace(config, rules=""))
    key = sha256_json({"data": cache.provenance.get("data_sha256"),
                       "backbone": (cache.provenance.get("backbone") or {}).get("id"),
                       "hook": cache.provenance.get("hook"), "sae": sha256_file(sae_fpath),
                       "heads": [h.provenance() for h in heads], "settings": settings})
    return key[:12]
