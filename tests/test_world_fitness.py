"""The birds world and its bundled CLIP make a benchmark: a planted shortcut is relied on
causally, an artifact independent of the label is not, and an SAE can isolate one."""

from __future__ import annotations

import pytest

from clipaudit.synthetic import FitnessConfig, measure_fitness


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    (fitness,) = measure_fitness("birds", tmp_path_factory.mktemp("fitness"),
                                 FitnessConfig(n=400, n_pairs=60, n_reference=800),
                                 artifacts=["water"])
    return fitness


@pytest.mark.slow
def test_a_probe_on_the_birds_clip_relies_on_water_planted_on_every_waterbird(water):
    assert water.target_class == "waterbird" and water.planted.n_pairs == 30
    # Landbirds put on water are called waterbirds.
    assert water.planted.accuracy_clean >= 0.8 and water.planted.drop > 0.2
    assert water.planted.relied_on


@pytest.mark.slow
def test_a_probe_does_not_rely_on_water_independent_of_the_label(water):
    # In half of each class: the probe has no reason to use it.
    assert not water.control.relied_on and water.control.accuracy_clean >= 0.8


@pytest.mark.slow
def test_the_clip_sees_water_and_one_sae_component_isolates_it(water):
    assert water.decodable_auc > 0.95 and water.best_component_auc > 0.9
