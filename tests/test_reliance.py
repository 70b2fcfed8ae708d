"""Concept reliance without the SAE: directions within classes, effects through the head."""

import numpy as np
import pytest
import torch

from clipaudit.findings.reliance import (
    concept_direction,
    head_inputs,
    measure_reliance,
    otsu_threshold,
    presence_from_activation,
)
from clipaudit.heads import LinearProbe

D = 8
CLASS_AXIS, TAG_AXIS = 0, 1


def _data(n: int, tag_rate_by_class: dict[str, float], seed: int = 0, tag: float = 2.0):
    """Embeddings with the class along axis 0 (+-1) and a tag along axis 1 (+2 when
    present), noise elsewhere; the tag's rate may differ per class."""
    g = torch.Generator().manual_seed(seed)
    labels = ["pneumonia" if i % 2 else "normal" for i in range(n)]
    e = 0.3 * torch.randn(n, D, generator=g)
    e[:, 7] += 4.0  # a common offset keeps norms away from zero
    present = np.zeros(n, dtype=np.int8)
    u = torch.rand(n, generator=g)
    for i, label in enumerate(labels):
        e[i, CLASS_AXIS] += 1.0 if label == "pneumonia" else -1.0
        if float(u[i]) < tag_rate_by_class[label]:
            present[i] = 1
            e[i, TAG_AXIS] += tag
    return e, labels, present


def _probe(weight_class: float, weight_tag: float, normalisation: str = "none") -> LinearProbe:
    w = torch.zeros(2, D)
    w[1, CLASS_AXIS], w[1, TAG_AXIS] = weight_class, weight_tag
    w[0] = -w[1]
    return LinearProbe(w, torch.zeros(2), ["normal", "pneumonia"], normalisation=normalisation)


def _reliance(probe, e_ref, labels_ref, tag_ref, e_aud, labels_aud, tag_aud):
    x_ref, w, b = head_inputs(probe, e_ref)
    x_aud, _, _ = head_inputs(probe, e_aud)
    direction = concept_direction(x_ref, tag_ref, labels_ref)
    return {r.class_name: r for r in measure_reliance(direction, "has_tag", "column", x_aud, w, b,
                                                      probe.class_names, labels_aud, tag_aud)}


@pytest.mark.parametrize("normalisation", ["none", "l2"])
def test_head_inputs_reproduce_the_scores(normalisation):
    e, _, _ = _data(50, {"normal": 0.5, "pneumonia": 0.5})
    probe = _probe(1.0, 0.5, normalisation)
    x, w, b = head_inputs(probe, e, batch_size=16)
    assert torch.allclose(x @ w.T + b, probe.scores(e), atol=1e-5)


def test_a_head_that_uses_the_tag_relies_on_it_and_one_that_does_not_does_not():
    """The issue-20 pair: the tag on every pneumonia image (a probe that learnt it) against
    the tag on half of each class (a probe that did not): the direction is measured on a
    clean reference set either way; reliance separates the two, the label cannot."""
    e_ref, l_ref, t_ref = _data(800, {"normal": 0.3, "pneumonia": 0.3}, seed=1)
    e_aud, l_aud, t_aud = _data(600, {"normal": 0.0, "pneumonia": 1.0}, seed=2)
    shortcut = _reliance(_probe(0.2, 1.0), e_ref, l_ref, t_ref, e_aud, l_aud, t_aud)
    assert shortcut["pneumonia"].reliance > 0.5 and shortcut["pneumonia"].flip_rate > 0.5
    assert 0.5 < shortcut["pneumonia"].reliance_low <= shortcut["pneumonia"].reliance
    assert shortcut["normal"].reliance < 0  # the tag pushes away from normal
    e_aud, l_aud, t_aud = _data(600, {"normal": 0.5, "pneumonia": 0.5}, seed=3)
    control = _reliance(_probe(1.0, 0.0), e_ref, l_ref, t_ref, e_aud, l_aud, t_aud)
    assert all(abs(r.reliance) < 0.02 and r.reliance_low < 0.02 for r in control.values())
    assert control["pneumonia"].status == "measured" and control["pneumonia"].slices


def test_the_direction_is_measured_within_classes():
    """On a reference set where the tag sits mostly on pneumonia, the plain difference of
    means would borrow the class axis; the within-class difference does not."""
    e, labels, tag = _data(2000, {"normal": 0.1, "pneumonia": 0.9}, seed=4)
    direction = concept_direction(e, tag, labels)
    assert direction.status == "measured"
    v = direction.vector
    assert v[TAG_AXIS] == pytest.approx(2.0, abs=0.1) and abs(float(v[CLASS_AXIS])) < 0.1
    plain = e[torch.from_numpy(tag == 1)].mean(0) - e[torch.from_numpy(tag == 0)].mean(0)
    assert plain[CLASS_AXIS] > 1.0


