"""Which data labels each head's classes stand for, checked before an audit does any work.

A head's class stands for the instances labelled with its name, exactly (case and
spaces count), or, where a label map names the class, for the labels the map gives it
(the map replaces the exact match for that class). Every class of every head must
stand for at least one label present in the data; otherwise the audit stops (exit
code 2) naming the unmatched classes, the labels that exist and the closest ones.
A label may belong to at most one class of a head.

Instances whose label belongs to no class of a head (images of another category) are
left out of that head's per-class relevance. Unlabelled data (no label column, or no
label filled in) is audited by prediction, as before: a class then stands for the
instances the head predicts as it, and unlabelled rows of partly labelled data count
for the class they are predicted as.

The minimum number of audited instances per class (``thresholds.min_instances`` in
the rule file) counts these instances: labelled ones by label, unlabelled ones by
prediction. A head of which no class reaches it cannot be judged at all: that is an
input error too. Classes below it are reported as not evaluated by the gate.

A label map is a YAML file ``class: label`` (or ``class: [label, ...]``) or a CSV file
with a header ``class,label`` and one pair per row::

    # label-map.yaml: the prompt set's classes -> the data's labels
    cup: mug
    flask: [bottle, thermos]
"""

from __future__ import annotations

import csv
import difflib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from clipaudit.errors import InputError

if TYPE_CHECKING:
    from clipaudit.extraction.cache_reader import ActivationCache
    from clipaudit.heads.base import Head

log = logging.getLogger(__name__)

_YAML_SUFFIXES = (".yaml", ".yml")
_MAX_LISTED = 12

Predictor = Callable[[str], dict[str, int]]
"""Head name -> instances of the unlabelled rows predicted per class name."""


# ------------------------------------------------------------------ label maps


@dataclass(frozen=True)
class LabelMap:
    """Class name -> the data labels it stands for."""

    labels: dict[str, list[str]]
    source: str = "<memory>"


def load_label_map(fpath: Path | str) -> LabelMap:
    """Read a label map: YAML ``class: label | [labels]`` or CSV with ``class,label``.

    Raises InputError naming the file and the problem.
    """
    fpath = Path(fpath)
    if not fpath.is_file():
        raise InputError(f"{fpath}: label map not found")
    try:
        text = fpath.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{fpath}: label map is not UTF-8 text ({e.reason})") from None
    suffix = fpath.suffix.lower()
    if suffix in _YAML_SUFFIXES:
        pairs = _yaml_pairs(text, fpath)
    elif suffix == ".csv":
        pairs = _csv_pairs(text, fpath)
    else:
        raise InputError(f"{fpath}: a label map is a .yaml (class: label) or .csv "
                         f"(class,label) file, not {fpath.suffix or 'a file without suffix'}")
    if not pairs:
        raise InputError(f"{fpath}: the label map is empty")
    labels: dict[str, list[str]] = {}
    for class_name, label in pairs:
        known = labels.setdefault(class_name, [])
        if label not in known:
            known.append(label)
    return LabelMap(labels, str(fpath))


def _text(value: Any, where: str) -> str:
    # YAML reads 3 as a number: a numeric label is still a label; booleans and nulls are not
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InputError(f"{where}: expected a class name or label (text), got {value!r}")
    return str(value).strip()


def _yaml_pairs(text: str, fpath: Path) -> list[tuple[str, str]]:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{fpath}: not valid YAML{at}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise InputError(f"{fpath}: expected a mapping 'class: label' (or 'class: [labels]'), "
                         f"got {type(doc).__name__}")
    pairs = []
    for key, value in doc.items():
        class_name = _text(key, f"{fpath}: key {key!r}")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise InputError(f"{fpath}: {class_name}: no label given")
        pairs += [(class_name, _text(v, f"{fpath}: {class_name}")) for v in values]
    return pairs


def _csv_pairs(text: str, fpath: Path) -> list[tuple[str, str]]:
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [h.strip().casefold() for h in rows[0]]
    if "class" not in header or "label" not in header:
        raise InputError(f"{fpath}: the first row must name the columns 'class' and 'label', "
                         f"got {rows[0]}")
    ci, li = header.index("class"), header.index("label")
    pairs = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(ci, li):
            raise InputError(f"{fpath}: line {n}: expected a class and a label, got {row}")
        pairs.append((_text(row[ci], f"{fpath}: line {n}"), _text(row[li], f"{fpath}: line {n}")))
    return pairs


# ------------------------------------------------------------------ matching


