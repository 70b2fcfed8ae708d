"""Captions of world scenes: varied templates, word order and synonyms.

Each attribute is named often but not always, so the text tower learns every
concept on its own and from many phrasings; artifacts that are present are named
most of the time, absent ones are now and then named as absent ("no ruler").
The word lists double as the zero-shot prompt vocabulary (``PHRASES``).
"""

from __future__ import annotations

import numpy as np

from clipaudit.synthetic.world import ARTIFACTS, Scene

PHRASES: dict[str, tuple[str, ...]] = {
    # skin tones
    "fair": ("fair skin", "pale skin", "light skin"),
    "olive": ("olive skin", "medium skin", "olive-toned skin"),
    "dark": ("dark skin", "deeply pigmented skin", "dark-toned skin"),
    # lesion colours
    "tan": ("tan", "light tan", "tan-coloured"),
    "brown": ("brown", "chocolate brown", "brown-coloured"),
    "black": ("black", "jet black", "black-coloured"),
    "red": ("red", "reddish", "red-coloured"),
    # borders
    "regular": ("regular border", "smooth border", "round outline"),
    "irregular": ("irregular border", "ragged border", "jagged outline"),
    # sizes
    "small": ("small", "tiny", "small-sized"),
    "medium": ("medium-sized", "mid-sized", "moderate"),
    "large": ("large", "big", "large-sized"),
    # diagnoses
    "benign": ("benign nevus", "benign mole", "harmless mole", "benign lesion", "nevus"),
    "malignant": ("malignant melanoma", "melanoma", "malignant lesion", "skin cancer",
                  "cancerous melanoma"),
    # artifacts
    "ruler": ("a ruler", "a measuring ruler", "a ruler scale"),
    "band_aid": ("a band-aid", "an adhesive plaster", "a band aid"),
    "ink_marker": ("skin marker ink", "a purple ink marking", "a skin marker", "an ink marker"),
    "hair": ("hair", "hairs", "body hair"),
    "vignette": ("dark vignette corners", "dark corners", "a vignette"),
}
"""Synonyms of every attribute value, keyed by the value's name."""

_ABSENT = {"ruler": "no ruler", "band_aid": "no band-aid", "ink_marker": "no skin marker",
           "hair": "no hair", "vignette": "no dark corners"}
_OPENERS = ("a dermoscopy image of", "dermoscopy of", "a close-up photo of", "an image of",
            "a skin photo of")

# How often each part is named (presence of artifacts far more often than absence).
P_SKIN, P_COLOUR, P_BORDER, P_SIZE, P_DIAGNOSIS = 0.8, 0.85, 0.95, 0.7, 0.8
P_ARTIFACT, P_ABSENT = 0.9, 0.1
P_KEYWORDS = 0.15
"""Share of captions that are a few bare keywords ("ruler", "melanoma, dark skin"): they
teach the text tower the short phrases that concept vocabularies are made of."""


def _pick(rng: np.random.Generator, key: str) -> str:
    options = PHRASES[key]
    return options[int(rng.integers(len(options)))]


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene``, drawn from ``rng``."""
    if rng.random() < P_KEYWORDS:
        return _keywords(scene, rng)
    adjectives = []
    if rng.random() < P_SIZE:
        adjectives.append(_pick(rng, scene.lesion_size))
    if rng.random() < P_COLOUR:
        adjectives.append(_pick(rng, scene.lesion_colour))
    noun = "lesion" if rng.random() < 0.6 else "skin lesion"
    clauses = []
    if rng.random() < P_BORDER:
        border = _pick(rng, scene.lesion_border)
        clauses.append(f"with {'an' if border[0] in 'aeiou' else 'a'} {border}")
    if rng.random() < P_SKIN:
        clauses.append(f"on {_pick(rng, scene.skin_tone)}")
    present = [a for a in ARTIFACTS if a in scene.artifacts and rng.random() < P_ARTIFACT]
    absent = [a for a in ARTIFACTS if a not in scene.artifacts and rng.random() < P_ABSENT]
    things = [_pick(rng, a) for a in present]
    if things:
        clauses.append(f"with {_join(rng.permutation(things).tolist())}")
    clauses += [_ABSENT[a] for a in absent]
    rng.shuffle(clauses)
    body = " ".join([*adjectives, noun])
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    text = f"{opener} a {body}" + "".join(f", {c}" if rng.random() < 0.5 else f" {c}"
                                            for c in clauses)
    if rng.random() < P_DIAGNOSIS:
        diagnosis = _pick(rng, scene.diagnosis)
        text = f"{diagnosis}: {text}" if rng.random() < 0.3 else f"{text}, {diagnosis}"
    return text


def _keywords(scene: Scene, rng: np.random.Generator) -> str:
    words = [_pick(rng, scene.skin_tone), f"{_pick(rng, scene.lesion_colour)} lesion",
             _pick(rng, scene.lesion_border), _pick(rng, scene.diagnosis)]
    words += [_bare(_pick(rng, a)) for a in ARTIFACTS if a in scene.artifacts]
    chosen = rng.choice(len(words), size=min(len(words), int(rng.integers(1, 4))), replace=False)
    return ", ".join(words[i] for i in chosen)


def _bare(phrase: str) -> str:
    for article in ("a ", "an "):
        if phrase.startswith(article):
            return phrase[len(article):]
    return phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
