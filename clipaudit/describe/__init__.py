"""Stage 5: what each SAE component means.

``components`` finds each component's top activating instances, its semantic
embedding in a reference CLIP, its concept label, clarity and alignment with the
classes, and saves and loads them; ``concepts`` holds the concept vocabularies.
"""

from clipaudit.describe.components import (
    ComponentDescriptions,
    TopActivations,
    TopActivationsAccumulator,
    describe_components,
    load_descriptions,
    save_descriptions,
    top_activations,
)
from clipaudit.describe.concepts import (
    ConceptVocabulary,
    VocabularyInfo,
    list_vocabularies,
    list_vocabulary_infos,
    load_vocabularies,
    load_vocabulary,
    vocabulary_info,
)

__all__ = [
    "ComponentDescriptions",
    "ConceptVocabulary",
    "TopActivations",
    "TopActivationsAccumulator",
    "VocabularyInfo",
    "describe_components",
    "list_vocabularies",
    "list_vocabulary_infos",
    "load_descriptions",
    "load_vocabularies",
    "load_vocabulary",
    "save_descriptions",
    "top_activations",
    "vocabulary_info",
]
