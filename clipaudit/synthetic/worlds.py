"""The registry of synthetic worlds: what a data-set factory needs to know about one.

A world is a seeded generator of labelled scenes with optional artifacts. Everything
that writes data sets (planted shortcuts, counterfactual pairs, masks, column roles)
reads a ``World`` and nothing world-specific, so a world plugs in by building one
``World`` and calling ``register_world`` (or adding it to ``_WORLDS`` below). Two ship:
``dermatology`` (``world.py``, 64 px, the default) and ``birds`` (``birds.py``, 72 px,
Waterbirds-like), each with its own bundled tiny CLIP, prompt set and concept vocabulary.

What a world's functions must do:

- ``sample_scene(rng, *, label, artifact_probs, forced_artifacts)``: a scene of class
  ``label`` (any class when None), each artifact present with ``artifact_probs[a]``
  unless ``forced_artifacts`` says whether it is. A scene is a frozen dataclass with an
  ``artifacts`` field (a frozenset of artifact names) and a ``metadata()`` method that
  returns the manifest row without ``path`` and ``caption``: ``label`` first, then
  every column of ``metadata_columns`` (one ``has_<artifact>`` per artifact).
- ``render_scene(scene, rng, *, omit=())``: a ``Rendering`` (image and one mask per
  artifact painted), drawing an omitted artifact's layout from ``rng`` without painting
  it, so that a scene rendered with and without ``omit`` differs only inside that
  artifact's mask.
- ``caption_scene(scene, rng)``: one caption of the scene.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BIRDS_MODEL_NAME, TINY_MODEL_NAME
from clipaudit.extraction.columns import ColumnRoles
from clipaudit.resources import package_data_dpath
from clipaudit.synthetic import birds
from clipaudit.synthetic import world as derm
from clipaudit.synthetic.birds_captions import PHRASES as BIRD_PHRASES
from clipaudit.synthetic.birds_captions import caption_scene as caption_bird_scene
from clipaudit.synthetic.captions import PHRASES, caption_scene
from clipaudit.synthetic.world import Rendering


class WorldScene(Protocol):
    """What the data-set factories read from a world's scenes."""

    @property
    def artifacts(self) -> frozenset[str]: ...

    def metadata(self) -> dict[str, Any]: ...


class SampleScene(Protocol):
    def __call__(self, rng: np.random.Generator, *, label: str | None = None,
                 artifact_probs: Mapping[str, float] | None = None,
                 forced_artifacts: Mapping[str, bool] | None = None) -> Any: ...


class RenderScene(Protocol):
    def __call__(self, scene: Any, rng: np.random.Generator, *,
                 omit: Collection[str] = ()) -> Rendering: ...


@dataclass(frozen=True)
class World:
    """One synthetic world: its classes, artifacts, generator and bundled CLIP."""

    name: str
    """Registry name (``--world NAME``)."""
    description: str
    """One line for listings."""
    classes: tuple[str, ...]
    """Class names; a scene's label is a function of the scene's non-artifact attributes."""
    artifacts: tuple[str, ...]
    """Artifact names; bit ``i`` of a mask PNG is ``artifacts[i]``."""
    localised_artifacts: tuple[str, ...]
    """Artifacts that sit in one place (a heatmap can point at them)."""
    diffuse_artifacts: tuple[str, ...]
    """Artifacts spread over the image."""
    image_size: int
    """Side of the square images in pixels."""
    sample_scene: SampleScene
    render_scene: RenderScene
    caption_scene: Callable[[Any, np.random.Generator], str]
    metadata_columns: tuple[str, ...]
    """Manifest columns after ``path``, ``label`` and ``caption``."""
    protected_columns: tuple[str, ...]
    """Metadata columns a classifier must not rely on (declared in ``columns.yaml``)."""
    label_rule: str
    """The ground-truth rule, in words."""
    clip_model: str
    """The bundled CLIP trained on this world (a ``--model`` name)."""
    default_artifact: str
    """Artifact planted when none is named."""
    default_target_class: str
    """Class the planted artifact co-occurs with when none is named."""
    phrases: Mapping[str, tuple[str, ...]]
    """Synonyms of every attribute value (the world's prompt vocabulary)."""
    label_columns: tuple[str, ...] = ()
    """Metadata columns the label is a function of: declared ``ignore`` (relying on them
    is the task, not a shortcut)."""
    prompts: str | None = None
    """The shipped zero-shot prompt set of its classes (``clipaudit/_data/prompts/NAME.yaml``)."""
    vocabularies: tuple[str, ...] = ()
    """Shipped concept vocabularies that name its artifacts and attributes."""
    filter_artifacts: tuple[str, ...] = ()
    """Diffuse artifacts that change pixels without covering them (film grain): their masks
    overlap the masks of the artifacts under them; every other pair of masks is disjoint."""

    @property
    def prompts_fpath(self) -> Path | None:
        """The prompt set's file, or None when the world ships none."""
        return package_data_dpath() / "prompts" / f"{self.prompts}.yaml" if self.prompts else None

    @property
    def manifest_columns(self) -> tuple[str, ...]:
        return ("path", "label", "caption", *self.metadata_columns)

    def column_roles(self, ignore: tuple[str, ...] = ()) -> ColumnRoles:
        """The roles of this world's manifest columns, plus extra ``ignore`` columns."""
        return ColumnRoles(artifact=tuple(artifact_column(a) for a in self.artifacts),
                           protected=self.protected_columns,
                           ignore=("caption", *self.label_columns, *ignore))

    def without_artifact(self, scene: Any, artifact: str) -> Any:
        """``scene`` with ``artifact`` removed (everything else unchanged)."""
        return dataclasses.replace(scene, artifacts=scene.artifacts - {artifact})

    def check_artifact(self, artifact: str) -> None:
        if artifact not in self.artifacts:
            raise InputError(f"unknown artifact {artifact!r} in the {self.name} world. "
                             f"Available: {', '.join(self.artifacts)}")

    def check_class(self, label: str) -> None:
        if label not in self.classes:
            raise InputError(f"unknown class {label!r} in the {self.name} world. "
                             f"Available: {', '.join(self.classes)}")


