"""The synthetic worlds, their planted-shortcut and counterfactual data sets, and the tiny CLIP.

- ``worlds``: the registry (``World``, ``list_worlds``, ``get_world``); the dermatology
  world is the one registered today.
- ``world``: the dermatology world: seeded scenes (lesion colour, border and size; skin
  tone; artifacts), rendered as 64 px dermoscopy-like images with a mask per artifact;
  the diagnosis depends on the lesion only.
- ``captions``: varied captions naming what a scene shows.
- ``datasets``: ``make_planted_dataset`` writes images + masks + manifest + column roles +
  ground truth in which a chosen artifact predicts a chosen class at a chosen rate.
- ``counterfactual``: ``make_counterfactual_dataset`` writes pairs of the same scene
  without and with an artifact; ``causal_reliance`` measures a classifier's accuracy drop
  when the artifact sits on the other class.
- ``masks``: where each artifact sits in each image (``load_artifact_mask``).
- ``train``: trains the bundled tiny CLIP on the world (``clipaudit synthetic train-clip``).
- ``quality``: zero-shot accuracies and text geometry of a CLIP on fresh world images.
"""

from clipaudit.synthetic.captions import PHRASES, caption_scene
from clipaudit.synthetic.counterfactual import (
    CausalReliance,
    causal_reliance,
    make_counterfactual_dataset,
)
from clipaudit.synthetic.datasets import (
    MANIFEST_COLUMNS,
    PlantedDataset,
    load_planted_dataset,
    make_planted_dataset,
)
from clipaudit.synthetic.masks import load_artifact_mask, load_artifact_masks
from clipaudit.synthetic.quality import Quality, measure_quality
from clipaudit.synthetic.train import TrainConfig, TrainedClip, train_tiny_clip
from clipaudit.synthetic.world import (
    ARTIFACTS,
    CLASSES,
    IMAGE_SIZE,
    LESION_BORDERS,
    LESION_COLOURS,
    LESION_SIZES,
    SKIN_TONES,
    Rendering,
    Scene,
    diagnosis_of,
    render_scene,
    render_scene_with_masks,
    sample_scene,
)
from clipaudit.synthetic.worlds import World, get_world, list_worlds, register_world

__all__ = [
    "ARTIFACTS",
    "CLASSES",
    "IMAGE_SIZE",
    "LESION_BORDERS",
    "LESION_COLOURS",
    "LESION_SIZES",
    "MANIFEST_COLUMNS",
    "PHRASES",
    "CausalReliance",
    "PlantedDataset",
    "Quality",
    "Rendering",
    "SKIN_TONES",
    "Scene",
    "TrainConfig",
    "TrainedClip",
    "World",
    "caption_scene",
    "causal_reliance",
    "diagnosis_of",
    "get_world",
    "list_worlds",
    "load_artifact_mask",
    "load_artifact_masks",
    "load_planted_dataset",
    "make_counterfactual_dataset",
    "make_planted_dataset",
    "measure_quality",
    "register_world",
    "render_scene",
    "render_scene_with_masks",
    "sample_scene",
    "train_tiny_clip",
]
