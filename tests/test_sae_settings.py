"""The SAE settings rule (clipaudit.sae.settings): expansion, k and steps from the
width and the row count, sensible at both ends of the issue's range."""

from __future__ import annotations

import pytest

from clipaudit.errors import InputError
from clipaudit.sae import SAETrainConfig
from clipaudit.sae.settings import ROWS_PER_LATENT, choose_sae_settings, rule_expansion, rule_k


@pytest.mark.parametrize("d, n_rows, k, expansion, steps", [
    (96, 2_000, 16, 2, 1_000),         # the small tower: 192 latents, not 768
    (96, 8_000, 16, 8, 1_000),
    (768, 20_000, 44, 8, 1_000),
    (768, 1_000_000, 44, 32, 9_766),   # ViT-B/32 with a million rows
    (1024, 50_000_000, 51, 32, 100_000),
    (16, 3_000, 4, 4, 1_000),          # k never above d / 4
])
def test_the_rule_at_both_ends_of_the_range(d, n_rows, k, expansion, steps):
    settings = choose_sae_settings(SAETrainConfig(), d, n_rows)
    assert (settings.config.k, settings.n_latents // d, settings.config.steps) == (k, expansion, steps)
    assert not any(c.given for c in settings.choices)
    if expansion < 32:  # the next power of two would leave a latent fewer than 100 rows
        assert n_rows * k / (2 * expansion * d) < ROWS_PER_LATENT
    if expansion > 2:
        assert settings.rows_per_latent >= ROWS_PER_LATENT


def test_given_values_win_and_are_marked_given():
    settings = choose_sae_settings(SAETrainConfig(n_latents=300, k=12, epochs=2.0,
                                                  batch_size=100), 96, 1_000)
    assert (settings.n_latents, settings.config.k, settings.config.steps) == (300, 12, 20)
    assert all(c.given for c in settings.choices)
    assert choose_sae_settings(SAETrainConfig(expansion=4), 96, 2_000).n_latents == 384


def test_settings_that_do_not_fit_warn_and_a_dense_k_is_refused():
    settings = choose_sae_settings(SAETrainConfig(expansion=8, k=32), 96, 2_000)
    assert len(settings.warnings) == 2
    assert "the rule picks expansion 2, k 16" in settings.warnings[0]
    assert not choose_sae_settings(SAETrainConfig(), 96, 2_000).warnings  # 167 rows a latent
    assert choose_sae_settings(SAETrainConfig(), 96, 500).warnings  # 42: too few for any SAE
    with pytest.raises(InputError, match="k 96 >= d 96"):
        choose_sae_settings(SAETrainConfig(k=96), 96, 2_000)
    assert rule_k(96) == 16 and rule_expansion(96, 10 ** 9, 16) == 32
