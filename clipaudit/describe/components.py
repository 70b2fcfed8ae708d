"""What SAE components mean (DESIGN.md section 2, "Component description").

For each component j:

- its top-m activating instances over a reference set, found in one streaming
  pass (``top_activations``);
- its semantic embedding s_j: the mean of the reference model's L2-normalised image
  embeddings of those instances, normalised again (normalising the mean changes no
  cosine; normalising each embedding first weighs every instance equally, as CLIP
  similarity does);
- alignment(j, text) = cos(s_j, T(text)) - cos(s_j, T("")), T the reference
  model's text encoder;
- class alignment alpha[j, c] = max of alignment(j, t) over class c's texts
  (prompts or names, used verbatim);
- concept label = argmax of alignment over a vocabulary, with its score. A
  concept's text embedding T(concept) is the normalised mean of the normalised
  embeddings of every phrasing (the concept and its synonyms) in every template:
  prompt ensembling, as the zero-shot head does. The baseline stays T("") as in
  DESIGN.md; a constant baseline per component leaves the argmax unchanged;
- clarity = mean pairwise cosine (distinct pairs) of the reference embeddings of
  the top-m instances.

A component that never fired (or whose top instances have no reference
embedding) is dead: its semantic embedding is zero, its concept "" and its
scores NaN; clarity is NaN below two instances.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipaudit.artifacts import atomic_path, load_tensors, save_tensors
from clipaudit.describe.calibration import Calibration, LabelCentroids, calibrate, label_centroids
from clipaudit.describe.concepts import ConceptVocabulary
from clipaudit.errors import InputError, MismatchError
from clipaudit.progress import NULL_REPORTER, Reporter

log = logging.getLogger(__name__)

TextEncoder = Callable[[list[str]], Tensor]
"""Texts -> unnormalised embeddings [len(texts), D] (``Backbone.encode_text`` fits)."""

_CHUNK_FLOATS = 1 << 24
"""Floats per chunk when gathering top-instance embeddings ([chunk, m, D]): 64 MB."""


# ------------------------------------------------------------------ top activations


@dataclass(frozen=True)
class TopActivations:
    """The m most activating instances of every component."""

    ids: Tensor
    """long [n_latents, m]: instance ids, most activating first (ties: lower id
    first); -1 where the component fired on fewer than m instances."""
    values: Tensor
    """float [n_latents, m]: their activations, descending; 0 where ``ids`` is -1."""
    counts: Tensor
    """long [n_latents]: number of instances each component fired on (activation > 0)."""

    def instances(self, component: int) -> list[int]:
        """Ids of the component's top instances, most activating first."""
        row = self.ids[component]
        return row[row >= 0].tolist()


MERGE_BLOCK_ENTRIES = 1 << 20
"""Top-m state entries (component x rank) merged at a time."""


