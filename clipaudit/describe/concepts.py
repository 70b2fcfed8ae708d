"""Concept vocabularies: the words a component's concept label is chosen from.

A vocabulary is a list of concepts, each with optional synonyms (other phrasings
of the same concept). clipaudit ships three (``general``, ``dermatology``,
``product``) as YAML under ``clipaudit/_data/concepts/``; users add their own:

- a ``.txt`` file: one concept per line; blank lines and ``#`` comments ignored;
- a ``.yaml``/``.yml`` file: a mapping ``{concept: [synonym, ...]}`` (a synonym
  list may be empty, ``null`` or a single string), or a list whose items are
  concepts (strings) or one-key mappings ``{concept: [synonyms]}``.

How synonyms are used (see ``clipaudit.describe.components``): a concept's text embedding is
the normalised mean of the normalised text embeddings of all its phrasings (the
concept itself and its synonyms) rendered in every prompt template, the same
prompt ensembling a zero-shot head uses. The label shown is always the concept
(the first phrasing), never a synonym.

Concepts are compared case-insensitively: a concept or synonym that repeats an
earlier one (ignoring case and surrounding spaces) is dropped, so merging two
vocabularies that both know "ruler" yields one "ruler".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipaudit.errors import InputError
from clipaudit.resources import package_data_dpath

log = logging.getLogger(__name__)

_YAML_SUFFIXES = (".yaml", ".yml")
_TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class ConceptVocabulary:
    """A named list of concepts and their synonyms."""

    name: str
    """``general``, ``dermatology``, ``product``, a user file's stem, or merged names
    joined by ``+``."""
    concepts: list[str]
    """The concepts in file order, unique ignoring case; these are the labels."""
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    """Concept -> its other phrasings (the concept itself not included); concepts
    without synonyms may be absent."""

    def phrases(self, concept: str) -> list[str]:
        """All phrasings of ``concept``: the concept first, then its synonyms."""
        return [concept, *self.synonyms.get(concept, [])]

    def __len__(self) -> int:
        return len(self.concepts)


def list_vocabularies() -> list[str]:
    """Names of the vocabularies that ship with clipaudit."""
    return sorted(p.stem for p in _builtin_dpath().glob("*.yaml"))


@dataclass(frozen=True)
class VocabularyInfo:
    """What ``clipaudit vocab list/show`` says about a vocabulary."""

    name: str
    source: str
    """``built-in`` or ``file``."""
    path: str
    description: str
    """The file's leading comment, first paragraph ("" when it has none)."""
    vocabulary: ConceptVocabulary

    @property
    def n_concepts(self) -> int:
        return len(self.vocabulary.concepts)

    @property
    def n_synonyms(self) -> int:
        return sum(len(v) for v in self.vocabulary.synonyms.values())

    def as_dict(self, concepts: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "source": self.source, "path": self.path,
                               "description": self.description, "n_concepts": self.n_concepts,
                               "n_synonyms": self.n_synonyms}
        if concepts:
            out["concepts"] = [{"concept": c, "synonyms": self.vocabulary.synonyms.get(c, [])}
                               for c in self.vocabulary.concepts]
        return out


def vocabulary_info(name_or_path: str | Path) -> VocabularyInfo:
    """A built-in vocabulary by name, or a user's file, with where it comes from and its
    description (how clipaudit reads the file: a user's way to check their own)."""
    builtin = isinstance(name_or_path, str) and name_or_path in list_vocabularies()
    fpath = _builtin_dpath() / f"{name_or_path}.yaml" if builtin else Path(name_or_path)
    vocabulary = load_vocabulary(name_or_path)
    return VocabularyInfo(vocabulary.name, "built-in" if builtin else "file", str(fpath),
                          _leading_comment(fpath), vocabulary)


def list_vocabulary_infos() -> list[VocabularyInfo]:
    """``vocabulary_info`` of every shipped vocabulary."""
    return [vocabulary_info(name) for name in list_vocabularies()]


