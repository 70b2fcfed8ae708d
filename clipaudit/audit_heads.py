"""The audit's per-head stages, after the streaming pass and the descriptions:

    select      relevance -> candidates -> bootstrap intervals and chance levels
    evidence    one pass over the spilled codes: where each finding's component fires,
                its metadata AUCs, and its ablation effect (from the firing rows)
    head_audit  findings, per-class numbers, the roll-up, faithfulness -> HeadAudit
    permutation the same selection with labels shuffled within the data, judged by the
                rules -> PermutationControl

``clipaudit.audit`` runs them in that order; each reads the ``AuditContext`` and the
results of the stages before it, so a new kind of evidence is one more function here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from clipaudit.attribution.ablation import deletion_curves
from clipaudit.attribution.audit_pass import FirstPass, HeadPass, relevance_over_spill
from clipaudit.attribution.patching import Relevance
from clipaudit.attribution.sparse_ablation import (
    AblationContext,
    ComponentAblation,
    ablate_component,
    class_effect,
)
from clipaudit.describe.components import ComponentDescriptions
from clipaudit.extraction.cache_reader import ActivationCache
from clipaudit.extraction.readout import PooledReadout
from clipaudit.findings import (
    Candidate,
    largest_shares,
    make_finding,
    scatter_points,
    select_candidates,
)
from clipaudit.findings.evidence import Firing, binary_columns, firing_rows, sparse_metadata_aucs
from clipaudit.findings.statistics import (
    ClassEvidence,
    StatisticsConfig,
    benjamini_hochberg,
    candidate_statistics,
)
from clipaudit.progress import Reporter
from clipaudit.results import (
    AblationEffect,
    AuditResult,
    ClassAudit,
    ComponentReliance,
    FindingConfig,
    HeadAudit,
    PermutationControl,
)
from clipaudit.sae.model import SAE

log = logging.getLogger(__name__)

RELIED_ON_LISTED = 50
"""Components kept in a head's roll-up of components relied on by several classes."""
ABLATION_ROWS = 8192
"""Rows of a component's firing instances ablated at a time (activations and scores of
a chunk in memory, whatever the data set's size)."""
SCATTER_POINTS_TOTAL = 20_000
"""Scatter points shared by the classes without backed findings (each keeps at least 10;
in heads of at most 100 classes every class with findings keeps ``scatter_points``)."""


@dataclass(frozen=True)
class AuditContext:
    """What every per-head stage reads."""

    sae: SAE
    tower: PooledReadout
    cache: ActivationCache
    first: FirstPass
    descriptions: ComponentDescriptions
    metadata: pd.DataFrame
    """The index's metadata columns, one row per audited instance (cache row order)."""
    finding_config: FindingConfig
    statistics: StatisticsConfig
    seed: int
    thumbnails_per_finding: int
    scatter_points: int
    faithfulness_instances: int
    faithfulness_steps: int
    reporter: Reporter
    concepts: Any = None
    """``findings.audit_concepts.AuditConcepts``: calibrated alignment decides, reliance on
    forbidden concepts is measured (None: the raw alignment decides, nothing measured)."""


@dataclass(frozen=True)
class Selection:
    """One head's candidates with their statistics (under real or shuffled labels)."""

    head_pass: HeadPass
    relevance: Relevance
    alignment: torch.Tensor
    """[n_latents, C] class alignment of the head's classes."""
    candidates: list[Candidate]
    stats: dict[tuple[str, int], Any]


# ------------------------------------------------------------------ select


def select(p: HeadPass, relevance: Relevance, assign: np.ndarray, ctx: AuditContext,
           seed: int) -> Selection:
    """Candidates of one head and their intervals and chance levels."""
    d = ctx.descriptions
    columns = [d.class_names.index(c) for c in p.head.class_names]
    alignment = d.class_alignment[:, columns]
    calibrated, forbidden = None, None
    if ctx.concepts is not None:
        calibrated = d.calibrated_alignment[:, columns]
        forbidden = ctx.concepts.forbidden_reliance(p.head, ctx.concepts.reliance_of(p.head),
                                                    d.concept)
    candidates = select_candidates(relevance.share, alignment, d.clarity, d.concept,
                                   d.concept_score, p.head.class_names, ctx.finding_config,
                                   calibrated_jc=calibrated, forbidden_reliance=forbidden)
    stats: dict[tuple[str, int], Any] = {}
    if candidates:
        positions = _class_positions(assign, len(p.head.class_names))
        rng = np.random.default_rng(seed)
        pool = _rows_evidence(ctx, p, _sample(np.arange(len(assign)), ctx.statistics.max_rows, rng))
        own_rows = {c: _sample(positions[c], ctx.statistics.max_rows, rng)
                    for c in {p.head.class_names.index(cand.class_name) for cand in candidates}}
        def own(c: int) -> ClassEvidence:
            return _as_class(_rows_evidence(ctx, p, own_rows[c]), p, c)

        stats = candidate_statistics(candidates, p.head.class_names, relevance.n_instances.tolist(),
                                     own, lambda c: _as_class(pool, p, c), ctx.sae.n_latents,
                                     ctx.statistics, seed)
    return Selection(p, relevance, alignment, candidates, stats)


