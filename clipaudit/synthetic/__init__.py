"""The synthetic worlds, their planted-shortcut and counterfactual data sets, and the tiny CLIP.

- ``worlds``: the registry (``World``, ``list_worlds``, ``get_world``): ``dermatology``
  (the default) and ``birds``.
- ``world``: the dermatology world: seeded scenes (lesion colour, border and size; skin
  tone; artifacts), rendered as 64 px dermoscopy-like images with a mask per artifact;
  the diagnosis depends on the lesion only.
- ``birds``: the birds world (Waterbirds-like): landbirds and waterbirds of eight species
  on land or water at three times of day, with boats, branches, film grain, frames and
  watermarks, rendered at 72 px with a mask per artifact; the label is the bird's kind.
- ``captions``, ``birds_captions``: varied captions naming what a scene shows.
- ``datasets``: ``make_planted_dataset`` writes images + masks + manifest + column roles +
  ground truth in which a chosen artifact predicts a chosen class at a chosen rate.
- ``counterfactual``: ``make_counterfactual_dataset`` writes pairs of the same scene
  without and with an artifact; ``causal_reliance`` measures a classifier's accuracy drop
  when the artifact sits on the other class.
- ``masks``: where each artifact sits in each image (``load_artifact_mask``).
- ``train``: trains a world's bundled tiny CLIP on that world (``clipaudit synthetic
  train-clip --world``): ``tiny-derm-clip``, ``tiny-birds-clip``.
- ``quality``, ``birds_quality``: zero-shot accuracies and text geometry of a CLIP on
  fresh world images.
- ``fitness``: whether a world and its CLIP make a benchmark: a probe relies on a planted
  artifact and not on an independent one; how well an SAE isolates each artifact.
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
from clipaudit.synthetic.fitness import ArtifactFitness, FitnessConfig, measure_fitness
from clipaudit.synthetic.masks import load_artifact_mask, load_artifact_masks
from clipaudit.synthetic.quality import Quality, measure_quality
from clipaudit.synthetic.train import RECIPES, ClipRecipe, TrainConfig, TrainedClip, train_tiny_clip
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
    "ArtifactFitness",
    "CLASSES",
    "ClipRecipe",
    "IMAGE_SIZE",
    "LESION_BORDERS",
    "LESION_COLOURS",
    "LESION_SIZES",
    "MANIFEST_COLUMNS",
    "PHRASES",
    "CausalReliance",
    "FitnessConfig",
    "PlantedDataset",
    "Quality",
    "RECIPES",
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
    "measure_fitness",
    "measure_quality",
    "register_world",
    "render_scene",
    "render_scene_with_masks",
    "sample_scene",
    "train_tiny_clip",
]
