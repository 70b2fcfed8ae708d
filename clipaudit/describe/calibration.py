"""Alignment on a scale the model defines: calibrated class alignment.

The raw alignment of DESIGN.md, alpha(j, c) = cos(s_j, T(c)) - cos(s_j, T("")), has a
scale of its own on every CLIP: on the bundled tiny CLIP components sit between -0.2
and +0.15, on another CLIP every component (colour and background ones included)
sits between 0.2 and 0.6. A fixed threshold on it means something different on each
model. The calibrated alignment measures it against two anchors the audit computes
for the model at hand, from the reference set:

    contrast(x, c)   = alpha(x, c) - mean over the other classes c' of alpha(x, c')
    calibrated(j, c) = contrast(s_j, c) / contrast(a_c, c)

where a_c is the class's anchor: the unit mean of the reference CLIP's embeddings of
the reference images of class c (by label; where the reference set has no labels for
the class, the images the reference CLIP itself assigns to it, zero-shot). So

- 0 means the component is no more aligned with the class than with the other
  classes (an artifact that sits on images of every class, whatever the CLIP);
- 1 means it is as aligned with the class as the class's own images are;

and a threshold such as 0.5 reads the same on any CLIP. The contrast with the other
classes cancels what every class text shares (the "a photo of" offset, the domain):
the reason raw alignments of unrelated components were high on other CLIPs. With a
single class, the "other class" is the reference set as a whole (its mean image).

A class whose anchor does not favour it (contrast(a_c, c) <= 0: the reference CLIP's
texts do not tell the class's images from the others') cannot be calibrated; its
calibrated alignments are NaN and the audit says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from clipaudit.results import ClassCalibration

TextEncoder = Callable[[list[str]], Tensor]

MIN_ANCHOR_IMAGES = 10
"""Fewest reference images a class anchor is computed from."""


@dataclass(frozen=True)
class LabelCentroids:
    """Unit mean reference embedding per label of the reference set (what anchors are made of)."""

    names: list[str]
    centroids: Tensor
    """float [L, D], unit rows."""
    counts: list[int]
    overall: Tensor
    """float [D]: unit mean of every reference embedding (the single-class null)."""

    def get(self, name: str) -> tuple[Tensor, int] | None:
        if name not in self.names:
            return None
        i = self.names.index(name)
        return self.centroids[i], self.counts[i]


@dataclass(frozen=True)
class Calibration:
    """Calibrated alignment of every component with every class."""

    calibrated: Tensor
    """float [n_latents, C]; NaN for dead components and uncalibrated classes."""
    classes: list[ClassCalibration]


def label_centroids(ref_embeds: Tensor, labels: Sequence[str | None] | None) -> LabelCentroids:
    """Per label, the unit mean of the unit reference embeddings of its images.

    ``ref_embeds`` [N, D] (zero rows: no embedding); ``labels`` one per row or None.
    """
    unit = _unit(ref_embeds.float())
    has = unit.norm(dim=1) > 0
    overall = _unit(unit[has].sum(0)) if bool(has.any()) else torch.zeros(unit.shape[1])
    names, rows, counts = [], [], []
    if labels is not None:
        order = sorted({x for x in labels if x is not None})
        code = {name: i for i, name in enumerate(order)}
        of_row = torch.tensor([code[x] if x is not None else -1 for x in labels], dtype=torch.long)
        keep = (of_row >= 0) & has
        sums = torch.zeros(len(order), unit.shape[1]).index_add_(0, of_row[keep], unit[keep])
        n = torch.bincount(of_row[keep], minlength=len(order))
        for i, name in enumerate(order):
            if int(n[i]) == 0:
                continue
            names.append(name)
            rows.append(_unit(sums[i]))
            counts.append(int(n[i]))
    centroids = torch.stack(rows) if rows else torch.zeros(0, unit.shape[1])
    return LabelCentroids(names, centroids, counts, overall)


def calibrate(alpha_jc: Tensor, class_names: Sequence[str], class_alpha: Callable[[Tensor], Tensor],
              centroids: LabelCentroids, ref_embeds: Tensor | None = None,
              ref_labels: Sequence[str | None] | None = None) -> Calibration:
    """Calibrated alignment [n_latents, C] for the classes of ``alpha_jc``.

    ``class_alpha`` maps unit image-space vectors [n, D] to their class alignment [n, C]
    (the same texts and formula as ``alpha_jc``). Anchors come from the reference labels
    (``centroids``); a class without enough labelled images falls back to the images the
    reference CLIP assigns to it, when ``ref_embeds`` (the reference set, [N, D]) is
    given. With ``ref_labels`` (one per row) each class also gets its zero-shot recall.
    """
    n_classes = len(class_names)
    anchors, sources, counts = _anchors(class_names, class_alpha, centroids, ref_embeds)
    dim = alpha_jc.shape[0]
    calibrated = torch.full((dim, n_classes), torch.nan)
    classes = []
    overall_alpha = class_alpha(centroids.overall[None])[0] if n_classes == 1 else None
    contrast_j = _contrast(alpha_jc, overall_alpha)
    anchored = [c for c in range(n_classes) if anchors[c] is not None]
    anchor_alpha = (class_alpha(torch.stack([anchors[c] for c in anchored]))  # type: ignore[misc]
                    if anchored else torch.zeros(0, n_classes))
    margins = dict(zip(anchored, _contrast(anchor_alpha, overall_alpha)[
        torch.arange(len(anchored)), torch.tensor(anchored, dtype=torch.long)].tolist()))
    recalls = _recalls(class_alpha, ref_embeds, ref_labels, class_names, overall_alpha,
                       [c for c in anchored if sources[c] == "labels"])
    for c, name in enumerate(class_names):
        if anchors[c] is None:
            classes.append(ClassCalibration(name, None, sources[c], counts[c]))
            continue
        margin = margins[c]
        recall = recalls.get(c)
        if not margin > 0:
            classes.append(ClassCalibration(
                name, margin, f"uncalibrated: the reference CLIP's texts do not favour the "
                f"class's own images (contrast {margin:+.4f}, {sources[c]})", counts[c], recall))
            continue
        calibrated[:, c] = contrast_j[:, c] / margin
        classes.append(ClassCalibration(name, margin, sources[c], counts[c], recall))
    return Calibration(calibrated, classes)


def _contrast(alpha_nc: Tensor, overall_alpha: Tensor | None) -> Tensor:
    """alpha(x, c) minus the mean alpha(x, c') over the other classes (one class: minus
    the reference set's overall alignment with it)."""
    n_classes = alpha_nc.shape[1]
    if n_classes == 1:
        assert overall_alpha is not None
        return alpha_nc - overall_alpha[None]
    others = (alpha_nc.sum(dim=1, keepdim=True) - alpha_nc) / (n_classes - 1)
    return alpha_nc - others


def _anchors(class_names: Sequence[str], class_alpha: Callable[[Tensor], Tensor],
             centroids: LabelCentroids, ref_embeds: Tensor | None
             ) -> tuple[list[Tensor | None], list[str], list[int]]:
    anchors: list[Tensor | None] = []
    sources, counts = [], []
    zero_shot = None
    for c, name in enumerate(class_names):
        found = centroids.get(name)
        if found is not None and found[1] >= MIN_ANCHOR_IMAGES:
            anchors.append(found[0])
            sources.append("labels")
            counts.append(found[1])
            continue
        if ref_embeds is None:
            anchors.append(None)
            sources.append(f"uncalibrated: fewer than {MIN_ANCHOR_IMAGES} reference images are "
                           "labelled with the class (recompute the descriptions to use zero-shot "
                           "anchors)")
            counts.append(found[1] if found else 0)
            continue
        if zero_shot is None:
            zero_shot = _zero_shot_assignment(class_alpha, ref_embeds, len(class_names))
        unit, assigned = zero_shot
        mask = assigned == c
        n = int(mask.sum())
        if n < MIN_ANCHOR_IMAGES:
            anchors.append(None)
            given = "no reference images" if n == 0 else f"only {n} reference image(s)"
            sources.append(f"uncalibrated: no labels for the class, and the reference CLIP "
                           f"assigns {given} to it (at least {MIN_ANCHOR_IMAGES} are needed)")
        else:
            anchors.append(_unit(unit[mask].sum(0)))
            sources.append("zero-shot")
        counts.append(n)
    return anchors, sources, counts


def _zero_shot_assignment(class_alpha: Callable[[Tensor], Tensor], ref_embeds: Tensor,
                          n_classes: int) -> tuple[Tensor, Tensor]:
    """(unit embeddings, assigned class per row; -1 for rows without an embedding)."""
    unit = _unit(ref_embeds.float())
    has = unit.norm(dim=1) > 0
    assigned = torch.full((unit.shape[0],), -1, dtype=torch.long)
    if bool(has.any()):
        alpha = class_alpha(unit[has])
        if n_classes == 1:  # one class: the images more aligned with it than the set's mean
            overall = class_alpha(_unit(unit[has].sum(0))[None])[0]
            assigned[has] = torch.where(alpha[:, 0] > overall[0], 0, -1)
        else:
            assigned[has] = alpha.argmax(dim=1)
    return unit, assigned


def _recalls(class_alpha: Callable[[Tensor], Tensor], ref_embeds: Tensor | None,
             ref_labels: Sequence[str | None] | None, class_names: Sequence[str],
             overall_alpha: Tensor | None, wanted: Sequence[int]) -> dict[int, float]:
    """Per class of ``wanted`` with labelled reference images, the share of them whose
    contrast favours the class (the class alignment of every labelled image computed
    once, in blocks)."""
    if ref_embeds is None or ref_labels is None or not wanted:
        return {}
    position = {class_names[c]: c for c in wanted}
    unit = _unit(ref_embeds.float())
    of_row = torch.tensor([position.get(x, -1) if x is not None else -1 for x in ref_labels],
                          dtype=torch.long)
    rows = torch.nonzero((of_row >= 0) & (unit.norm(dim=1) > 0)).flatten()
    hits = torch.zeros(len(class_names), dtype=torch.long)
    step = max(1, (1 << 22) // max(1, len(class_names)))
    for s in range(0, len(rows), step):
        part = rows[s:s + step]
        contrast = _contrast(class_alpha(unit[part]), overall_alpha)
        favoured = contrast[torch.arange(len(part)), of_row[part]] > 0
        hits.index_add_(0, of_row[part], favoured.long())
    n = torch.bincount(of_row[rows], minlength=len(class_names))
    return {c: float(hits[c].float() / n[c].float()) for c in wanted if int(n[c]) > 0}


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
