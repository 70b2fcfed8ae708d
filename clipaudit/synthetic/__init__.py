"""The synthetic dermatology world, its planted-shortcut data sets and the tiny CLIP.

- ``world``: seeded scenes (lesion colour, border and size; skin tone; artifacts),
  rendered as 64 px dermoscopy-like images; the diagnosis depends on the lesion only.
- ``captions``: varied captions naming what a scene shows.
- ``datasets``: ``make_planted_dataset`` writes images + manifest + ground truth in
  which a chosen artifact predicts a chosen class at a chosen rate.
- ``train``: trains the bundled tiny CLIP on the world (``clipaudit synthetic train-clip``).
- ``quality``: zero-shot accuracies and text geometry of a CLIP on fresh world images.
"""

from clipaudit.synthetic.captions import PHRASES, caption_scene
from clipaudit.synthetic.datasets import (
    MANIFEST_COLUMNS,
    PlantedDataset,
    load_planted_dataset,
    make_planted_dataset,
)
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
    Scene,
    diagnosis_of,
    render_scene,
    sample_scene,
)

__all__ = [
    "ARTIFACTS",
    "CLASSES",
    "IMAGE_SIZE",
    "LESION_BORDERS",
    "LESION_COLOURS",
    "LESION_SIZES",
    "MANIFEST_COLUMNS",
    "PHRASES",
    "PlantedDataset",
    "Quality",
    "SKIN_TONES",
    "Scene",
    "TrainConfig",
    "TrainedClip",
    "caption_scene",
    "diagnosis_of",
    "load_planted_dataset",
    "make_planted_dataset",
    "measure_quality",
    "render_scene",
    "sample_scene",
    "train_tiny_clip",
]
