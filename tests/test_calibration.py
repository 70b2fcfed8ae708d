"""Calibrated alignment: the same number on any CLIP, anchored on the class's own images."""

import math

import pytest
import torch

from clipaudit.describe.calibration import calibrate, label_centroids

D = 6


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _world(n_per_class: int = 40, seed: int = 0):
    """Reference images of two classes along axes 0 and 1, sharing a domain axis 5."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for axis, name in ((0, "cat"), (1, "dog")):
        base = torch.zeros(D)
        base[axis], base[5] = 1.0, 2.0
        rows.append(base + 0.1 * torch.randn(n_per_class, D, generator=g))
        labels += [name] * n_per_class
    return torch.cat(rows), labels


def _aligner(scale: float = 1.0, offset: float = 0.0):
    """alpha(x, c) for class texts along axes 0 (cat) and 1 (dog) on a 'CLIP' whose raw
    alignments are scaled and offset (another model's scale), as describe does it."""
    texts = torch.eye(D)[:2]

    def class_alpha(x: torch.Tensor) -> torch.Tensor:
        x = _unit(x)
        return scale * (x @ texts.T) + offset + 0.3 * x[:, 5:6]  # domain term shared by classes

    return class_alpha


def test_anchors_map_to_one_and_a_shared_artifact_to_zero():
    ref, labels = _world()
    centroids = label_centroids(ref, labels)
    semantic = _unit(torch.stack([
        centroids.get("cat")[0],                          # the cat images themselves
        torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 2.0]),     # an artifact on every class
        torch.tensor([0.5, 0.5, 0.0, 0.0, 1.0, 2.0]),     # half cat, half dog
    ]))
    alpha = _aligner()(semantic)
    cal = calibrate(alpha, ["cat", "dog"], _aligner(), centroids).calibrated
    assert cal[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert cal[0, 1] < 0  # the cat images are less aligned with dog than with cat
    assert cal[1].abs().max() < 1e-5 and cal[2].abs().max() < 1e-5


def test_the_same_calibrated_alignment_on_a_clip_of_another_scale():
    """A CLIP whose raw alignments are 3x larger and offset by +0.4 (every component
    between 0.2 and 0.6 on it) gives the same calibrated values: a threshold in this unit
    means the same on both."""
    ref, labels = _world()
    centroids = label_centroids(ref, labels)
    semantic = _unit(torch.randn(20, D, generator=torch.Generator().manual_seed(3)))
    a = calibrate(_aligner()(semantic), ["cat", "dog"], _aligner(), centroids)
    other = _aligner(scale=3.0, offset=0.4)
    b = calibrate(other(semantic), ["cat", "dog"], other, centroids)
    raw_a, raw_b = _aligner()(semantic), other(semantic)
    assert not torch.allclose(raw_a, raw_b)
    assert torch.allclose(a.calibrated, b.calibrated, atol=1e-5)
    assert [c.source for c in a.classes] == ["labels", "labels"]


def test_without_labels_the_reference_clip_assigns_the_anchor_images():
    ref, labels = _world()
    centroids = label_centroids(ref, None)
    semantic = _unit(torch.eye(D)[:2] + torch.tensor([0, 0, 0, 0, 0, 2.0]))
    result = calibrate(_aligner()(semantic), ["cat", "dog"], _aligner(), centroids, ref)
    assert [c.source for c in result.classes] == ["zero-shot", "zero-shot"]
    assert [c.n for c in result.classes] == [40, 40]
    assert result.calibrated[0, 0] > 0.9 and result.calibrated[1, 1] > 0.9
    no_fallback = calibrate(_aligner()(semantic), ["cat", "dog"], _aligner(), centroids)
    assert torch.isnan(no_fallback.calibrated).all()
    assert all(c.source.startswith("uncalibrated") for c in no_fallback.classes)


def test_a_class_whose_own_images_do_not_favour_it_is_uncalibrated():
    """Labels that the CLIP's texts contradict (cat images labelled dog and vice versa):
    the anchor's contrast is negative, the class is not calibrated, nothing is guessed."""
    ref, labels = _world()
    swapped = ["dog" if x == "cat" else "cat" for x in labels]
    result = calibrate(_aligner()(torch.eye(D)[:3]), ["cat", "dog"], _aligner(),
                       label_centroids(ref, swapped), ref, swapped)
    assert torch.isnan(result.calibrated).all()
    for c in result.classes:
        assert c.margin is not None and c.margin < 0
        assert "do not favour" in c.source and c.zero_shot_recall == 0.0


def test_one_class_is_contrasted_with_the_reference_set_as_a_whole():
    ref, labels = _world()
    centroids = label_centroids(ref, labels)

    def cat_only(x):
        return _aligner()(x)[:, :1]

    semantic = _unit(torch.stack([centroids.get("cat")[0], centroids.overall]))
    result = calibrate(cat_only(semantic), ["cat"], cat_only, centroids)
    assert result.calibrated[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert result.calibrated[1, 0] == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(result.classes[0].margin)
