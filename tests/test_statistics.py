"""Findings' statistics: bootstrap intervals, chance levels, what the gate judges, and the
permutation control's check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from clipaudit.findings import Candidate
from clipaudit.findings.statistics import (
    ClassEvidence,
    StatisticsConfig,
    benjamini_hochberg,
    candidate_statistics,
    chernoff_p_value,
    share_statistics,
)
from clipaudit.gate import evaluate, load_ruleset
from clipaudit.results import (
    AuditResult,
    ClassAudit,
    Finding,
    HeadAudit,
    PermutationControl,
)

LATENTS, K = 40, 4


def _world(n: int, *, shortcut_rate: float, seed: int) -> tuple[ClassEvidence, ClassEvidence]:
    """A class whose instances carry component 0 at ``shortcut_rate`` (the data at large
    at 0.2), every other component random: (the class's rows, a pool of the data)."""
    g = torch.Generator().manual_seed(seed)

    def rows(m: int, rate: float) -> ClassEvidence:
        comps = torch.stack([torch.randperm(LATENTS - 1, generator=g)[:K] + 1 for _ in range(m)])
        values = torch.rand(m, K, generator=g)
        has = torch.rand(m, generator=g) < rate
        comps[has, 0] = 0
        values[has, 0] = 3.0
        return ClassEvidence(values, comps)

    return rows(n, shortcut_rate), rows(4000, 0.2)


def _share(ev: ClassEvidence, members: list[int]) -> float:
    total = torch.zeros(LATENTS).index_add_(0, ev.components.reshape(-1), ev.values.reshape(-1))
    return float(total[members].sum() / total.abs().sum())


@pytest.mark.parametrize("n,rate,significant", [(2000, 0.6, True), (2000, 0.2, False), (5, 0.6, False),
                                                (40, 0.8, True)])
def test_a_class_unlike_random_sets_of_the_data_has_a_small_p_value(n, rate, significant):
    own, pool = _world(n, shortcut_rate=rate, seed=n)
    share = _share(own, [0])
    (stats,) = share_statistics(own, n, pool, [(0, [0])], [(share, share)], LATENTS,
                                StatisticsConfig(resamples=300), torch.Generator().manual_seed(0))
    lo, hi = stats.share_ci
    assert lo <= share <= hi and stats.concept_share_ci == stats.share_ci
    assert (stats.p_value < 1e-3) == significant
    # the chance level is what random sets of the data give: above the pool's own share
    assert stats.chance_share > _share(pool, [0]) - 0.01
    if significant:
        assert lo > stats.chance_share


@pytest.mark.parametrize("n,k", [(20, 4), (20, 8), (100, 12), (5, 3), (5, 5)])
def test_the_chernoff_bound_is_never_below_the_exact_tail(n, k):
    """A component firing on 10% of the data: the chance that a random set of n holds at
    least k firing instances (a binomial tail) is at most the bound, and not far below."""
    from scipy.stats import binom

    population = np.r_[np.ones(100), np.zeros(900)]
    bound = chernoff_p_value(population, k / n, n)
    exact = binom.sf(k - 1, n, 0.1)
    assert exact <= bound <= 1.0
    assert bound < 30 * exact * np.sqrt(n) or bound > 0.05
    assert chernoff_p_value(population, 0.05, n) == 1.0  # below the mean
    assert chernoff_p_value(population, 1.5, n) == 0.0  # above every value


def test_benjamini_hochberg_keeps_the_false_discovery_rate():
    rng = np.random.default_rng(0)
    null = rng.random(1900)
    real = rng.random(100) * 1e-4
    q = benjamini_hochberg(np.r_[null, real])
    called = q <= 0.05
    assert called[1900:].all() and called[:1900].sum() <= 0.05 * called.sum() + 2
    assert benjamini_hochberg([0.01]) == pytest.approx([0.01])
    assert benjamini_hochberg([0.04, 0.01, 0.03]).tolist() == pytest.approx([0.04, 0.03, 0.04])


def test_intervals_narrow_as_classes_grow_and_large_classes_are_resampled_m_out_of_n():
    widths = {}
    for n in (100, 1600):
        own, pool = _world(n, shortcut_rate=0.5, seed=1)
        share = _share(own, [0])
        (stats,) = share_statistics(own, n, pool, [(0, [0])], [(share, share)], LATENTS,
                                    StatisticsConfig(resamples=400), torch.Generator().manual_seed(0))
        widths[n] = stats.share_ci[1] - stats.share_ci[0]
    assert widths[1600] < widths[100] / 2.5  # about 1/4: width ~ 1/sqrt(n)
    # the same 1,600 instances, resampled 400 at a time and scaled by sqrt(400 / 1600)
    own, pool = _world(1600, shortcut_rate=0.5, seed=1)
    share = _share(own, [0])
    (sub,) = share_statistics(own, 1600, pool, [(0, [0])], [(share, share)], LATENTS,
                              StatisticsConfig(resamples=400, max_resample_size=400),
                              torch.Generator().manual_seed(0))
    assert sub.share_ci[1] - sub.share_ci[0] == pytest.approx(widths[1600], rel=0.3)
    assert sub.share_ci[0] < share < sub.share_ci[1]


def test_a_concept_split_over_components_is_resampled_together():
    own, pool = _world(800, shortcut_rate=0.6, seed=3)
    group = [0, 5]
    cands = [Candidate(0, "c", _share(own, [0]), _share(own, group), -0.1, 0.5, "ruler", 0.1, "shortcut"),
             Candidate(5, "c", _share(own, [5]), _share(own, group), -0.1, 0.5, "ruler", 0.1, "shortcut")]
    stats = candidate_statistics(cands, ["other", "c"], [10, 800], lambda c: own, lambda c: pool,
                                 LATENTS, StatisticsConfig(resamples=200), seed=0)
    first, second = stats[("c", 0)], stats[("c", 5)]
    assert first.concept_share_ci == second.concept_share_ci
    assert first.concept_share_ci[0] > first.share_ci[0] and second.share_ci[1] < first.share_ci[0]
    again = candidate_statistics(cands[:1], ["other", "c"], [10, 800], lambda c: own, lambda c: pool,
                                 LATENTS, StatisticsConfig(resamples=200), seed=0)
    assert again[("c", 0)].share_ci == first.share_ci  # a class's numbers depend on its seed only


# ------------------------------------------------------------------ the gate


def _finding(share: float, ci: list[float] | None, backed: bool = True, concept: str = "blur") -> Finding:
    return Finding(id=f"h:c:{concept}", head="h", class_name="c", component=3, kind="shortcut", rank=1,
                   share=share, concept_share=share, alignment=-0.1, clarity=0.8, concept=concept,
                   concept_score=0.1, share_ci=ci, concept_share_ci=ci, chance_share=0.1,
                   p_value=1e-9 if backed else 0.2, backed=backed)


def _result(findings: list[Finding], permutation: PermutationControl | None = None) -> AuditResult:
    head = HeadAudit(name="h", kind="linear-probe", class_names=["c"], accuracy=0.9,
                     classes=[ClassAudit("c", 50, 0.9, sum(f.share for f in findings), 0.01)],
                     findings=findings)
    return AuditResult(audit_id="t", provenance={}, sae_metrics={"fvu": 0.01, "dead_fraction": 0.0},
                       heads=[head], permutation=permutation)


def _status(result: AuditResult, rule: str) -> str:
    return next(v.status for v in evaluate(result, load_ruleset("default")) if v.rule == rule)


@pytest.mark.parametrize("finding,status", [
    (_finding(0.40, [0.31, 0.49]), "fail"),          # lower bound above the 0.25 limit
    (_finding(0.40, [0.20, 0.60]), "pass"),          # point above, lower bound below: passes
    (_finding(0.40, [0.31, 0.49], False), "pass"),   # not backed: no different from chance
    (_finding(0.40, None), "fail"),                  # no statistics (older audits): the point
])
def test_the_shortcut_rule_judges_the_lower_bound_of_backed_findings(finding, status):
    assert _status(_result([finding]), "no-shortcuts") == status


def test_an_unbacked_forbidden_concept_fails_nothing():
    backed = _finding(0.3, [0.2, 0.4], concept="watermark")
    assert _status(_result([backed]), "no-forbidden-concepts") == "fail"
    unbacked = dataclasses.replace(backed, backed=False)
    assert _status(_result([unbacked]), "no-forbidden-concepts") == "pass"
    assert _status(_result([unbacked]), "shortcut-watch") == "pass"


def test_the_permutation_control_warns_when_chance_alone_fails_classes():
    quiet = PermutationControl(seed=0, n_findings=3, n_backed=0, n_failing=0, n_warnings=0)
    loud = dataclasses.replace(quiet, n_backed=2, n_failing=2, failing=["h / a", "h / b"])
    assert _status(_result([], quiet), "chance-control") == "pass"
    verdicts = evaluate(_result([], loud), load_ruleset("default"))
    control = next(v for v in verdicts if v.rule == "chance-control")
    assert control.status == "warn" and "h / a" in control.message and control.details["n_failing"] == 2
    skipped = next(v for v in evaluate(_result([]), load_ruleset("default")) if v.rule == "chance-control")
    assert skipped.status == "pass" and skipped.message.startswith("skipped")
