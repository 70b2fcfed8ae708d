"""When a component's nearest concept is not a description of it: ``unlabelled (closest: TERM)``.

A concept label is the vocabulary term the component's semantic embedding aligns with
most (DESIGN.md section 2). Some term is always nearest, even when the vocabulary
has nothing to say about the component (product-photo components labelled with words
of a dermatology list), and such an accidental label must never match a forbidden or
expected concept of a rule file.

The floor is set by the model itself, not by a cosine tuned to one CLIP: the same
vocabulary's phrases with the letters of each word shuffled (``ruler`` ->
``lrure``), as many as two per concept (at least 64, at most 512), seeded. They have
the vocabulary's letters, lengths and tokens but no meaning. A component keeps its
label only when its best term aligns with it more than every scrambled phrase does;
otherwise it is ``unlabelled (closest: TERM)``. Were the vocabulary's terms as
meaningless for the component as the scrambles, the best term would beat all of them
in at most a third of the components (V real against 2V scrambled draws).

A label spelled ``unlabelled (closest: ...)`` matches no concept list (forbidden,
expected, waivers); the component can still be a plain shortcut finding.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

LabelFloor = Literal["scrambled", "off"]
LABEL_FLOORS: tuple[str, ...] = ("scrambled", "off")

_PREFIX = "unlabelled (closest: "
_SUFFIX = ")"
_MIN_NULL, _MAX_NULL, _PER_CONCEPT = 64, 512, 2


def unlabelled_label(closest: str) -> str:
    """The label of a component no vocabulary term describes."""
    return f"{_PREFIX}{closest}{_SUFFIX}"


def is_unlabelled(label: str) -> bool:
    """Whether ``label`` says no vocabulary term describes the component."""
    return label.startswith(_PREFIX) and label.endswith(_SUFFIX)


def closest_term(label: str) -> str:
    """The nearest term of an unlabelled component's label (the label itself otherwise)."""
    return label[len(_PREFIX):-len(_SUFFIX)] if is_unlabelled(label) else label


def scrambled_phrases(phrases: Sequence[str], n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` phrases drawn from ``phrases`` with the letters of each word shuffled
    (default n: two per phrase, at least 64, at most 512); the same inputs give the
    same phrases."""
    if not phrases:
        return []
    n = n if n is not None else min(max(_PER_CONCEPT * len(phrases), _MIN_NULL), _MAX_NULL)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(list(phrases)).split()
        out.append(" ".join("".join(rng.sample(w, len(w))) for w in words))
    return out


def apply_label_floor(concepts: list[str], scores: Tensor, null_scores: Tensor) -> list[str]:
    """``unlabelled (closest: TERM)`` where a component's best score [n_latents] is not
    above its best alignment with the scrambled phrases ``null_scores`` [n_latents, N].
    Dead components ("" label) stay as they are."""
    floor = null_scores.max(dim=1).values if null_scores.numel() else torch.full_like(scores, -torch.inf)
    return [c if not c or float(s) > float(f) else unlabelled_label(c)
            for c, s, f in zip(concepts, scores.tolist(), floor.tolist())]
