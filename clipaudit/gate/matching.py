"""Concept matching: case-insensitive, word-based, plural- and synonym-aware.

The one matcher of "is this concept label one of these terms?": the findings
(``clipaudit.findings``: forbidden and expected concepts), the gate's checks and
waivers, and so the report, all decide with it, so they cannot disagree.

A concept label matches a listed term when the term's words appear as consecutive
words of the label, ignoring case, punctuation and plural endings: ``ruler``
matches ``ruler``, ``Ruler.``, ``rulers``, ``measuring ruler`` and ``ruler/scale
bar``; ``band-aid`` matches ``band aid``, ``band_aid`` and ``Band-Aids``; ``ink``
does not match ``pink skin``. Synonym groups (``synonyms: {ruler: [scale bar]}``)
make every member of a group stand for all of them; groups sharing a member merge.
A component no vocabulary term describes (``unlabelled (closest: ruler)``) matches
no term at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from clipaudit.describe.labels import is_unlabelled

Words = tuple[str, ...]

_WORD_RE = re.compile(r"[^\W_]+")


def words_of(text: str) -> Words:
    """The lower-cased, singular words of ``text`` (hyphens, underscores, slashes and
    punctuation split). Idempotent: ``words_of(" ".join(words_of(t))) == words_of(t)``."""
    return tuple(singular(w) for w in _WORD_RE.findall(text.casefold()))


def singular(word: str) -> str:
    """One form for a word's singular and plural (rulers, patches, bodies, glasses ->
    ruler, patch, body, glass). A light rule, not a dictionary: both sides of every
    comparison go through it, so what it misses (lenses) stays unmatched on both."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def phrase_in(term: Words, label: Words) -> bool:
    """Whether ``term`` occurs as consecutive words of ``label``."""
    if not term or len(term) > len(label):
        return False
    return any(label[i:i + len(term)] == term for i in range(len(label) - len(term) + 1))


class SynonymGroups:
    """Union-find over normalised terms: each term knows every phrasing of its concept."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]]):
        self._parent: dict[Words, Words] = {}
        self._spellings: dict[Words, set[str]] = {}
        for key, values in synonyms.items():
            for value in values:
                self._union(self._add(key), self._add(value))
        self._members: dict[Words, set[Words]] = {}
        for term in self._parent:
            self._members.setdefault(self._find(term), set()).add(term)

    def _add(self, spelling: str) -> Words:
        words = words_of(spelling)
        self._spellings.setdefault(words, set()).add(spelling.strip().casefold())
        return words

    def spellings(self, term: Words) -> set[str]:
        """How the rule file spelled ``term`` (lower-cased), and its words joined by spaces."""
        return {" ".join(term), *self._spellings.get(term, ())}

    def _find(self, term: Words) -> Words:
        self._parent.setdefault(term, term)
        while self._parent[term] != term:
            self._parent[term] = self._parent[self._parent[term]]
            term = self._parent[term]
        return term

    def _union(self, a: Words, b: Words) -> None:
        root_a, root_b = self._find(a), self._find(b)
        if root_a != root_b:
            self._parent[max(root_a, root_b)] = min(root_a, root_b)

    def expand(self, term: str) -> set[Words]:
        """``term`` and every synonym of it, as word tuples."""
        words = words_of(term)
        if words not in self._parent:
            return {words}
        return set(self._members[self._find(words)])


class ConceptMatcher:
    """Decides whether a concept label is one of a list of terms (with synonyms)."""

    def __init__(self, synonyms: Mapping[str, Iterable[str]] | None = None):
        self._groups = SynonymGroups(synonyms or {})
        # first_match by (label, terms): the gate asks the same question for each of
        # 1,000 classes that share their forbidden lists
        self._memo: dict[tuple[str, tuple[str, ...]], str | None] = {}

    def expand(self, terms: Iterable[str]) -> set[Words]:
        out: set[Words] = set()
        for term in terms:
            out |= self._groups.expand(term)
        return {t for t in out if t}

    def spellings(self, terms: Iterable[str]) -> set[str]:
        """Every spelling of ``terms`` and their synonyms, lower-cased."""
        out = {t.strip().casefold() for t in terms}
        for words in self.expand(terms):
            out |= self._groups.spellings(words)
        return {s for s in out if s}

    def first_match(self, label: str, terms: Iterable[str]) -> str | None:
        """The first of ``terms`` that ``label`` matches (directly or via a synonym).
        An ``unlabelled (closest: ...)`` label matches nothing: no term describes it."""
        key = (label, tuple(terms))
        if key not in self._memo:
            self._memo[key] = self._first_match(label, key[1])
        return self._memo[key]

    def _first_match(self, label: str, terms: tuple[str, ...]) -> str | None:
        if is_unlabelled(label):
            return None
        label_words = words_of(label)
        for term in terms:
            if any(phrase_in(t, label_words) for t in self._groups.expand(term)):
                return term
        return None

    def matches(self, label: str, terms: Iterable[str]) -> bool:
        return self.first_match(label, terms) is not None


def concept_matches(label: str, terms: Iterable[str],
                    synonyms: Mapping[str, Iterable[str]] | None = None) -> bool:
    """Whether concept ``label`` is one of ``terms`` (case-insensitive, whole words,
    ``synonyms`` as in a rule file's ``concepts.synonyms``)."""
    return ConceptMatcher(synonyms).matches(label, terms)
