from pathlib import Path

import pytest

from clipaudit.describe.concepts import (
    ConceptVocabulary,
    list_vocabularies,
    load_vocabularies,
    load_vocabulary,
    merge_vocabularies,
)
from clipaudit.errors import InputError


def _all_phrases(vocab: ConceptVocabulary) -> set[str]:
    return {p.casefold() for c in vocab.concepts for p in vocab.phrases(c)}


def test_builtin_vocabularies_are_listed_and_load():
    assert {"general", "dermatology", "product"} <= set(list_vocabularies())
    for name in list_vocabularies():
        vocab = load_vocabulary(name)
        assert vocab.name == name
        assert len(vocab.concepts) == len({c.casefold() for c in vocab.concepts}) > 0
    assert 100 <= len(load_vocabulary("general").concepts) <= 200


@pytest.mark.parametrize("required", [
    # artifacts, in the synthetic world's wording where it has one
    "ruler", "band-aid", "plaster", "ink marker", "skin marker", "hair", "gel bubbles",
    "dark corners", "vignette", "colour chart", "text", "date stamp", "reflection",
    # the lesion itself, so a lesion component is not forced onto an artifact word
    "dark lesion", "irregular border", "regular border", "malignant melanoma", "melanoma",
    "benign nevus", "nevus", "light skin", "medium skin", "dark skin",
])
def test_dermatology_vocabulary_covers_artifacts_and_lesions(required):
    assert required in _all_phrases(load_vocabulary("dermatology"))


@pytest.mark.parametrize("required", [
    "watermark", "logo", "price tag", "white background", "studio background", "text overlay",
])
def test_product_vocabulary_covers_overlays_and_backgrounds(required):
    assert required in load_vocabulary("product").concepts


def test_primary_dermatology_names_are_concepts_not_synonyms():
    concepts = load_vocabulary("dermatology").concepts
    for name in ("ruler", "band-aid", "ink marker", "hair", "dark corners"):
        assert name in concepts


def test_text_file(tmp_path: Path):
    fpath = tmp_path / "mine.txt"
    fpath.write_text("# my concepts\nruler\n\n  sticker  # trailing comment\nRuler\nhair\n")
    vocab = load_vocabulary(fpath)
    assert vocab.name == "mine"
    assert vocab.concepts == ["ruler", "sticker", "hair"]
    assert vocab.synonyms == {}
    assert load_vocabulary(str(fpath)) == vocab


def test_yaml_mapping_with_synonyms(tmp_path: Path):
    fpath = tmp_path / "m.yaml"
    fpath.write_text("ruler: [scale bar, Ruler, scale bar]\nhair:\nink: pen mark\n")
    vocab = load_vocabulary(fpath)
    assert vocab.concepts == ["ruler", "hair", "ink"]
    assert vocab.phrases("ruler") == ["ruler", "scale bar"]
    assert vocab.phrases("hair") == ["hair"]
    assert vocab.phrases("ink") == ["ink", "pen mark"]


def test_yaml_list_with_mixed_items(tmp_path: Path):
    fpath = tmp_path / "l.yml"
    fpath.write_text("- ruler\n- band-aid: [plaster]\n- hair\n")
    vocab = load_vocabulary(fpath)
    assert vocab.concepts == ["ruler", "band-aid", "hair"]
    assert vocab.synonyms == {"band-aid": ["plaster"]}


@pytest.mark.parametrize("fname, text, problem", [
    ("empty.txt", "# nothing here\n\n", "empty"),
    ("empty.yaml", "", "empty"),
    ("bad.yaml", "ruler: [scale bar\nhair: x\n", "not valid YAML"),
    ("scalar.yaml", "just a string\n", "expected a mapping"),
    ("syn.yaml", "ruler: 3\n", "synonyms must be a list"),
    ("synitem.yaml", "ruler: [scale bar, 4]\n", "synonym must be a non-empty string"),
    ("key.yaml", "3: [three]\n", "concept must be a non-empty string"),
    ("pair.yaml", "- {ruler: [a], hair: [b]}\n", "expected one"),
    ("item.yaml", "- ruler\n- [a, b]\n", "concept must be a non-empty string"),
    ("vocab.csv", "ruler\n", "unsupported"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, fname, text, problem):
    fpath = tmp_path / fname
    fpath.write_text(text)
    with pytest.raises(InputError) as e:
        load_vocabulary(fpath)
    assert str(fpath) in str(e.value)
    assert problem in str(e.value)


def test_missing_file_and_unknown_name(tmp_path: Path):
    with pytest.raises(InputError, match="not found") as e:
        load_vocabulary(tmp_path / "nope.txt")
    assert str(tmp_path / "nope.txt") in str(e.value)
    with pytest.raises(InputError, match="unknown concept vocabulary 'medical'") as e:
        load_vocabulary("medical")
    assert "dermatology" in str(e.value)


def test_merge_keeps_order_dedupes_and_unions_synonyms():
    a = ConceptVocabulary("a", ["ruler", "hair"], {"ruler": ["scale bar"]})
    b = ConceptVocabulary("b", ["Ruler", "logo"], {"Ruler": ["measuring tape", "Scale Bar"]})
    merged = merge_vocabularies(a, b)
    assert merged.name == "a+b"
    assert merged.concepts == ["ruler", "hair", "logo"]
    assert merged.phrases("ruler") == ["ruler", "scale bar", "measuring tape"]


def test_load_vocabularies_merges_builtin_and_user(tmp_path: Path):
    fpath = tmp_path / "extra.txt"
    fpath.write_text("surgical glove\nruler\n")
    vocab = load_vocabularies(["dermatology", fpath])
    derm = load_vocabulary("dermatology")
    assert vocab.name == "dermatology+extra"
    assert vocab.concepts == [*derm.concepts, "surgical glove"]
    with pytest.raises(InputError):
        load_vocabularies([])
