"""How well a CLIP knows the synthetic world: zero-shot accuracies and text geometry.

Measured on freshly generated images (a seed the model was not trained on), with
prompt ensembles (the normalised mean of the prompts' text embeddings per class, as
in clipaudit's zero-shot head). Artifacts are drawn at 50 % each so that every
presence accuracy is measured on balanced data.

Text geometry: the audit's semantic alignment is only meaningful when the text
tower keeps artifact words apart from diagnosis words. Like the audit's alignment
(which subtracts the empty prompt's score), it is measured on text embeddings
relative to the empty prompt, T(w) - T(""), normalised: raw CLIP text embeddings
all share a large common direction, so their plain cosines are all high.
``text_separation`` is the margin by which the synonyms of one diagnosis are closer
to each other than any artifact word is to any diagnosis word (positive = apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.synthetic.captions import PHRASES
from clipaudit.synthetic.world import (
    ARTIFACTS,
    CLASSES,
    LESION_COLOURS,
    SKIN_TONES,
    Scene,
    render_scene,
    sample_scene,
)

ARTIFACT_WORDS: dict[str, tuple[str, ...]] = {
    "ruler": ("ruler", "a measuring ruler"),
    "band_aid": ("band-aid", "an adhesive plaster"),
    "ink_marker": ("skin marker", "purple ink marking"),
    "hair": ("hair", "body hair"),
    "vignette": ("dark corners", "vignette"),
}
"""Plain artifact words, as a user's concept vocabulary would have them."""

DIAGNOSIS_WORDS: dict[str, tuple[str, ...]] = {
    "malignant": ("malignant", "melanoma", "malignant melanoma"),
    "benign": ("benign", "nevus", "benign nevus"),
}
"""Plain diagnosis words."""

_SKIN_TEMPLATES = ("a dermoscopy image of a lesion on {}", "a skin lesion on {}", "{}")
_COLOUR_TEMPLATES = ("a dermoscopy image of a {} lesion", "a {} skin lesion", "a {} lesion")
_DIAGNOSIS_TEMPLATES = ("a dermoscopy image of a {}", "{}", "a skin lesion, {}")
_WITH_TEMPLATES = ("a dermoscopy image of a lesion with {}", "a skin lesion with {}")
_WITHOUT_PROMPTS = {a: (f"a dermoscopy image of a lesion, {p}", f"a skin lesion, {p}")
                    for a, p in (("ruler", "no ruler"), ("band_aid", "no band-aid"),
                                 ("ink_marker", "no skin marker"), ("hair", "no hair"),
                                 ("vignette", "no dark corners"))}


@dataclass(frozen=True)
class Quality:
    """Zero-shot accuracies on fresh world images and the text-geometry margin."""

    n_images: int
    """Images measured on."""
    seed: int
    """Seed of those images."""
    skin_tone: float
    """Accuracy over the skin tones."""
    lesion_colour: float
    """Accuracy over the lesion colours."""
    diagnosis: float
    """Accuracy of benign vs malignant prompts."""
    artifacts: dict[str, float]
    """Per artifact, accuracy of 'with X' vs 'no X' prompts (balanced presence)."""
    text_separation: float
    """min cos(diagnosis synonyms) - max cos(artifact word, diagnosis word), centred."""
    artifact_diagnosis_cos: float
    """max cos(artifact word, diagnosis word), centred on the empty prompt."""

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["artifacts"] = {k: round(v, 4) for k, v in self.artifacts.items()}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

    def summary(self) -> str:
        """One line of the accuracies, as ``clipaudit synthetic train-clip`` prints them."""
        return (f"zero-shot accuracy on {self.n_images} fresh images: skin tone "
                f"{self.skin_tone:.3f}, lesion colour {self.lesion_colour:.3f}, diagnosis "
                f"{self.diagnosis:.3f}, artifacts "
                + ", ".join(f"{k} {v:.3f}" for k, v in self.artifacts.items())
                + f"; text separation (artifact vs diagnosis words) {self.text_separation:+.3f}")


