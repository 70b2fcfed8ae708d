"""Captions of birds-world scenes: varied templates, word order and synonyms.

As in the dermatology world (``captions.py``): each attribute is named often but not
always, present artifacts most of the time, absent ones now and then as absent ("no
boat"), and some captions are a few bare keywords. The land background is the water
artifact's absence, so it is named as a place ("on grass"), like the water. The kind
words avoid the background's words ("water bird" would share the token of "water"), as
Waterbirds' own class names do. ``PHRASES`` doubles as the world's prompt vocabulary.
"""

from __future__ import annotations

import numpy as np

from clipaudit.synthetic.birds import ARTIFACTS, BirdScene

PHRASES: dict[str, tuple[str, ...]] = {
    # kinds (the labels)
    "landbird": ("landbird", "songbird", "land bird", "garden bird"),
    "waterbird": ("waterbird", "wading bird", "seabird", "aquatic bird"),
    # species
    "sparrow": ("sparrow", "house sparrow"),
    "crow": ("crow", "raven"),
    "canary": ("canary", "finch"),
    "cardinal": ("cardinal", "northern cardinal"),
    "gull": ("gull", "seagull"),
    "heron": ("heron", "great heron"),
    "cormorant": ("cormorant", "shag"),
    "duck": ("duck", "mallard"),
    # plumage colours
    "brown": ("brown", "brownish"), "black": ("black", "jet black"), "yellow": ("yellow", "bright yellow"),
    "red": ("red", "bright red"), "white": ("white", "pure white"), "grey": ("grey", "pale grey"),
    # times of day
    "day": ("daylight", "daytime", "a sunny day"),
    "dusk": ("dusk", "sunset", "evening light"),
    "night": ("night", "nighttime", "darkness"),
    # backgrounds: land is the absence of the water artifact
    "land": ("grass", "land", "a meadow", "a grassy field"),
    # artifacts
    "water": ("water", "a lake", "a pond", "open water"),
    "boat": ("a boat", "a sailing boat", "a small boat"),
    "branch": ("a branch", "a tree branch", "a twig"),
    "grain": ("film grain", "grainy noise", "a grainy photo"),
    "frame": ("a frame", "a photo frame", "a border"),
    "watermark": ("a watermark", "a copyright stamp", "a text stamp"),
}
"""Synonyms of every attribute value, keyed by the value's name."""

_ABSENT = {"boat": "no boat", "branch": "no branch", "grain": "no grain", "frame": "no frame",
           "watermark": "no watermark"}
_OPENERS = ("a photo of", "a picture of", "a wildlife photo of", "an image of", "a snapshot of")
_PLACES = ("on", "standing on", "by", "in front of")
_TIMES = ("at", "in", "during")
_OBJECTS = ("boat", "frame", "watermark", "grain")
"""Artifacts named in a "with ..." clause; the branch is named as a perch."""

P_SPECIES, P_KIND, P_COLOUR, P_PLACE, P_TIME = 0.8, 0.75, 0.5, 0.85, 0.7
P_ARTIFACT, P_ABSENT = 0.9, 0.1
P_KEYWORDS = 0.15


def _pick(rng: np.random.Generator, key: str) -> str:
    options = PHRASES[key]
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_scene(scene: BirdScene, rng: np.random.Generator) -> str:
    """One caption of ``scene``, drawn from ``rng``."""
    if rng.random() < P_KEYWORDS:
        return _keywords(scene, rng)
    noun = _pick(rng, scene.species) if rng.random() < P_SPECIES else _pick(rng, scene.kind)
    if rng.random() < P_COLOUR:
        noun = f"{_pick(rng, scene.plumage)} {noun}"
    clauses = []
    if "branch" in scene.artifacts and rng.random() < P_ARTIFACT:
        clauses.append(f"perched on {_pick(rng, 'branch')}")
    if rng.random() < P_PLACE:
        place = "water" if "water" in scene.artifacts else "land"
        clauses.append(f"{_PLACES[int(rng.integers(len(_PLACES)))]} {_pick(rng, place)}")
    if rng.random() < P_TIME:
        clauses.append(f"{_TIMES[int(rng.integers(len(_TIMES)))]} {_pick(rng, scene.time_of_day)}")
    present = [a for a in _OBJECTS if a in scene.artifacts and rng.random() < P_ARTIFACT]
    things = [_pick(rng, a) for a in present]
    if things:
        clauses.append(f"with {_join(rng.permutation(things).tolist())}")
    clauses += [_ABSENT[a] for a in _ABSENT if a not in scene.artifacts and rng.random() < P_ABSENT]
    rng.shuffle(clauses)
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    text = f"{opener} {_article(noun)} {noun}" + "".join(
        f", {c}" if rng.random() < 0.5 else f" {c}" for c in clauses)
    if rng.random() < P_KIND:
        kind = _pick(rng, scene.kind)
        text = f"{kind}: {text}" if rng.random() < 0.3 else f"{text}, {_article(kind)} {kind}"
    return text


def _keywords(scene: BirdScene, rng: np.random.Generator) -> str:
    place = "water" if "water" in scene.artifacts else "land"
    words = [_pick(rng, scene.species), _pick(rng, scene.kind), _pick(rng, place),
             _pick(rng, scene.time_of_day), f"{_pick(rng, scene.plumage)} bird"]
    words += [_bare(_pick(rng, a)) for a in ARTIFACTS if a in scene.artifacts and a != "water"]
    chosen = rng.choice(len(words), size=min(len(words), int(rng.integers(1, 4))), replace=False)
    return ", ".join(words[i] for i in chosen)


def _bare(phrase: str) -> str:
    for article in ("a ", "an "):
        if phrase.startswith(article):
            return phrase[len(article):]
    return phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
