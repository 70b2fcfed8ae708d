"""Which metadata column keys the rules judge, and as which concept.

One resolution, used by the audit (what to measure) and by every metadata-based check
(what to judge): a key is judged for a class when its column is an artifact or a
protected attribute (``clipaudit.columns`` for where roles come from), or when the
concept it marks is forbidden for the class and its column is not ignored. A forbidden
concept that no key marks is judged through the reference CLIP's text instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from clipaudit.gate.model import RuleSet
from clipaudit.results import ColumnInfo


@dataclass(frozen=True)
class KeyView:
    """A column key as the rules see it."""

    key: str
    column: str
    concept: str
    role: str | None
    """``artifact``, ``protected``, ``ignore`` or None."""
    role_source: str
    """``command line``, ``rule file``, ``data set`` or ""."""
    binary: bool


def key_views(columns: Sequence[ColumnInfo], ruleset: RuleSet) -> list[KeyView]:
    """Every key of the audited data's binary and categorical columns, with its role and
    concept (the rule file's ``column_concepts`` over the data set's, over the name)."""
    declared = {c.name: c.declared_role for c in columns if c.declared_role}
    sources = ruleset.role_sources(declared)
    named = ruleset.metadata.column_concepts
    out = []
    for info in columns:
        if info.kind not in ("binary", "categorical"):
            continue
        role, source = sources.role(info.name)
        for key, concept in info.concepts.items():
            chosen = named.get(key) or (named.get(info.name) if info.kind == "binary" else None)
            out.append(KeyView(key, info.name, chosen or concept, role, source,
                               info.kind == "binary"))
    return out


def forbidden_term(view: KeyView, ruleset: RuleSet, class_name: str) -> str | None:
    """The forbidden term of the class that the key's concept is (whole words, synonyms)."""
    if view.role == "ignore":
        return None
    return ruleset.forbidden_match(class_name, view.concept)


def judged_keys(views: Sequence[KeyView], ruleset: RuleSet, class_name: str | None) -> list[KeyView]:
    """Keys judged for ``class_name`` (None: for any class): artifact and protected
    columns, and keys marking a concept forbidden for the class."""
    classes = [class_name] if class_name is not None else _all_classes(ruleset)
    return [v for v in views
            if v.role in ("artifact", "protected")
            or any(forbidden_term(v, ruleset, c) is not None for c in classes)]


def key_for_term(views: Sequence[KeyView], ruleset: RuleSet, term: str) -> KeyView | None:
    """The first key (of a column not ignored) whose concept is the forbidden ``term``."""
    matcher = ruleset.matcher
    for view in views:
        if view.role != "ignore" and matcher.matches(view.concept, [term]):
            return view
    return None


def text_terms(views: Sequence[KeyView], ruleset: RuleSet, class_name: str | None) -> list[str]:
    """Forbidden terms of the class (None: any class) that no key marks: judged through
    the reference CLIP's text."""
    terms = (ruleset.concepts_for(ruleset.concepts.forbidden, class_name) if class_name
             else ruleset.forbidden_terms())
    return [t for t in dict.fromkeys(terms) if key_for_term(views, ruleset, t) is None]


def unread_binary_columns(views: Sequence[KeyView], ruleset: RuleSet) -> list[str]:
    """Binary columns without a role whose concept no forbidden list names: no rule reads them."""
    judged = {v.key for v in judged_keys(views, ruleset, None)}
    return sorted({v.column for v in views
                   if v.binary and v.role is None and v.key not in judged})


def _all_classes(ruleset: RuleSet) -> list[str]:
    from clipaudit.gate.model import ALL_CLASSES

    return list(ruleset.concepts.forbidden) or [ALL_CLASSES]