def fresh_scenes(seed: int, n: int) -> tuple[list[Scene], list[np.ndarray]]:
    """``n`` scenes with balanced classes and each artifact at 50 %, and their images."""
    scenes, images = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, diagnosis=CLASSES[i % 2],
                             artifact_probs={a: 0.5 for a in ARTIFACTS})
        scenes.append(scene)
        images.append(render_scene(scene, rng))
    return scenes, images


def class_embeddings(backbone, prompts_by_class: Sequence[Sequence[str]]) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings."""
    out = []
    for prompts in prompts_by_class:
        emb = torch.nn.functional.normalize(backbone.encode_text(list(prompts)), dim=-1)
        out.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    return torch.stack(out)


@torch.no_grad()
def encode_images(backbone, images: Sequence[np.ndarray], batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings [n, D] through the backbone's own preprocessing."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([backbone.preprocess(Image.fromarray(im))
                             for im in images[start:start + batch_size]])
        out.append(backbone.model.encode_image(batch.to(backbone.device)).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def zero_shot_accuracy(img_nd: torch.Tensor, cls_cd: torch.Tensor, truth: Sequence[int]) -> float:
    """Share of images whose nearest class embedding is the true class."""
    pred = (img_nd @ cls_cd.T).argmax(1)
    return float((pred == torch.tensor(list(truth))).float().mean())


def _phrase_prompts(templates: Sequence[str], key: str) -> list[str]:
    return [t.format(p) for t in templates for p in PHRASES[key]]


def centred_text(backbone, words: Sequence[str]) -> torch.Tensor:
    """Unit text embeddings relative to the empty prompt, normalize(T(w) - T(""))."""
    emb = torch.nn.functional.normalize(backbone.encode_text([*words, ""]), dim=-1)
    return torch.nn.functional.normalize(emb[:-1] - emb[-1:], dim=-1)


def text_geometry(backbone) -> tuple[float, float]:
    """(min centred cos between synonyms of one diagnosis, max centred cos between an
    artifact word and a diagnosis word)."""
    within = min(float((centred_text(backbone, ws) @ centred_text(backbone, ws).T).min())
                 for ws in DIAGNOSIS_WORDS.values())
    diag = centred_text(backbone, [w for ws in DIAGNOSIS_WORDS.values() for w in ws])
    arts = centred_text(backbone, [w for ws in ARTIFACT_WORDS.values() for w in ws])
    return within, float((arts @ diag.T).max())


def measure_quality(backbone, *, seed: int = 12345, n: int = 1000,
                    reporter: Reporter = NULL_REPORTER) -> Quality:
    """Zero-shot accuracies of ``backbone`` on ``n`` fresh world images of ``seed``."""
    with reporter.task("measuring tiny CLIP quality", total=2) as task:
        scenes, images = fresh_scenes(seed, n)
        img = encode_images(backbone, images)
        task.advance(1)
        skin = zero_shot_accuracy(img, class_embeddings(
            backbone, [_phrase_prompts(_SKIN_TEMPLATES, t) for t in SKIN_TONES]),
            [SKIN_TONES.index(s.skin_tone) for s in scenes])
        colour = zero_shot_accuracy(img, class_embeddings(
            backbone, [_phrase_prompts(_COLOUR_TEMPLATES, c) for c in LESION_COLOURS]),
            [LESION_COLOURS.index(s.lesion_colour) for s in scenes])
        diagnosis = zero_shot_accuracy(img, class_embeddings(
            backbone, [_phrase_prompts(_DIAGNOSIS_TEMPLATES, c) for c in CLASSES]),
            [CLASSES.index(s.diagnosis) for s in scenes])
        artifacts = {}
        for a in ARTIFACTS:
            cls = class_embeddings(backbone, [_WITHOUT_PROMPTS[a],
                                              _phrase_prompts(_WITH_TEMPLATES, a)])
            artifacts[a] = zero_shot_accuracy(img, cls, [int(a in s.artifacts) for s in scenes])
        task.advance(1)
    within, across = text_geometry(backbone)
    return Quality(n_images=n, seed=seed, skin_tone=skin, lesion_colour=colour,
                   diagnosis=diagnosis, artifacts=artifacts,
                   text_separation=within - across, artifact_diagnosis_cos=across)