def artifact_column(artifact: str) -> str:
    """The manifest column that says whether ``artifact`` is in an image."""
    return f"has_{artifact}"


def _sample_dermatology(rng: np.random.Generator, *, label: str | None = None,
                        artifact_probs: Mapping[str, float] | None = None,
                        forced_artifacts: Mapping[str, bool] | None = None) -> derm.Scene:
    return derm.sample_scene(rng, diagnosis=label, artifact_probs=artifact_probs,
                             forced_artifacts=forced_artifacts)


DERMATOLOGY = World(
    name="dermatology",
    description="skin lesions on three skin tones; rulers, band-aids, ink markers, hair, "
                "dark corners (64 px)",
    classes=derm.CLASSES,
    artifacts=derm.ARTIFACTS,
    localised_artifacts=derm.LOCALISED_ARTIFACTS,
    diffuse_artifacts=derm.DIFFUSE_ARTIFACTS,
    image_size=derm.IMAGE_SIZE,
    sample_scene=_sample_dermatology,
    render_scene=derm.render_scene_with_masks,
    caption_scene=caption_scene,
    metadata_columns=("skin_tone", "lesion_colour", "lesion_border", "lesion_size",
                      *(artifact_column(a) for a in derm.ARTIFACTS)),
    protected_columns=("skin_tone",),
    label_rule="malignant = irregular border and dark (brown or black) colour",
    clip_model=TINY_MODEL_NAME,
    default_artifact="ruler",
    default_target_class="malignant",
    phrases=PHRASES,
    label_columns=("lesion_colour", "lesion_border", "lesion_size"),
    prompts="dermatology",
    vocabularies=("dermatology",),
)

BIRDS = World(
    name="birds",
    description="landbirds and waterbirds on land or water at three times of day; boats, "
                "branches, film grain, photo frames, watermarks (72 px)",
    classes=birds.CLASSES,
    artifacts=birds.ARTIFACTS,
    localised_artifacts=birds.LOCALISED_ARTIFACTS,
    diffuse_artifacts=birds.DIFFUSE_ARTIFACTS,
    image_size=birds.IMAGE_SIZE,
    sample_scene=birds.sample_scene,
    render_scene=birds.render_scene_with_masks,
    caption_scene=caption_bird_scene,
    metadata_columns=("species", "plumage", "time_of_day", "facing",
                      *(artifact_column(a) for a in birds.ARTIFACTS)),
    protected_columns=("time_of_day",),
    label_rule="the bird's kind: sparrows, crows, canaries and cardinals are landbirds; "
               "gulls, herons, cormorants and ducks are waterbirds",
    clip_model=BIRDS_MODEL_NAME,
    default_artifact="water",
    default_target_class="waterbird",
    phrases=BIRD_PHRASES,
    label_columns=("species",),
    prompts="birds",
    vocabularies=("birds",),
    filter_artifacts=birds.FILTER_ARTIFACTS,
)

_WORLDS: dict[str, World] = {DERMATOLOGY.name: DERMATOLOGY, BIRDS.name: BIRDS}
DEFAULT_WORLD = DERMATOLOGY.name


def register_world(world: World) -> World:
    """Make ``world`` available to the data-set factories and ``--world``."""
    _WORLDS[world.name] = world
    return world


def list_worlds() -> list[str]:
    """Names of the registered worlds."""
    return sorted(_WORLDS)


def get_world(world: str | World) -> World:
    """The registered world of that name (a ``World`` passes through)."""
    if isinstance(world, World):
        return world
    if world not in _WORLDS:
        raise InputError(f"unknown world {world!r}. Available: {', '.join(list_worlds())}")
    return _WORLDS[world]