def _class_positions(assign: np.ndarray, n_classes: int) -> list[np.ndarray]:
    keep = np.flatnonzero(assign >= 0)
    order = keep[np.argsort(assign[keep], kind="stable")]
    counts = np.bincount(assign[keep], minlength=n_classes)
    return np.split(order, np.cumsum(counts)[:-1])


def _sample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False))


def _rows_evidence(ctx: AuditContext, p: HeadPass, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    idx, z = ctx.first.spill.rows(rows)
    return idx, z * ctx.first.spill.scalar(p.inv_name, rows)[:, None]


def _as_class(rows: tuple[torch.Tensor, ...], p: HeadPass, c: int) -> ClassEvidence:
    idx, z_inv = rows
    assert p.readout is not None
    return ClassEvidence(z_inv * p.readout.latent_dirs[c][idx], idx)


# ------------------------------------------------------------------ evidence


@dataclass(frozen=True)
class Evidence:
    aucs: dict[int, dict[str, float]]
    """Component -> metadata column -> ROC AUC."""
    ablations: dict[tuple[int, str, int], AblationEffect]
    """(head index, class, component) -> ablation effect."""


def gather_evidence(selections: Sequence[Selection], also_aucs_for: Sequence[int],
                    ctx: AuditContext) -> Evidence:
    """Metadata AUCs for every candidate's component (and ``also_aucs_for``), ablation
    effects for every candidate, in passes over the spilled codes."""
    columns = binary_columns(ctx.metadata)
    wanted = {cand.component for s in selections for cand in s.candidates}
    components = sorted(wanted | set(also_aucs_for))
    contexts = {s.head_pass.index: AblationContext.build(s.head_pass.pred, s.head_pass.truth,
                                                         ctx.metadata) for s in selections}
    aucs: dict[int, dict[str, float]] = {}
    ablations: dict[tuple[int, str, int], AblationEffect] = {}
    with ctx.reporter.task("evidence for findings", total=len(components)) as task:
        for group in firing_rows(ctx.first.spill.chunks, components, ctx.first.fire_counts):
            for j, firing in group.items():
                aucs[j] = sparse_metadata_aucs(firing, columns)
                if j in wanted:
                    ablations |= _ablations(j, firing, selections, contexts, ctx)
                task.advance()
    return Evidence(aucs, ablations)


def _ablations(j: int, firing: Firing, selections: Sequence[Selection],
               contexts: dict[int, AblationContext], ctx: AuditContext
               ) -> dict[tuple[int, str, int], AblationEffect]:
    """Every candidate's ablation effect for component ``j``, over the rows where it
    fires in chunks of ``ABLATION_ROWS`` (its activations read once per chunk for every
    head): memory bounded by the chunk, not by how often ``j`` fires."""
    jobs = [(s.head_pass, [c for c in s.candidates if c.component == j]) for s in selections]
    jobs = [(p, cands) for p, cands in jobs if cands]
    classes = {p.index: sorted({p.head.class_names.index(c.class_name) for c in cands})
               for p, cands in jobs}
    parts: dict[int, list[ComponentAblation]] = {p.index: [] for p, _ in jobs}
    for start in range(0, max(len(firing.positions), 1), ABLATION_ROWS):
        chunk = Firing(firing.positions[start:start + ABLATION_ROWS],
                       firing.values[start:start + ABLATION_ROWS])
        acts = ctx.cache.take("acts", chunk.positions)
        for p, _ in jobs:
            parts[p.index].append(ablate_component(contexts[p.index], p.head, ctx.tower, ctx.sae,
                                                   j, chunk, acts, classes[p.index]))
    out = {}
    for p, cands in jobs:
        ablation = ComponentAblation.concat(parts[p.index])
        for cand in cands:
            out[(p.index, cand.class_name, j)] = class_effect(
                contexts[p.index], ablation, j, p.head.class_names.index(cand.class_name),
                cand.class_name)
    return out


# ------------------------------------------------------------------ head audit


def backed_keys(selections: Sequence[Selection], fdr: float) -> list[set[tuple[str, int]]]:
    """Per selection, the (class, component) of its findings the data back: those that
    survive the Benjamini-Hochberg procedure over every finding of every selection (one
    family: the audit's findings)."""
    tested = [(i, key) for i, s in enumerate(selections) for key in s.stats]
    q = benjamini_hochberg([selections[i].stats[key].p_value for i, key in tested])
    out: list[set[tuple[str, int]]] = [set() for _ in selections]
    for (i, key), qv in zip(tested, q):
        if qv <= fdr:
            out[i].add(key)
    return out


def make_findings(s: Selection, evidence: Evidence, ctx: AuditContext, backed: set[tuple[str, int]],
                  with_ablation: bool = True) -> list[Any]:
    """Each candidate with its evidence and statistics, ranked within its class."""
    findings: list[Any] = []
    rank: dict[str, int] = {}
    head = s.head_pass.head
    for cand in s.candidates:
        rank[cand.class_name] = rank.get(cand.class_name, 0) + 1
        top = ctx.descriptions.top.instances(cand.component)[: ctx.thumbnails_per_finding]
        ablation = evidence.ablations.get((s.head_pass.index, cand.class_name, cand.component)) \
            if with_ablation else None
        finding = make_finding(head.name, cand, rank[cand.class_name], top,
                               evidence.aucs.get(cand.component, {}), ablation)
        st = s.stats.get((cand.class_name, cand.component))
        if st is not None:
            finding = dataclasses.replace(
                finding, share_ci=list(st.share_ci), concept_share_ci=list(st.concept_share_ci),
                chance_share=st.chance_share, p_value=st.p_value,
                backed=(cand.class_name, cand.component) in backed)
        findings.append(finding)
    return findings


def head_audit(s: Selection, evidence: Evidence, ctx: AuditContext,
               backed: set[tuple[str, int]]) -> HeadAudit:
    p, rel, d = s.head_pass, s.relevance, ctx.descriptions
    head = p.head
    findings = make_findings(s, evidence, ctx, backed)
    unexplained = rel.unexplained_share
    pred, truth = torch.from_numpy(p.pred), torch.from_numpy(p.truth)
    known = truth >= 0
    accuracy = float((pred[known] == truth[known]).float().mean()) if known.any() else None
    by_class: dict[str, list[Any]] = {}
    for f in findings:
        by_class.setdefault(f.class_name, []).append(f)
    quiet_points = min(ctx.scatter_points, max(10, SCATTER_POINTS_TOTAL // max(1, len(head.class_names))))
    # per class, its labelled instances and how many the head gets right (one count, not
    # a scan of every instance per class)
    n_classes = len(head.class_names)
    labelled = truth[known]
    n_labelled = torch.bincount(labelled, minlength=n_classes)
    n_right = torch.bincount(labelled[pred[known] == labelled], minlength=n_classes)
    largest = largest_shares(rel.share, max(ctx.scatter_points, quiet_points)).T.tolist()
    classes = []
    for c, name in enumerate(head.class_names):
        of_class = by_class.get(name, [])
        acc = (float(n_right[c].float() / n_labelled[c].float())
               if rel.by == "label" and n_labelled[c] > 0 else None)
        detailed = any(f.backed for f in of_class) or (of_class and len(head.class_names) <= 100)
        classes.append(ClassAudit(
            class_name=name, n_instances=int(rel.n_instances[c]), accuracy=acc,
            spurious_share=float(sum(f.share for f in of_class)),
            unexplained_share=float(unexplained[c]),
            components=scatter_points(rel.share[:, c], s.alignment[:, c], d.clarity, d.concept,
                                      largest[c][:ctx.scatter_points if detailed else quiet_points],
                                      [f.component for f in of_class])))
    return HeadAudit(name=head.name, kind=head.kind, class_names=list(head.class_names),
                     accuracy=accuracy, classes=classes, findings=findings,
                     faithfulness=_faithfulness(p, ctx), relied_on=relied_on(s, findings, ctx),
                     concept_reliance=(ctx.concepts.reliance_of(head)
                                       if ctx.concepts is not None else []))


def relied_on(s: Selection, findings: Sequence[Any], ctx: AuditContext) -> list[ComponentReliance]:
    """Components carrying at least ``share_min`` of two or more classes' evidence."""
    share = s.relevance.share
    heavy = share >= ctx.finding_config.share_min
    n_classes = heavy.sum(1)
    order = torch.argsort(n_classes, descending=True, stable=True)
    found: dict[int, set[str]] = {}
    for f in findings:
        found.setdefault(f.component, set()).add(f.class_name)
    names = s.head_pass.head.class_names
    out = []
    for j in order[:RELIED_ON_LISTED].tolist():
        if int(n_classes[j]) < 2:
            break
        cols = torch.nonzero(heavy[j]).flatten()
        top = cols[torch.argsort(share[j, cols], descending=True)][:5].tolist()
        out.append(ComponentReliance(component=j, concept=ctx.descriptions.concept[j],
                                     n_classes=int(n_classes[j]), n_findings=len(found.get(j, ())),
                                     classes=[names[c] for c in top],
                                     max_share=float(share[j, cols].max())))
    return out


def _faithfulness(p: HeadPass, ctx: AuditContext) -> list[Any]:
    n = len(p.pred)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    sample = sample[: ctx.faithfulness_instances]
    if not len(sample):
        return []
    truth, pred = torch.from_numpy(p.truth), torch.from_numpy(p.pred)
    target = torch.where(truth >= 0, truth, pred)
    acts = ctx.cache.take("acts", sample.numpy())
    return deletion_curves(acts, ctx.sae, p.head, ctx.tower, target[sample],
                           steps=ctx.faithfulness_steps, seed=ctx.seed)


# ------------------------------------------------------------------ permutation control


def shuffled_selection(p: HeadPass, ctx: AuditContext) -> Selection:
    """The head's selection with its class assignment shuffled within the data."""
    assert p.readout is not None
    generator = torch.Generator().manual_seed(ctx.seed + 7919 * (p.index + 1))
    perm = torch.randperm(len(p.assign), generator=generator)
    assign = p.assign[perm.numpy()]
    rel = relevance_over_spill(ctx.first.spill, p.readout, p.inv_name, assign, p.by)
    shuffled = dataclasses.replace(p, assign=assign)
    return select(shuffled, rel, assign, ctx, ctx.seed + 1)


def permutation_control(shuffled: Sequence[Selection], evidence: Evidence, real: AuditResult,
                        ruleset: Any, ctx: AuditContext) -> PermutationControl:
    """Judge the shuffled-label selections with the rule set: what chance alone produces.
    Unexplained shares are the real ones (they do not depend on the labels' meaning).
    Reliance on concepts is measured causally, not from the labels' shares, so the
    shuffled audit leaves it out: its findings, forbidden or not, are judged on their
    shares alone (what the labels decide)."""
    from clipaudit.gate import evaluate

    heads = []
    for s, real_head, backed in zip(shuffled, real.heads, backed_keys(shuffled, ctx.statistics.fdr)):
        findings = [dataclasses.replace(f, reliance=None, reliance_low=None, reliance_source=None)
                    for f in make_findings(s, evidence, ctx, backed, with_ablation=False)]
        classes = [dataclasses.replace(c, n_instances=int(s.relevance.n_instances[i]), components=[],
                                       spurious_share=float(sum(f.share for f in findings
                                                                if f.class_name == c.class_name)))
                   for i, c in enumerate(real_head.classes)]
        heads.append(dataclasses.replace(real_head, classes=classes, findings=findings,
                                         faithfulness=[], relied_on=[], concept_reliance=[]))
    result = dataclasses.replace(real, heads=heads, verdicts=[], permutation=None)
    verdicts = evaluate(result, ruleset)

    def about_a_finding(v: Any) -> bool:
        return v.waived is None and any("finding" in x for x in v.details.get("violations", []))

    failing = [v for v in verdicts if v.status == "fail" and about_a_finding(v)]
    warnings = [v for v in verdicts if v.status == "warn" and about_a_finding(v)]
    all_findings = [f for h in heads for f in h.findings]
    return PermutationControl(
        seed=ctx.seed, n_findings=len(all_findings), n_backed=sum(f.backed for f in all_findings),
        n_failing=len(failing), n_warnings=len(warnings),
        failing=list(dict.fromkeys(f"{v.head} / {v.class_name}" for v in failing))[:20])