def _leading_comment(fpath: Path) -> str:
    lines: list[str] = []
    for line in fpath.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#") or (lines and text == "#"):
            break
        lines.append(text.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def load_vocabulary(name_or_path: str | Path) -> ConceptVocabulary:
    """A built-in vocabulary by name, or a user's ``.txt``/``.yaml`` file.

    Raises InputError naming the file (or the unknown name) and the problem.
    """
    if isinstance(name_or_path, str) and name_or_path in list_vocabularies():
        return _load_file(_builtin_dpath() / f"{name_or_path}.yaml")
    fpath = Path(name_or_path)
    if not fpath.exists():
        if fpath.suffix or len(fpath.parts) > 1:
            raise InputError(f"{fpath}: concept vocabulary file not found")
        raise InputError(f"unknown concept vocabulary {str(name_or_path)!r}; built-in: "
                         f"{', '.join(list_vocabularies())}, or give a .txt or .yaml file")
    return _load_file(fpath)


def load_vocabularies(names_or_paths: list[str | Path] | tuple[str | Path, ...]) -> ConceptVocabulary:
    """Load several vocabularies and merge them (``["dermatology", "mine.txt"]``)."""
    if not names_or_paths:
        raise InputError("no concept vocabulary given; built-in: "
                         f"{', '.join(list_vocabularies())}")
    return merge_vocabularies(*(load_vocabulary(v) for v in names_or_paths))


def merge_vocabularies(*vocabs: ConceptVocabulary) -> ConceptVocabulary:
    """One vocabulary holding every concept of ``vocabs`` in order; a concept known
    to several keeps its first spelling and the union of its synonyms."""
    if not vocabs:
        raise ValueError("merge_vocabularies needs at least one vocabulary")
    entries: list[tuple[str, list[str]]] = []
    for vocab in vocabs:
        entries.extend((c, vocab.synonyms.get(c, [])) for c in vocab.concepts)
    concepts, synonyms = _dedupe(entries)
    return ConceptVocabulary("+".join(v.name for v in vocabs), concepts, synonyms)


# ------------------------------------------------------------------ files


def _builtin_dpath() -> Path:
    return package_data_dpath() / "concepts"


def _load_file(fpath: Path) -> ConceptVocabulary:
    if not fpath.is_file():
        raise InputError(f"{fpath}: concept vocabulary is not a file")
    suffix = fpath.suffix.lower()
    if suffix not in _YAML_SUFFIXES + _TEXT_SUFFIXES:
        raise InputError(f"{fpath}: unsupported concept vocabulary format {fpath.suffix!r} "
                         "(use .txt, one concept per line, or .yaml)")
    try:
        text = fpath.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{fpath}: concept vocabulary is not UTF-8 text ({e})") from None
    entries = _parse_yaml(text, fpath) if suffix in _YAML_SUFFIXES else _parse_text(text)
    concepts, synonyms = _dedupe(entries)
    if not concepts:
        raise InputError(f"{fpath}: concept vocabulary is empty (no concepts found)")
    log.debug("loaded %d concepts from %s", len(concepts), fpath)
    return ConceptVocabulary(fpath.stem, concepts, synonyms)


def _parse_text(text: str) -> list[tuple[str, list[str]]]:
    entries: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        concept = line.split("#", 1)[0].strip()
        if concept:
            entries.append((concept, []))
    return entries


def _parse_yaml(text: str, fpath: Path) -> list[tuple[str, list[str]]]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(f"{fpath}: not valid YAML{at} "
                         f"({getattr(e, 'problem', None) or e})") from None
    if doc is None:
        return []
    if isinstance(doc, dict):
        return [_entry(k, v, f"{fpath}: {k!r}") for k, v in doc.items()]
    if isinstance(doc, list):
        entries = []
        for i, item in enumerate(doc):
            where = f"{fpath}: [{i}]"
            if isinstance(item, dict):
                if len(item) != 1:
                    raise InputError(f"{where}: expected one {{concept: [synonyms]}} pair, "
                                     f"got {len(item)} keys")
                ((k, v),) = item.items()
                entries.append(_entry(k, v, where))
            else:
                entries.append(_entry(item, None, where))
        return entries
    raise InputError(f"{fpath}: expected a mapping {{concept: [synonyms]}} or a list of "
                     f"concepts, got {_type_name(doc)}")


def _entry(concept: Any, synonyms: Any, where: str) -> tuple[str, list[str]]:
    if not isinstance(concept, str) or not concept.strip():
        raise InputError(f"{where}: a concept must be a non-empty string, "
                         f"got {_type_name(concept)} {concept!r}")
    if synonyms is None:
        synonyms = []
    elif isinstance(synonyms, str):
        synonyms = [synonyms]
    if not isinstance(synonyms, list):
        raise InputError(f"{where}: synonyms must be a list of strings, got {_type_name(synonyms)}")
    for s in synonyms:
        if not isinstance(s, str) or not s.strip():
            raise InputError(f"{where}: a synonym must be a non-empty string, "
                             f"got {_type_name(s)} {s!r}")
    return concept.strip(), [s.strip() for s in synonyms]


def _dedupe(entries: list[tuple[str, list[str]]]) -> tuple[list[str], dict[str, list[str]]]:
    """Concepts unique ignoring case (first spelling wins), synonyms merged per concept
    and never repeating their concept or another synonym of it."""
    canonical: dict[str, str] = {}
    synonyms: dict[str, list[str]] = {}
    for concept, syns in entries:
        key = concept.casefold()
        first = canonical.setdefault(key, concept)
        known = synonyms.setdefault(first, [])
        seen = {first.casefold(), *(s.casefold() for s in known)}
        for s in syns:
            if s.casefold() not in seen:
                seen.add(s.casefold())
                known.append(s)
    concepts = list(canonical.values())
    return concepts, {c: s for c, s in synonyms.items() if s}


def _type_name(obj: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(obj), type(obj).__name__)
