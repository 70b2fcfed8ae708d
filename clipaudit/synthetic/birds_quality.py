"""How well a CLIP knows the birds world: zero-shot accuracies and text geometry.

Measured as for the dermatology world (``quality.py``): fresh images of a seed the model
was not trained on, balanced kinds, every artifact at 50 %, prompt ensembles per class,
and text geometry relative to the empty prompt. ``text_separation`` is the margin by
which the words of one kind are closer to each other than any artifact word (the water
background's included) is to any kind word.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.birds import (
    ARTIFACTS,
    CLASSES,
    PLUMAGES,
    TIMES_OF_DAY,
    BirdScene,
    render_scene,
    sample_scene,
)
from clipaudit.synthetic.birds_captions import PHRASES
from clipaudit.synthetic.quality import (
    centred_text,
    class_embeddings,
    encode_images,
    zero_shot_accuracy,
)

ARTIFACT_WORDS: dict[str, tuple[str, ...]] = {
    "water": ("water", "a lake"),
    "boat": ("boat", "a sailing boat"),
    "branch": ("branch", "a tree branch"),
    "grain": ("film grain", "grainy noise"),
    "frame": ("photo frame", "a border"),
    "watermark": ("watermark", "a copyright stamp"),
}
"""Plain artifact words, as a user's concept vocabulary would have them."""

KIND_WORDS: dict[str, tuple[str, ...]] = {
    "landbird": ("landbird", "songbird", "land bird"),
    "waterbird": ("waterbird", "wading bird", "seabird"),
}
"""Plain words of the two kinds (the classes)."""

_KIND_TEMPLATES = ("a photo of a {}", "{}", "a wildlife photo of a {}")
_PLUMAGE_TEMPLATES = ("a photo of a {} bird", "a {} bird")
_TIME_TEMPLATES = ("a photo of a bird at {}", "a bird in {}", "{}")
_WITH_TEMPLATES = ("a photo of a bird with {}", "a bird with {}")
_BACKGROUND_TEMPLATES = ("a photo of a bird on {}", "a bird standing on {}")
_WITHOUT_PROMPTS = {a: (f"a photo of a bird, no {a}", f"a bird, no {a}")
                    for a in ("boat", "branch", "grain", "frame", "watermark")}
_BRANCH_PROMPTS = ("a photo of a bird perched on {}", "a bird perched on {}")


@dataclass(frozen=True)
class BirdsQuality:
    """Zero-shot accuracies on fresh birds-world images and the text-geometry margin."""

    n_images: int
    """Images measured on."""
    seed: int
    """Seed of those images."""
    kind: float
    """Accuracy of landbird vs waterbird prompts (the label)."""
    plumage: float
    """Accuracy over the six plumage colours."""
    time_of_day: float
    """Accuracy over day, dusk and night."""
    artifacts: dict[str, float]
    """Per artifact, accuracy of 'with X' vs 'no X' prompts (balanced presence); for water,
    'on water' vs 'on grass'."""
    text_separation: float
    """min cos(kind synonyms) - max cos(artifact word, kind word), centred."""
    artifact_kind_cos: float
    """max cos(artifact word, kind word), centred on the empty prompt."""

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["artifacts"] = {k: round(v, 4) for k, v in self.artifacts.items()}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

    def summary(self) -> str:
        """One line of the accuracies, as ``clipaudit synthetic train-clip`` prints them."""
        return (f"zero-shot accuracy on {self.n_images} fresh images: bird kind {self.kind:.3f}, "
                f"plumage {self.plumage:.3f}, time of day {self.time_of_day:.3f}, artifacts "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.artifacts.items())
                + f"; text separation (artifact vs kind words) {self.text_separation:+.3f}")


def fresh_scenes(seed: int, n: int) -> tuple[list[BirdScene], list[np.ndarray]]:
    """``n`` scenes with balanced kinds and each artifact at 50 %, and their images."""
    scenes, images = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, label=CLASSES[i % 2], artifact_probs={a: 0.5 for a in ARTIFACTS})
        scenes.append(scene)
        images.append(render_scene(scene, rng))
    return scenes, images


def _prompts(templates: tuple[str, ...], key: str) -> list[str]:
    return [t.format(p) for t in templates for p in PHRASES[key]]


def artifact_prompts(artifact: str) -> list[list[str]]:
    """[prompts without, prompts with] ``artifact``."""
    if artifact == "water":
        return [_prompts(_BACKGROUND_TEMPLATES, "land"), _prompts(_BACKGROUND_TEMPLATES, "water")]
    with_ = _prompts(_BRANCH_PROMPTS if artifact == "branch" else _WITH_TEMPLATES, artifact)
    return [list(_WITHOUT_PROMPTS[artifact]), with_]


def text_geometry(backbone) -> tuple[float, float]:
    """(min centred cos between words of one kind, max centred cos between an artifact
    word and a kind word)."""
    within = min(float((centred_text(backbone, ws) @ centred_text(backbone, ws).T).min())
                 for ws in KIND_WORDS.values())
    kinds = centred_text(backbone, [w for ws in KIND_WORDS.values() for w in ws])
    arts = centred_text(backbone, [w for ws in ARTIFACT_WORDS.values() for w in ws])
    return within, float((arts @ kinds.T).max())


def measure_birds_quality(backbone, *, seed: int = 12345, n: int = 1000,
                          reporter: Reporter = NULL_REPORTER) -> BirdsQuality:
    """Zero-shot accuracies of ``backbone`` on ``n`` fresh birds-world images of ``seed``."""
    with reporter.task("measuring tiny CLIP quality", total=2) as task:
        scenes, images = fresh_scenes(seed, n)
        img = encode_images(backbone, images)
        task.advance(1)

        def accuracy(prompts: list[list[str]], truth: list[int]) -> float:
            return zero_shot_accuracy(img, class_embeddings(backbone, prompts), truth)

        kind = accuracy([_prompts(_KIND_TEMPLATES, c) for c in CLASSES],
                        [CLASSES.index(s.kind) for s in scenes])
        plumage = accuracy([_prompts(_PLUMAGE_TEMPLATES, p) for p in PLUMAGES],
                           [PLUMAGES.index(s.plumage) for s in scenes])
        time_of_day = accuracy([_prompts(_TIME_TEMPLATES, t) for t in TIMES_OF_DAY],
                               [TIMES_OF_DAY.index(s.time_of_day) for s in scenes])
        artifacts = {a: accuracy(artifact_prompts(a), [int(a in s.artifacts) for s in scenes])
                     for a in ARTIFACTS}
        task.advance(1)
    within, across = text_geometry(backbone)
    return BirdsQuality(n_images=n, seed=seed, kind=kind, plumage=plumage,
                        time_of_day=time_of_day, artifacts=artifacts,
                        text_separation=within - across, artifact_kind_cos=across)


def kind_accuracy_with_prompts(backbone, prompts_by_class: list[list[str]], *, seed: int,
                               n: int, plumages: tuple[str, ...] = PLUMAGES) -> float:
    """Accuracy of a prompt set (one list of prompts per class, in ``CLASSES`` order) on
    the birds of ``plumages`` among ``n`` fresh scenes."""
    scenes, images = fresh_scenes(seed, n)
    keep = [i for i, s in enumerate(scenes) if s.plumage in plumages]
    img = encode_images(backbone, [images[i] for i in keep])
    pred = (img @ class_embeddings(backbone, prompts_by_class).T).argmax(1)
    truth = torch.tensor([CLASSES.index(scenes[i].kind) for i in keep])
    return float((pred == truth).float().mean())
