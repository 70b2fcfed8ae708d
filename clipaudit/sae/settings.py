"""SAE settings from the data: expansion, k and steps from the width d and the row count N.

``train-sae`` without options used to train every SAE at expansion 8 and k 32: the
settings of a 768-wide CLIP with a million rows, also for a 96-wide tower with 2,000
rows, where most of 768 latents see too few rows to learn anything. The rule:

- **k** (active latents per row) = 1.6 x sqrt(d), rounded, within 8-64 and at most
  d / 4: the concepts present in one image grow more slowly than the width (16 at d =
  96, 44 at d = 768, 51 at d = 1024; 32-64 is the usual range for ViT-B SAEs). On the
  bundled tiny CLIP (d = 96, 2,000 clean world images, expansion 2, two seeds) k = 8
  and 11 left the best ruler component at ROC AUC 0.78-0.83 where k = 16 reached 1.00
  (``benchmarks/sae_settings.py``).
- **expansion** (latents = expansion x d) = the largest power of two from 2 to 32 at
  which a latent fires on at least 100 training rows on average (N x k / latents >=
  100); 2 when even that is not met (a warning says so). 2,000 rows at d = 96 -> 2 (192
  latents, ~167 rows each); a million rows at d = 768 -> 32 (24,576 latents).
- **steps**: 10 passes over the rows in batches of ``batch_size``, at least 1,000 and
  at most 100,000 steps.

A value given on the command line (or in the config) wins; the settings say which were
given. Given values get a warning when they leave a latent fewer than 100 rows on
average or make k more than d / 4; the rule's own choice warns below 50 rows a latent
(too few rows for any SAE); k >= d is refused (an SAE that may use d latents per row
needs no sparse code at all).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from clipaudit.errors import InputError
from clipaudit.sae.config import SAETrainConfig

ROWS_PER_LATENT = 100
"""Average training rows a latent should fire on (N x k / latents)."""
EXPANSION_RANGE = (2, 32)
K_RANGE = (8, 64)
K_PER_SQRT_WIDTH = 1.6
"""k = K_PER_SQRT_WIDTH x sqrt(d) before the range applies."""
MAX_K_SHARE = 0.25
"""k at most this share of d."""
EPOCHS = 10
STEPS_RANGE = (1000, 100_000)


@dataclass(frozen=True)
class SettingChoice:
    """One setting, its value and why it has that value."""

    name: str
    value: int
    given: bool
    """Set by the user (command line, environment or config), not by the rule."""
    reason: str


@dataclass(frozen=True)
class SAESettings:
    """The settings an SAE is trained with, resolved from the data where not given."""

    d: int
    n_rows: int
    config: SAETrainConfig
    """The training configuration with n_latents, k and steps filled in."""
    choices: list[SettingChoice]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        assert self.config.n_latents is not None
        return self.config.n_latents

    @property
    def rows_per_latent(self) -> float:
        """Average training rows a latent fires on: N x k / latents."""
        assert self.config.k is not None
        return self.n_rows * self.config.k / self.n_latents

    def as_dict(self) -> dict[str, object]:
        return {"d": self.d, "n_rows": self.n_rows, "n_latents": self.n_latents,
                "rows_per_latent": round(self.rows_per_latent, 1),
                "choices": [dataclasses.asdict(c) for c in self.choices],
                "warnings": list(self.warnings)}


def rule_k(d: int) -> int:
    """k the rule picks for width d."""
    k = min(max(round(K_PER_SQRT_WIDTH * math.sqrt(d)), K_RANGE[0]), K_RANGE[1])
    return max(1, min(k, int(d * MAX_K_SHARE)))


def rule_expansion(d: int, n_rows: int, k: int) -> int:
    """The largest power of two in EXPANSION_RANGE at which a latent fires on at least
    ROWS_PER_LATENT rows on average; the smallest of the range when none does."""
    expansion = EXPANSION_RANGE[0]
    while (expansion * 2 <= EXPANSION_RANGE[1]
           and n_rows * k / (expansion * 2 * d) >= ROWS_PER_LATENT):
        expansion *= 2
    return expansion


def rule_steps(n_rows: int, batch_size: int) -> int:
    steps = math.ceil(EPOCHS * n_rows / batch_size)
    return min(max(steps, STEPS_RANGE[0]), STEPS_RANGE[1])


def choose_sae_settings(config: SAETrainConfig, d: int, n_rows: int) -> SAESettings:
    """Fill in what ``config`` leaves open (n_latents/expansion, k, steps) by the rule;
    check what it gives. Raises InputError for a k that is not sparse (k >= d)."""
    if d < 1 or n_rows < 1:
        raise InputError(f"an SAE needs rows of width >= 1 (got {n_rows} rows of width {d})")
    k_given = config.k is not None
    k = config.k if config.k is not None else rule_k(d)
    if k_given and k >= d and d > 1:
        raise InputError(f"k {k} >= d {d}: with as many active latents as dimensions an SAE "
                         f"needs no sparse code; use k <= d / 4 (the rule picks {rule_k(d)} "
                         "without --k)")
    choices = [SettingChoice("k", k, k_given, f"{K_PER_SQRT_WIDTH:g} x sqrt(d) within "
                             f"{K_RANGE[0]}-{K_RANGE[1]}, at most d / {int(1 / MAX_K_SHARE)}")]
    if config.n_latents is not None:
        n_latents, expansion_given = config.n_latents, True
        choices.append(SettingChoice("latents", n_latents, True, "given as --n-latents"))
    else:
        expansion_given = config.expansion is not None
        expansion = config.expansion if config.expansion is not None else rule_expansion(d, n_rows, k)
        n_latents = expansion * d
        choices.append(SettingChoice(
            "expansion", expansion, expansion_given,
            f"largest power of two {EXPANSION_RANGE[0]}-{EXPANSION_RANGE[1]} at which each latent "
            f"fires on >= {ROWS_PER_LATENT} rows on average (rows x k / latents)"))
    if config.steps is not None:
        steps = config.steps
        choices.append(SettingChoice("steps", steps, True, "given as --steps"))
    elif config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * math.ceil(n_rows / config.batch_size)))
        choices.append(SettingChoice("steps", steps, True, f"{config.epochs:g} epochs given"))
    else:
        steps = rule_steps(n_rows, config.batch_size)
        choices.append(SettingChoice(
            "steps", steps, False, f"{EPOCHS} passes over the rows in batches of "
            f"{config.batch_size}, within {STEPS_RANGE[0]:,}-{STEPS_RANGE[1]:,}"))
    resolved = dataclasses.replace(config, n_latents=n_latents, k=k, steps=steps)
    settings = SAESettings(d, n_rows, resolved, choices)
    return dataclasses.replace(settings, warnings=_warnings(settings, k_given or expansion_given))


def _warnings(settings: SAESettings, any_given: bool) -> list[str]:
    d, k, n_latents = settings.d, settings.config.k, settings.n_latents
    assert k is not None
    out = []
    per_latent = settings.rows_per_latent
    if per_latent < (ROWS_PER_LATENT if any_given else ROWS_PER_LATENT / 2):
        fewer = (f"{n_latents:,} latents for {settings.n_rows:,} rows: each fires on ~{per_latent:.0f} "
                 f"rows on average (fewer than {ROWS_PER_LATENT}); many will die or memorise rows")
        if any_given:
            rule_k_ = rule_k(d)
            fewer += (f". Without --expansion/--n-latents/--k the rule picks expansion "
                      f"{rule_expansion(d, settings.n_rows, rule_k_)}, k {rule_k_}")
        else:
            fewer += ". More rows would let the SAE learn more components"
        out.append(fewer)
    if k > d * MAX_K_SHARE:
        out.append(f"k {k} is more than a quarter of d {d}: dense codes mix concepts in each "
                   f"latent (the rule picks k {rule_k(d)})")
    return out