def test_a_tag_confined_to_one_class_is_confounded_and_too_few_is_said():
    e, labels, tag = _data(400, {"normal": 0.0, "pneumonia": 1.0})
    confounded = concept_direction(e, tag, labels)
    assert confounded.status == "confounded" and confounded.vector is None
    assert "no class has both" in confounded.note
    few = concept_direction(e, np.where(np.arange(400) < 3, 1, 0).astype(np.int8), labels)
    assert few.status == "too-few"
    # 100 classes of 4: the tag occurs in and out of most of them, but no class can hold
    # 10 of each; that is too few images per class, not a confound
    small = [f"class {i // 4}" for i in range(400)]
    thin = concept_direction(e, (np.arange(400) % 2).astype(np.int8), small)
    assert thin.status == "too-few" and "more reference images per class" in thin.note
    assert "the class with most of it has 200 with and 0 without" in confounded.note
    # a class with 17 with and 7 without is mixed: more images of it would measure the tag
    labels_24 = ["class 0" if i < 24 else f"class {i}" for i in range(400)]
    few_without = concept_direction(e, np.where(np.arange(400) < 17, 1, 0).astype(np.int8),
                                    labels_24)
    assert few_without.status == "too-few", few_without.note
    probe = _probe(1.0, 0.0)
    x, w, b = head_inputs(probe, e)
    rows = measure_reliance(confounded, "has_tag", "column", x, w, b, probe.class_names, labels)
    assert {r.status for r in rows} == {"confounded"} and all(r.reliance is None for r in rows)


def test_without_labels_the_predictions_stand_in():
    e_ref, l_ref, t_ref = _data(400, {"normal": 0.5, "pneumonia": 0.5}, seed=5)
    e_aud, _, t_aud = _data(400, {"normal": 0.0, "pneumonia": 1.0}, seed=6)
    got = _reliance(_probe(0.2, 1.0), e_ref, l_ref, t_ref, e_aud, [None] * 400, t_aud)
    assert got["pneumonia"].reliance > 0.5 and "predictions stand in" in got["pneumonia"].detail


def test_otsu_splits_a_bimodal_activation_and_presence_follows_it():
    g = torch.Generator().manual_seed(0)
    act = torch.cat([torch.zeros(500), 0.2 + 0.05 * torch.rand(200, generator=g),
                     3.0 + torch.rand(300, generator=g)])
    t = otsu_threshold(act[act > 0])
    assert 0.2 < t < 3.0  # the top of the lower group
    presence, threshold = presence_from_activation(act, "tag", "components 3")
    assert threshold == t and int(presence.values.sum()) == 300
    again, _ = presence_from_activation(act[:600], "tag", "components 3", threshold)
    assert int(again.values.sum()) == 0


def test_the_lower_bound_separates_a_weak_reliance_from_noise():
    """A faint tag (0.3 against noise of 0.3 per axis) that a probe leans on: the fewer
    reference images estimate its direction, the wider the bootstrap interval, so the
    further the lower bound sits below the estimate."""
    e_aud, l_aud, t_aud = _data(600, {"normal": 0.0, "pneumonia": 1.0}, seed=8, tag=0.3)
    probe = _probe(0.3, 1.0)
    bounds = {}
    for n_ref in (4000, 60):
        e_ref, l_ref, t_ref = _data(n_ref, {"normal": 0.3, "pneumonia": 0.3}, seed=9, tag=0.3)
        got = _reliance(probe, e_ref, l_ref, t_ref, e_aud, l_aud, t_aud)["pneumonia"]
        assert got.reliance_low <= got.reliance
        bounds[n_ref] = got.reliance - got.reliance_low
    assert bounds[60] > 2 * bounds[4000]


def test_head_reliance_reads_labels_through_the_label_map():
    """With ``--label-map`` the data's labels are not the head's class names; reliance must
    map them as the attributions do, not fall back to the head's predictions."""
    import pandas as pd

    from clipaudit.findings.concept_evidence import (
        ConceptInputs,
        ConceptPresence,
        InstanceSet,
        head_reliance,
    )
    from clipaudit.findings.reliance import Presence

    e_ref, labels_ref, tag_ref = _data(400, {"normal": 0.5, "pneumonia": 0.5}, seed=1)
    e_aud, labels_aud, tag_aud = _data(400, {"normal": 0.0, "pneumonia": 0.0}, seed=2)
    probe = _probe(1.0, 1.5)
    raw = {"normal": "healthy", "pneumonia": "sick"}  # what the data calls the classes

    def instances(e, labels):
        return InstanceSet(torch.arange(len(e)), e, e, labels, pd.DataFrame(index=range(len(e))),
                           torch.zeros(len(e), 1, dtype=torch.long), torch.zeros(len(e), 1))

    def reliance(labels_of, to_class):
        inputs = ConceptInputs(instances(e_ref, [labels_of(x) for x in labels_ref]),
                               instances(e_aud, [labels_of(x) for x in labels_aud]),
                               None, None, None, [], torch.zeros(0, D))  # type: ignore[arg-type]
        presence = ConceptPresence(Presence("has_tag", "column", tag_ref), True, tag_aud)
        return head_reliance(probe, inputs, [presence], to_class)

    named = reliance(lambda x: x, None)
    mapped = reliance(lambda x: raw[x], {v: k for k, v in raw.items()})
    assert mapped == named
    assert not any("predictions stand in" in r.detail for r in mapped)
    assert max(r.reliance for r in named) > 0.05  # the probe leans on the tag: labels matter