def default_merge_at(n_latents: int, m: int) -> int:
    """Pending firings that trigger a merge by default: a quarter of what the state holds."""
    return max(n_latents * m // 4, 1 << 16)


class TopActivationsAccumulator:
    """Streaming top-m per component: memory O(n_latents x m + batch), whatever N is.

    ``update`` keeps a batch's firings that can still enter a top-m (at or above the
    component's current m-th value) as pending; once a quarter of n_latents x m of them
    are pending they are merged with the current top-m's, block of components by block
    (``MERGE_BLOCK_ENTRIES`` of state at a time), so the sorts' temporaries stay a
    fraction of the state (at 32,768 components and m = 400 one sort of the whole state
    and a full pending buffer took about 1 GB, reached only past 100,000 instances). The
    top-m of a union is the top-m of the union of top-m's, so the result equals a dense
    sort over all instances.
    """

    def __init__(self, n_latents: int, m: int = 20, *, merge_at: int | None = None) -> None:
        if n_latents < 1 or m < 1:
            raise InputError(f"top activations need n_latents >= 1 and m >= 1 "
                             f"(got n_latents={n_latents}, m={m})")
        self.m = m
        self.ids = torch.full((n_latents, m), -1, dtype=torch.long)
        self.values = torch.full((n_latents, m), -math.inf)
        self.counts = torch.zeros(n_latents, dtype=torch.long)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._n_pending = 0
        self._merge_at = merge_at or default_merge_at(n_latents, m)

    def update(self, ids: Tensor, codes: Any) -> None:
        """Add a batch: instance ids long [b] (unique) and sparse codes with
        ``.indices`` long [b, k] and ``.values`` float [b, k]."""
        n_latents = self.ids.shape[0]
        indices, values = codes.indices.detach().cpu(), codes.values.detach().cpu().float()
        ids = ids.detach().cpu().long()
        if indices.shape != values.shape or indices.dim() != 2 or indices.shape[0] != ids.shape[0]:
            raise ValueError(f"codes must be [b, k] with b = len(ids); got indices "
                             f"{tuple(indices.shape)}, values {tuple(values.shape)}, ids {len(ids)}")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError("instance ids repeat within a batch (max-pool tokens per instance first)")
        fired = values > 0
        lat, val = indices[fired], values[fired]
        iid = ids[:, None].expand_as(indices)[fired]
        if lat.numel() == 0:
            return
        if int(lat.min()) < 0 or int(lat.max()) >= n_latents:
            raise ValueError(f"component index out of range [0, {n_latents})")
        self.counts += torch.bincount(lat, minlength=n_latents)
        # a firing below a component's current m-th value can never enter its top-m (that
        # value only grows); dropping them first makes most batches cheap once buffers fill
        enters = val >= self.values[lat, -1]
        if bool(enters.any()):
            self._pending.append((lat[enters], val[enters], iid[enters]))
            self._n_pending += int(enters.sum())
        if self._n_pending >= self._merge_at:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        lat, val, iid = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending, self._n_pending = [], 0
        order = torch.sort(lat, stable=True).indices
        lat, val, iid = lat[order], val[order], iid[order]
        del order
        per_block = max(1, MERGE_BLOCK_ENTRIES // self.m)  # components per block
        edges = torch.searchsorted(lat, torch.arange(0, self.ids.shape[0] + per_block, per_block))
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
            if b > a:
                self._merge_block(lat[a:b], val[a:b], iid[a:b])

    def _merge_block(self, lat: Tensor, val: Tensor, iid: Tensor) -> None:
        touched = torch.unique(lat)
        old_ids, old_vals = self.ids[touched], self.values[touched]
        kept = old_ids >= 0
        lat = torch.cat([touched[:, None].expand_as(old_ids)[kept], lat])
        val = torch.cat([old_vals[kept], val])
        iid = torch.cat([old_ids[kept], iid])
        # order by (component asc, value desc, id asc): a stable sort by id, then one by
        # component and value together (values are positive floats, whose bit patterns
        # order as the values do, so value desc is 2^31 - 1 - bits asc)
        order = torch.sort(iid, stable=True).indices
        bits = val[order].view(torch.int32).long()
        key = lat[order] * (1 << 31) + ((1 << 31) - 1 - bits)
        order = order[torch.sort(key, stable=True).indices]
        lat, val, iid = lat[order], val[order], iid[order]
        rank = torch.arange(lat.numel()) - torch.searchsorted(lat, lat)
        top = rank < self.m
        # a component's number of entries only grows, so every old slot is rewritten
        self.ids[lat[top], rank[top]] = iid[top]
        self.values[lat[top], rank[top]] = val[top]

    def nbytes(self) -> int:
        """Memory held now: the top-m state plus pending firings (at most ``merge_at``
        plus one batch's)."""
        tensors = [self.ids, self.values, self.counts, *(t for p in self._pending for t in p)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def result(self) -> TopActivations:
        self._merge()
        values = torch.where(self.ids >= 0, self.values, torch.zeros(()))
        return TopActivations(self.ids.clone(), values, self.counts.clone())


def top_activations(batches: Iterable[tuple[Tensor, Any]], n_latents: int,
                    m: int = 20) -> TopActivations:
    """Top-m activating instances per component in one pass over
    ``(instance ids long [b], codes)`` batches (codes: ``.indices``/``.values`` [b, k],
    e.g. ``clipaudit.sae.SparseCodes``; spatial-token codes max-pooled per instance)."""
    acc = TopActivationsAccumulator(n_latents, m)
    for ids, codes in batches:
        acc.update(ids, codes)
    return acc.result()


# ------------------------------------------------------------------ descriptions


@dataclass(frozen=True)
class ComponentDescriptions:
    """What each component means, in a reference CLIP's embedding space."""

    semantic: Tensor
    """float [n_latents, D]: unit semantic embeddings s_j; zero rows for dead components."""
    clarity: Tensor
    """float [n_latents]: mean pairwise cosine of the top instances; NaN below two."""
    concept: list[str]
    """Concept label per component ("" for dead components)."""
    concept_score: Tensor
    """float [n_latents]: alignment of the label; NaN for dead components."""
    class_alignment: Tensor
    """float [n_latents, C]: alpha[j, c], max alignment over class c's texts; NaN if dead."""
    class_names: list[str]
    """The C classes, in ``class_alignment``'s column order."""
    vocabulary: str
    """Name of the concept vocabulary (merged names joined by ``+``)."""
    empty_text: Tensor
    """float [D]: unit T(""), the alignment baseline."""
    top: TopActivations
    """The top instances the descriptions were computed from."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Reference model and anything else the caller wants recorded."""
    labels: LabelCentroids | None = None
    """Per label of the reference set, the unit mean of its reference embeddings: the
    anchors of the calibrated alignment."""
    calibration: Calibration | None = None
    """Calibrated class alignment [n_latents, C] (``clipaudit.describe.calibration``)."""

    @property
    def calibrated_alignment(self) -> Tensor:
        """float [n_latents, C]: the class alignment on the model's own scale (NaN where a
        class could not be calibrated or a component is dead)."""
        if self.calibration is None:
            return torch.full_like(self.class_alignment, math.nan)
        return self.calibration.calibrated

    def alignment(self, text_embeds: Tensor) -> Tensor:
        """alignment(j, t) [n_latents, T] for reference-model text embeddings [T, D]
        (unnormalised is fine); NaN rows for dead components."""
        return _alignment(self.semantic, _unit(text_embeds.float()), self.empty_text)


def describe_components(top: TopActivations, ref_image_embeds: Tensor,
                        text_encoder: TextEncoder, vocabulary: ConceptVocabulary,
                        class_texts: dict[str, list[str]], *,
                        templates: Sequence[str] = ("{}",),
                        provenance: dict[str, Any] | None = None,
                        label_floor: str = "scrambled",
                        reference_labels: Sequence[str | None] | None = None,
                        calibration_embeds: Tensor | None = None
                        ) -> ComponentDescriptions:
    """Semantic embedding, clarity, concept label, class alignment and calibrated class
    alignment per component.

    ``ref_image_embeds`` [N, D] holds the reference model's image embeddings indexed
    by instance id (zero rows: no embedding; such instances are left out);
    ``reference_labels`` (one per row, or None) anchor the calibration; they label the
    rows of ``calibration_embeds`` when given (a sample of the reference set as a dense
    [S, D] matrix, when ``ref_image_embeds`` is read lazily), else of ``ref_image_embeds``.
    ``templates`` render each concept phrasing (``"a photo of {}"``); class texts are
    used verbatim. ``provenance`` (e.g. the reference model's) is kept, with the
    vocabulary, templates and m added. ``label_floor``: ``scrambled`` labels a
    component whose best term does not beat the vocabulary's scrambled phrases
    ``unlabelled (closest: TERM)`` (``clipaudit.describe.labels``); ``off`` keeps the
    nearest term whatever it scores.
    """
    if not vocabulary.concepts:
        raise InputError(f"concept vocabulary {vocabulary.name!r} has no concepts")
    for t in templates:
        if "{}" not in t:
            raise InputError(f"concept template {t!r} has no '{{}}' for the concept")
    if not templates:
        raise InputError("at least one concept template is needed (default: '{}')")
    semantic, clarity = semantic_embeddings(top, ref_image_embeds)
    dim = semantic.shape[1]
    empty = _encode(text_encoder, [""], dim)[0]

    concept_embeds = concept_embeddings(vocabulary, text_encoder, templates, dim)
    score, best = _best_alignment(semantic, concept_embeds, empty)
    dead = semantic.norm(dim=1) == 0
    concept = ["" if d else vocabulary.concepts[i] for i, d in zip(best.tolist(), dead.tolist())]
    concept = _floored(concept, score, semantic, empty, text_encoder, vocabulary, templates, dim,
                       label_floor)

    class_names = list(class_texts)
    class_alpha = _class_aligner(empty, text_encoder, class_texts, dim)
    anchors = ref_image_embeds if calibration_embeds is None else calibration_embeds
    labels = label_centroids(anchors, reference_labels)
    alpha = class_alpha(semantic)
    return ComponentDescriptions(
        semantic=semantic, clarity=clarity, concept=concept, concept_score=score,
        class_alignment=alpha, class_names=class_names, vocabulary=vocabulary.name,
        empty_text=empty, top=top,
        provenance={**(provenance or {}), "vocabulary": vocabulary.name,
                    "templates": list(templates), "m": int(top.ids.shape[1]),
                    "label_floor": label_floor},
        labels=labels,
        calibration=calibrate(alpha, class_names, class_alpha, labels, anchors,
                              reference_labels),
    )


def _floored(concept: list[str], score: Tensor, semantic: Tensor, empty: Tensor,
             text_encoder: TextEncoder, vocabulary: ConceptVocabulary, templates: Sequence[str],
             dim: int, label_floor: str) -> list[str]:
    """Labels whose best term does not beat the scrambled vocabulary become unlabelled."""
    from clipaudit.describe.labels import LABEL_FLOORS, apply_label_floor, scrambled_phrases

    if label_floor not in LABEL_FLOORS:
        raise InputError(f"label floor {label_floor!r}: expected one of {', '.join(LABEL_FLOORS)}")
    if label_floor == "off":
        return concept
    null = ConceptVocabulary("scrambled", scrambled_phrases(vocabulary.concepts))
    null_align = _alignment(semantic, concept_embeddings(null, text_encoder, templates, dim), empty)
    return apply_label_floor(concept, score, null_align)


def realign_classes(descriptions: ComponentDescriptions, text_encoder: TextEncoder,
                    class_texts: dict[str, list[str]], ref_image_embeds: Tensor | None = None,
                    reference_labels: Sequence[str | None] | None = None) -> ComponentDescriptions:
    """The same descriptions with the class alignment (raw and calibrated) recomputed for
    ``class_texts`` (what a new head needs; the semantic embeddings and labels stay).
    ``ref_image_embeds`` lets classes without labelled reference images be calibrated
    zero-shot."""
    dim = descriptions.semantic.shape[1]
    class_alpha = _class_aligner(descriptions.empty_text, text_encoder, class_texts, dim)
    alpha = class_alpha(descriptions.semantic)
    labels = descriptions.labels or label_centroids(torch.zeros(0, dim), None)
    calibration = calibrate(alpha, list(class_texts), class_alpha, labels, ref_image_embeds,
                            reference_labels)
    return dataclasses.replace(descriptions, class_alignment=alpha, class_names=list(class_texts),
                               labels=labels, calibration=calibration)


def _class_aligner(empty: Tensor, text_encoder: TextEncoder, class_texts: dict[str, list[str]],
                   dim: int) -> Callable[[Tensor], Tensor]:
    """A function from unit image-space vectors [n, D] to alpha [n, C]: per class, the max
    alignment over its texts (texts encoded once)."""
    class_names = list(class_texts)
    for name in class_names:
        if not class_texts[name]:
            raise InputError(f"class {name!r} has no texts to align components with")
    flat = [t for name in class_names for t in class_texts[name]]
    embeds = _encode(text_encoder, flat, dim) if flat else torch.zeros(0, dim)
    owner = torch.repeat_interleave(torch.arange(len(class_names)),
                                    torch.tensor([len(class_texts[n]) for n in class_names],
                                                 dtype=torch.long))

    def class_alpha(vectors: Tensor) -> Tensor:
        alpha = torch.full((vectors.shape[0], len(class_names)), -math.inf)
        step = max(1, _CHUNK_FLOATS // max(1, vectors.shape[0]))  # [n, step] at a time
        for start in range(0, len(flat), step):
            part = _alignment(vectors, embeds[start:start + step], empty)
            cls = owner[start:start + step]
            alpha.scatter_reduce_(1, cls.expand_as(part).contiguous(), part, reduce="amax")
        alpha[vectors.norm(dim=1) == 0] = math.nan
        return alpha

    return class_alpha


def _best_alignment(semantic: Tensor, texts_unit: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """(max alignment, its text's index) per component, texts in chunks: a vocabulary of
    tens of thousands of concepts never makes an [n_latents, V] matrix."""
    score = torch.full((semantic.shape[0],), -math.inf)
    best = torch.zeros(semantic.shape[0], dtype=torch.long)
    step = max(1, _CHUNK_FLOATS // max(1, semantic.shape[0]))
    for start in range(0, texts_unit.shape[0], step):
        part_score, part_best = _alignment(semantic, texts_unit[start:start + step], empty).max(dim=1)
        better = part_score > score
        score = torch.where(better, part_score, score)
        best = torch.where(better, part_best + start, best)
    dead = semantic.norm(dim=1) == 0
    score[dead] = math.nan
    return score, best


def semantic_embeddings(top: TopActivations, ref_image_embeds: Tensor) -> tuple[Tensor, Tensor]:
    """(s [n_latents, D] unit or zero, clarity [n_latents]) from the top instances'
    reference embeddings.

    Each instance is read once however many components' top lists hold it (instances in
    id order, blocks of ``_CHUNK_FLOATS`` floats), and padding slots (-1) are never read:
    a wide SAE on a small set has mostly padding, and an instance sits in the top-m of
    many components. Each instance's unit embedding is then added to the sum of every
    component that holds it; memory stays O(block + n_latents x D) beside
    ``ref_image_embeds``, which is only indexed (a lazy reader is fine)."""
    n_ref, dim = ref_image_embeds.shape
    if top.ids.numel() and int(top.ids.max()) >= n_ref:
        raise MismatchError(f"top activations name instance id {int(top.ids.max())} but the "
                            f"reference embeddings hold only {n_ref} rows (ids index rows)")
    n_latents = top.ids.shape[0]
    valid = top.ids >= 0
    component = torch.arange(n_latents)[:, None].expand_as(top.ids)[valid]
    instance = top.ids[valid]
    order = torch.argsort(instance, stable=True)  # entries grouped by instance
    component, instance = component[order], instance[order]
    ids, counts = torch.unique_consecutive(instance, return_counts=True)
    ends = torch.cumsum(counts, 0)
    total = torch.zeros(n_latents, dim)
    n = torch.zeros(n_latents)
    block = max(1, _CHUNK_FLOATS // max(1, dim))
    for start in range(0, len(ids), block):
        rows = ref_image_embeds[ids[start:start + block]].float()  # [b, D]
        present = rows.norm(dim=-1) > 0  # zero rows: no reference embedding
        first = int(ends[start - 1]) if start else 0
        last = int(ends[min(start + block, len(ids)) - 1])
        owner = torch.repeat_interleave(torch.arange(len(rows)), counts[start:start + block])
        keep = present[owner]
        comp, owner = component[first:last][keep], owner[keep]
        # total[j] += unit[i] for every entry (j, i): a sparse [n_latents, b] x dense
        # product, the sparse side in compressed rows (twice as fast as COO on CPU)
        by_comp = torch.sort(comp, stable=True).indices
        crow = torch.zeros(n_latents + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(comp, minlength=n_latents), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is used plainly
            warnings.simplefilter("ignore", UserWarning)
            holds = torch.sparse_csr_tensor(crow, owner[by_comp], torch.ones(len(comp)),
                                            (n_latents, len(rows)), check_invariants=False)
        total += holds @ _unit(rows)
        n += torch.bincount(comp, minlength=n_latents)
    semantic = _unit(total)
    # sum of all pairwise cosines = |sum u|^2 - n (the n self-pairs), over n(n-1) pairs
    pairs = n * (n - 1)
    clarity = torch.where(n >= 2, (total.pow(2).sum(dim=1) - n) / pairs.clamp(min=1),
                          torch.tensor(math.nan))
    return semantic, clarity


def concept_embeddings(vocabulary: ConceptVocabulary, text_encoder: TextEncoder,
                       templates: Sequence[str] = ("{}",), dim: int | None = None) -> Tensor:
    """[V, D] unit: per concept, the normalised mean of the normalised embeddings of
    its phrasings x templates (what concept labels are chosen with)."""
    if dim is None:
        dim = int(text_encoder([""]).shape[-1])
    texts, owner = [], []
    for i, concept in enumerate(vocabulary.concepts):
        for phrase in vocabulary.phrases(concept):
            for template in templates:
                texts.append(template.replace("{}", phrase))
                owner.append(i)
    embeds = _encode(text_encoder, texts, dim)
    sums = torch.zeros(len(vocabulary.concepts), dim).index_add_(0, torch.tensor(owner), embeds)
    return _unit(sums)


def _encode(text_encoder: TextEncoder, texts: list[str], dim: int) -> Tensor:
    embeds = text_encoder(texts).detach().float().cpu()
    if embeds.shape != (len(texts), dim):
        raise MismatchError(f"reference text encoder returned {tuple(embeds.shape)} for "
                            f"{len(texts)} texts; the image embeddings have width {dim}")
    return _unit(embeds)


def _alignment(semantic: Tensor, texts_unit: Tensor, empty_unit: Tensor) -> Tensor:
    align = semantic @ texts_unit.T - (semantic @ empty_unit)[:, None]
    align[semantic.norm(dim=1) == 0] = math.nan
    return align


def _unit(x: Tensor) -> Tensor:
    """Rows scaled to unit norm; zero rows stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# ------------------------------------------------------------------ storage

_TENSOR_FIELDS = ("semantic", "clarity", "concept_score", "class_alignment", "empty_text")


def save_descriptions(fpath: Path | str, descriptions: ComponentDescriptions,
                      provenance: dict[str, Any] | None = None, *, top_kept: int | None = None,
                      class_alignment: bool = True) -> Path:
    """Write descriptions, their top activations and the reference set's label anchors
    to one versioned safetensors file.

    ``top_kept``: keep only each component's first top instances (the semantic embeddings
    were computed from all m; what is reused later is which images to show).
    ``class_alignment=False`` leaves the class alignments (raw and calibrated) out (a
    reuse recomputes them for its own classes): an SAE of 32,768 components and 1,000
    classes then saves 131 MB each.

    The semantic embeddings are stored in float16 (unit vectors: about three significant
    digits, alignments read back within 1e-3), top instance ids as int32: 35 MB instead
    of 71 MB at 32,768 components and D = 512. Files of schema 2 (float32, int64) still
    load."""
    from clipaudit.results import to_dict

    d = descriptions
    dim = d.semantic.shape[1]
    labels = d.labels or label_centroids(torch.zeros(0, dim), None)
    names = [n for n in _TENSOR_FIELDS if class_alignment or n != "class_alignment"]
    tensors = {name: getattr(d, name) for name in names}
    tensors["semantic"] = d.semantic.half()  # unit vectors: float16 keeps ~3 digits
    keep = slice(None) if top_kept is None else slice(0, top_kept)
    tensors |= {"top_ids": d.top.ids[:, keep].to(torch.int32).contiguous(),
                "top_values": d.top.values[:, keep].contiguous(),
                "top_counts": d.top.counts,
                "label_centroids": labels.centroids, "label_overall": labels.overall}
    if class_alignment:
        tensors["calibrated_alignment"] = d.calibrated_alignment
    meta = {"concept": d.concept, "class_names": d.class_names if class_alignment else [],
            "vocabulary": d.vocabulary, "description_provenance": d.provenance,
            "label_names": labels.names, "label_counts": labels.counts,
            "calibration": to_dict(d.calibration.classes) if d.calibration and class_alignment else []}
    return save_tensors(fpath, "component-descriptions", tensors, meta,
                        provenance or d.provenance)


def load_descriptions(fpath: Path | str) -> ComponentDescriptions:
    """Read a file written by ``save_descriptions``."""
    from clipaudit.results import ClassCalibration, from_dict

    f = load_tensors(fpath, "component-descriptions")
    t, meta = f.tensors, f.meta
    t["semantic"] = t["semantic"].float()  # float16 since schema 3
    top = TopActivations(t["top_ids"].long(), t["top_values"], t["top_counts"])
    if "class_alignment" not in t:  # saved without: a reuse recomputes it
        t["class_alignment"] = torch.empty(t["semantic"].shape[0], 0)
    labels = LabelCentroids(list(meta["label_names"]), t["label_centroids"],
                            [int(n) for n in meta["label_counts"]], t["label_overall"])
    calibration = Calibration(t.get("calibrated_alignment", torch.empty(t["semantic"].shape[0], 0)),
                              [from_dict(ClassCalibration, c) for c in meta["calibration"]])
    return ComponentDescriptions(
        **{name: t[name] for name in _TENSOR_FIELDS}, concept=list(meta["concept"]),
        class_names=list(meta["class_names"]), vocabulary=meta["vocabulary"], top=top,
        provenance=dict(meta.get("description_provenance") or {}), labels=labels,
        calibration=calibration,
    )


# ------------------------------------------------------------------ images


@torch.no_grad()
def encode_reference_images(backbone: Any, items: Any, *, batch_size: int = 64,
                            num_workers: int = 0,
                            reporter: Reporter = NULL_REPORTER) -> Tensor:
    """Image embeddings [max id + 1, D] of a reference model other than the audited
    CLIP (``backbone``: a ``clipaudit.extraction.backbone.Backbone``), row = instance id.

    ``items``: DataFrame with ``id`` and ``path`` columns. Images that cannot be
    decoded, and ids not in ``items``, get zero rows (``describe_components``
    leaves them out).
    """
    from clipaudit.extraction.data import iter_decoded

    _require_columns(items, ("id", "path"))
    n_rows = int(items["id"].max()) + 1 if len(items) else 0
    out = torch.zeros(n_rows, backbone.embed_dim)
    model, device = backbone.model, backbone.device
    task = reporter.task("Encoding images with the reference model", total=len(items))
    try:
        for batch in iter_decoded(items, backbone.preprocess, batch_size=batch_size,
                                  num_workers=num_workers):
            for iid, reason in batch.skipped:
                log.warning("reference model: skipping instance %s (%s)", iid, reason)
            if len(batch.ids):
                embeds = model.encode_image(batch.images.to(device))
                out[batch.ids.long()] = embeds.float().cpu()
            task.advance(len(batch.ids) + len(batch.skipped))
    finally:
        task.close()
    return out


def write_thumbnails(ids: Iterable[int], items: Any, out_dpath: Path | str,
                     size: int = 192) -> dict[int, str]:
    """Small PNGs ``<out_dpath>/<id>.png`` (longest side ``size``) for the report.

    Returns id -> path relative to ``out_dpath``'s parent (``thumbnails/17.png``),
    for the ids whose image could be decoded; others (and -1 padding) are logged
    and left out. Existing thumbnails are overwritten.
    """
    from clipaudit.extraction.data import ImageDecodeError, decode_image

    _require_columns(items, ("id", "path"))
    out_dpath = Path(out_dpath)
    out_dpath.mkdir(parents=True, exist_ok=True)
    path_of = dict(zip(items["id"].astype(int), items["path"].astype(str)))
    written: dict[int, str] = {}
    for iid in dict.fromkeys(int(i) for i in ids if int(i) >= 0):
        if iid not in path_of:
            log.warning("thumbnail: instance %d is not in the index", iid)
            continue
        try:  # decoded exactly as for the model: EXIF orientation, alpha on white, 16-bit
            thumb = decode_image(path_of[iid])
        except ImageDecodeError as e:
            log.warning("thumbnail: skipping instance %d (%s)", iid, e)
            continue
        thumb.thumbnail((size, size))
        with atomic_path(out_dpath / f"{iid}.png") as tmp:
            thumb.save(tmp, format="PNG")
        written[iid] = f"{out_dpath.name}/{iid}.png"
    return written


def _require_columns(items: Any, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in getattr(items, "columns", ())]
    if missing:
        raise InputError(f"instance table lacks column(s) {', '.join(missing)}")