@dataclass(frozen=True)
class ClassLabels:
    """One class of a head: the labels it stands for and its audited instances."""

    class_name: str
    labels: list[str]
    """Data labels of the class (empty when the head is audited by prediction)."""
    n_instances: int
    """Instances the audit averages over for this class (labelled + predicted)."""


@dataclass(frozen=True)
class HeadLabels:
    """How one head's classes match the data's labels."""

    head: str
    by: Literal["label", "prediction"]
    """``label`` when the data has labels (unlabelled rows then go by prediction)."""
    classes: list[ClassLabels]
    min_instances: int
    unused_labels: dict[str, int] = field(default_factory=dict)
    """Data labels that belong to no class of this head, with their counts (left out)."""
    label_to_class: dict[str, str] = field(default_factory=dict)

    @property
    def below_minimum(self) -> list[ClassLabels]:
        """Classes with fewer audited instances than ``min_instances`` (not evaluated)."""
        return [c for c in self.classes if c.n_instances < self.min_instances]

    def instance_labels(self, labels: Sequence[str | None]) -> list[str | None]:
        """Per instance: its class name, None when unlabelled (by prediction), or its
        own label when that belongs to no class (never a class name: left out)."""
        return [None if lab is None else self.label_to_class.get(lab, lab) for lab in labels]


def match_labels(heads: Sequence[tuple[str, Sequence[str]]], labels: Sequence[str | None], *,
                 label_map: LabelMap | None = None, min_instances: int = 20,
                 predict: Predictor | None = None) -> dict[str, HeadLabels]:
    """Match every head's classes (``(head name, class names)``) to the data's labels.

    ``predict(head)`` counts the unlabelled rows predicted as each class (needed when some
    rows have no label). Raises InputError when a class matches no label present, when a
    label would belong to two classes of a head, or when no class of a head has
    ``min_instances`` audited instances.
    """
    counts = Counter(lab for lab in labels if lab is not None)
    n_unlabelled = sum(lab is None for lab in labels)
    out = {}
    for head, class_names in heads:
        if counts:
            label_to_class = _label_to_class(head, class_names, counts, label_map)
            predicted = predict(head) if n_unlabelled and predict is not None else {}
            by_class: dict[str, list[str]] = {c: [] for c in class_names}
            for lab, c in label_to_class.items():
                by_class[c].append(lab)
            classes = [ClassLabels(c, sorted(by_class[c]),
                                   sum(counts[lab] for lab in by_class[c]) + predicted.get(c, 0))
                       for c in class_names]
            unused = {lab: n for lab, n in sorted(counts.items()) if lab not in label_to_class}
            matched = HeadLabels(head, "label", classes, min_instances, unused, label_to_class)
        else:
            predicted = predict(head) if predict is not None else {}
            classes = [ClassLabels(c, [], predicted.get(c, 0)) for c in class_names]
            matched = HeadLabels(head, "prediction", classes, min_instances)
        _require_some_evaluable(matched)
        if matched.unused_labels:
            log.info("head %s: labels of no class, left out: %s", head,
                     ", ".join(f"{k} ({v})" for k, v in matched.unused_labels.items()))
        out[head] = matched
    if label_map is not None:
        every_class = {c for _, names in heads for c in names}
        stray = [c for c in label_map.labels if c not in every_class]
        if stray:
            log.warning("%s: classes no head has (ignored): %s", label_map.source, ", ".join(stray))
    return out


def _label_to_class(head: str, class_names: Sequence[str], counts: Counter[str],
                    label_map: LabelMap | None) -> dict[str, str]:
    mapped = label_map.labels if label_map is not None else {}
    owner: dict[str, str] = {}
    unmatched = []
    for c in class_names:
        own = mapped.get(c, [c])
        present = [lab for lab in own if lab in counts]
        if not present:
            unmatched.append(c)
        for lab in present:
            if lab in owner:
                raise InputError(f"head {head!r}: label {lab!r} would belong to two classes, "
                                 f"{owner[lab]!r} and {c!r}; give each label one class"
                                 + _map_hint(label_map))
            owner[lab] = c
    if unmatched:
        raise InputError(_unmatched_message(head, unmatched, counts, label_map))
    for c in class_names:  # a label spelled like a class must not slip out of it unnoticed
        if c in mapped and c in counts and c not in owner:
            raise InputError(f"head {head!r}: the data has a label {c!r}, but "
                             f"{_where(label_map)} gives class {c!r} the labels "
                             f"{mapped[c]}; add {c!r} to them or map it to another class")
    return owner


