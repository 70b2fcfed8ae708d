"""The ``vocabulary-fit`` check: does the concept vocabulary describe what the heads rely on?

Concept labels come from a vocabulary; a component whose best term does not beat the
vocabulary's scrambled phrases is ``unlabelled (closest: TERM)`` (see
``clipaudit.describe.labels``) and matches no forbidden or expected concept. When
such components carry much of a class's evidence, rules about concepts see little:
the check says so and names the vocabularies to try.
"""

from __future__ import annotations

from typing import Any

from clipaudit.describe.labels import is_unlabelled
from clipaudit.gate.model import CheckSpec, Share
from clipaudit.gate.registry import CheckOutcome, Scope, Violation, register_check
from clipaudit.results import AuditResult


class VocabularyFitParams(CheckSpec):
    """Fails when components no vocabulary term describes carry too much of a class's
    evidence."""

    max_unlabelled_share: Share = 0.5
    """Largest share of a class's evidence (summed |share| of its components) that
    unlabelled components may carry (equal passes)."""


def unlabelled_shares(result: AuditResult) -> list[tuple[str, str, float]]:
    """(head, class, share of the class's evidence in unlabelled components), over the
    components each class audit keeps (its largest |share| ones and its findings)."""
    out = []
    for head in result.heads:
        for cls in head.classes:
            total = sum(abs(p.share) for p in cls.components if p.concept)
            unlabelled = sum(abs(p.share) for p in cls.components if is_unlabelled(p.concept))
            if total > 0:
                out.append((head.name, cls.class_name, unlabelled / total))
    return out


@register_check("vocabulary-fit", params=VocabularyFitParams, scope="audit")
def vocabulary_fit(spec: VocabularyFitParams, scope: Scope) -> CheckOutcome:
    """Components no vocabulary term describes carry much of a class's evidence."""
    from clipaudit.describe.concepts import list_vocabularies

    shares = unlabelled_shares(scope.result)
    if not shares:
        return CheckOutcome([], "no component shares recorded", skipped=True)
    vocab = scope.result.provenance.get("vocabularies") or ["?"]
    over = sorted((s for s in shares if s[2] > spec.max_unlabelled_share), key=lambda s: -s[2])
    worst = max(shares, key=lambda s: s[2])
    details: dict[str, Any] = {"max_unlabelled_share": spec.max_unlabelled_share,
                               "vocabularies": vocab,
                               "unlabelled_share": {f"{h}/{c}": round(v, 4) for h, c, v in shares}}
    violations = []
    if over:
        head, cls, value = over[0]
        others = [v for v in list_vocabularies() if v not in vocab]
        violations.append(Violation(
            f"vocabulary {'+'.join(map(str, vocab))} describes little of what the heads rely on: "
            f"{value:.0%} of {head}/{cls}'s evidence sits in components no term describes "
            f"(unlabelled; {len(over)} of {len(shares)} classes over {spec.max_unlabelled_share:g}); "
            f"rules about concepts cannot see them. Try --vocab {' or '.join(others) or 'FILE'} "
            "(clipaudit vocab list) or your own vocabulary file", None, value,
            spec.max_unlabelled_share))
    return CheckOutcome(violations, f"largest unlabelled share {worst[2]:.2f} ({worst[0]}/{worst[1]}; "
                        f"limit {spec.max_unlabelled_share:g})", details)