def _unmatched_message(head: str, unmatched: list[str], counts: Counter[str],
                       label_map: LabelMap | None) -> str:
    existing = sorted(counts)
    listed = ", ".join(existing[:_MAX_LISTED]) + (
        f", ... ({len(existing)} in all)" if len(existing) > _MAX_LISTED else "")
    hints = []
    for c in unmatched[:_MAX_LISTED]:
        wanted = label_map.labels.get(c, [c]) if label_map is not None else [c]
        close = _closest(wanted, existing)
        hints.append(f"{c!r}" + (f" (closest: {', '.join(repr(x) for x in close)})" if close else ""))
    more = f" and {len(unmatched) - _MAX_LISTED} more" if len(unmatched) > _MAX_LISTED else ""
    return (f"head {head!r}: {len(unmatched)} class(es) match no label in the data: "
            f"{', '.join(hints)}{more}. Labels in the data: {listed}. Name the classes as the "
            f"labels are, or map them with --label-map FILE (class: label)" + _map_hint(label_map))


def _closest(wanted: Sequence[str], existing: Sequence[str]) -> list[str]:
    by_fold = {lab.casefold(): lab for lab in existing}
    out: list[str] = []
    for w in wanted:
        if w.casefold() in by_fold:
            out.append(by_fold[w.casefold()])
        out += difflib.get_close_matches(w, existing, n=2, cutoff=0.6)
        out += [by_fold[x] for x in difflib.get_close_matches(w.casefold(), list(by_fold), n=2,
                                                              cutoff=0.6)]
    return list(dict.fromkeys(out))[:3]


def _where(label_map: LabelMap | None) -> str:
    return label_map.source if label_map is not None else "the label map"


def _map_hint(label_map: LabelMap | None) -> str:
    return f" (label map: {label_map.source})" if label_map is not None else ""


def _require_some_evaluable(matched: HeadLabels) -> None:
    if len(matched.below_minimum) < len(matched.classes):
        return
    largest = sorted(matched.classes, key=lambda c: -c.n_instances)[:3]
    sizes = ", ".join(f"{c.class_name} {c.n_instances}" for c in largest)
    how = "labelled" if matched.by == "label" else "predicted"
    raise InputError(f"head {matched.head!r}: no class has the {matched.min_instances} audited "
                     f"instances a verdict needs ({how}: {sizes}); audit more images or lower "
                     "thresholds.min_instances in the rule file")


# ------------------------------------------------------------------ on a cache


def check_heads_against_labels(heads: Sequence[Head], cache: ActivationCache, *,
                               label_map: LabelMap | Path | str | None = None,
                               min_instances: int = 20,
                               batch_size: int = 4096) -> dict[str, HeadLabels]:
    """``match_labels`` on a cache's labels, before any work is done: reads the index
    and, only where rows are unlabelled, the cached image embeddings (to predict)."""
    if label_map is not None and not isinstance(label_map, LabelMap):
        label_map = load_label_map(label_map)
    index = cache.ok_index.reset_index(drop=True)
    labels = ([None if _missing(x) else str(x) for x in index["label"]] if "label" in index
              else [None] * len(index))
    unlabelled = {int(i) for i, lab in zip(index["id"], labels) if lab is None}
    by_name = {h.name: h for h in heads}
    memo: dict[str, dict[str, int]] = {}

    def predict(head_name: str) -> dict[str, int]:
        if head_name not in memo:
            memo[head_name] = _predicted_counts(by_name[head_name], cache, unlabelled, batch_size)
        return memo[head_name]

    return match_labels([(h.name, list(h.class_names)) for h in heads], labels,
                        label_map=label_map, min_instances=min_instances, predict=predict)


def _missing(x: Any) -> bool:
    import pandas as pd

    return x is None or bool(pd.isna(x))


@torch.no_grad()
def _predicted_counts(head: Head, cache: ActivationCache, ids: set[int],
                      batch_size: int) -> dict[str, int]:
    counts = torch.zeros(len(head.class_names), dtype=torch.long)
    if ids:
        wanted = torch.tensor(sorted(ids), dtype=torch.long)
        for batch in cache.iter_batches(batch_size, fields=("embeds", "ids")):
            keep = torch.isin(batch["ids"], wanted)
            if bool(keep.any()):
                pred = head.scores(batch["embeds"][keep].float()).argmax(dim=1)
                counts += torch.bincount(pred, minlength=len(head.class_names))
    return dict(zip(head.class_names, counts.tolist()))
