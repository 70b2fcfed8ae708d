import math
import zlib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image

from clipaudit.describe.components import (
    TopActivationsAccumulator,
    describe_components,
    encode_reference_images,
    load_descriptions,
    save_descriptions,
    top_activations,
    write_thumbnails,
)
from clipaudit.describe.concepts import ConceptVocabulary
from clipaudit.errors import InputError, MismatchError
from tests.conftest import tiny_backbone

# ------------------------------------------------------------------ top activations


def _random_codes(n: int, n_latents: int, k: int, seed: int):
    """Dense [n, n_latents] activations with k candidate latents per row; values from
    a few levels (ties), some zero (did not fire); latent 0 never fires, the last
    latent fires rarely (fewer than m times)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(n_latents)
    weights[0], weights[-1] = 0.0, 0.02
    indices = torch.stack([torch.multinomial(weights, k, generator=g) for _ in range(n)])
    values = torch.randint(0, 4, (n, k), generator=g).float() * 0.5
    dense = torch.zeros(n, n_latents).scatter_(1, indices, values)
    return indices, values, dense


def _brute_force(dense: torch.Tensor, ids: torch.Tensor, m: int):
    n_latents = dense.shape[1]
    top_ids = torch.full((n_latents, m), -1, dtype=torch.long)
    top_vals = torch.zeros(n_latents, m)
    for j in range(n_latents):
        fired = sorted((-float(dense[r, j]), int(ids[r])) for r in range(len(ids))
                        if dense[r, j] > 0)[:m]
        for slot, (neg, iid) in enumerate(fired):
            top_ids[j, slot], top_vals[j, slot] = iid, -neg
    return top_ids, top_vals, (dense > 0).sum(0)


def _batches(ids, indices, values, sizes):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        yield ids[sl], SimpleNamespace(indices=indices[sl], values=values[sl])
        start += size


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("blocked", [False, True])
def test_top_activations_equals_dense_top_m(seed, m, blocked, monkeypatch):
    n, n_latents, k = 60, 12, 3
    indices, values, dense = _random_codes(n, n_latents, k, seed)
    # instance ids in shuffled order and non-contiguous, so tie-breaking is by id, not position
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    sizes = [7, 1, 20, 13, 19]
    if blocked:  # merges every few firings, a few components at a time
        monkeypatch.setattr("clipaudit.describe.components.MERGE_BLOCK_ENTRIES", 7)
        acc = TopActivationsAccumulator(n_latents, m, merge_at=10)
        for batch_ids, codes in _batches(ids, indices, values, sizes):
            acc.update(batch_ids, codes)
        top = acc.result()
    else:
        top = top_activations(_batches(ids, indices, values, sizes), n_latents, m)
    want_ids, want_vals, want_counts = _brute_force(dense, ids, m)
    assert torch.equal(top.ids, want_ids)
    torch.testing.assert_close(top.values, want_vals)
    assert torch.equal(top.counts, want_counts)
    assert top.counts[0] == 0 and (top.ids[0] == -1).all()  # dead component
    assert top.instances(0) == []


def test_top_activations_ties_prefer_lower_ids_across_batches():
    codes = SimpleNamespace(indices=torch.tensor([[0], [0]]), values=torch.tensor([[1.0], [1.0]]))
    batches = [(torch.tensor([9, 4]), codes), (torch.tensor([7, 2]), codes)]
    top = top_activations(batches, n_latents=1, m=3)
    assert top.ids.tolist() == [[2, 4, 7]]
    assert top.counts.tolist() == [4]


def test_top_activations_memory_does_not_depend_on_n():
    """State (n_latents x m) plus pending firings (merged at ``merge_at``) is bounded
    by the same figure after 40 or 4,000 instances, and the result stays exact."""
    state_bytes = 16 * 4 * (8 + 4) + 16 * 8  # ids long, values float32, counts long
    firing_bytes = 8 + 4 + 8  # component, value, id
    bound = state_bytes + (50 + 40 * 3) * firing_bytes  # merge_at + one batch of firings
    for n in (40, 4000):
        acc = TopActivationsAccumulator(n_latents=16, m=4, merge_at=50)
        indices, values, dense = _random_codes(n, 16, 3, seed=1)
        peak = 0
        for ids, codes in _batches(torch.arange(n), indices, values, [40] * (n // 40)):
            acc.update(ids, codes)
            peak = max(peak, acc.nbytes())
        assert state_bytes <= peak <= bound
        top = acc.result()
        assert acc.nbytes() == state_bytes  # nothing left pending
        want_ids, want_vals, _ = _brute_force(dense, torch.arange(n), 4)
        assert torch.equal(top.values, want_vals) and torch.equal(top.ids, want_ids)


def test_top_activations_rejects_bad_batches():
    acc = TopActivationsAccumulator(4, 2)
    with pytest.raises(ValueError, match="repeat"):
        acc.update(torch.tensor([1, 1]), SimpleNamespace(indices=torch.zeros(2, 1, dtype=torch.long),
                                                         values=torch.ones(2, 1)))
    with pytest.raises(ValueError, match="out of range"):
        acc.update(torch.tensor([1]), SimpleNamespace(indices=torch.tensor([[4]]),
                                                      values=torch.ones(1, 1)))
    with pytest.raises(InputError):
        TopActivationsAccumulator(4, 0)


# ------------------------------------------------------------------ descriptions

D = 16


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


class FakeTextEncoder:
    """Deterministic pseudo-random text embeddings, with chosen directions for some texts."""

    def __init__(self, fixed: dict[str, torch.Tensor]):
        self.fixed = fixed

    def __call__(self, texts):
        rows = []
        for t in texts:
            if t in self.fixed:
                rows.append(self.fixed[t])
            else:
                g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
                rows.append(torch.randn(D, generator=g))
        return torch.stack(rows) * 3.0  # unnormalised on purpose


def _basis(i):
    return torch.eye(D)[i]


def _setup():
    """Components: 0 -> ruler direction (4 instances), 1 -> mixed, 2 -> dead,
    3 -> a single instance."""
    g = torch.Generator().manual_seed(0)
    n = 12
    ref = torch.randn(n, D, generator=g)
    ref[0:4] = _basis(0) * torch.tensor([[1.0], [2.0], [5.0], [0.5]])  # same direction, any scale
    ids = torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1], [-1, -1, -1, -1], [7, -1, -1, -1]])
    counts = (ids >= 0).sum(1)
    top = SimpleNamespace(ids=ids, values=(ids >= 0).float(), counts=counts)
    encoder = FakeTextEncoder({"ruler": _basis(0), "": _basis(5) + 0.3 * _basis(0)})
    vocab = ConceptVocabulary("test", ["ruler", "band-aid", "hair"], {"band-aid": ["plaster"]})
    classes = {"benign": ["a benign nevus", "a mole"], "malignant": ["a melanoma"]}
    return top, ref, encoder, vocab, classes


def _direct_alignment(s, text_embed, empty_embed):
    cos = torch.nn.functional.cosine_similarity
    return float(cos(s, text_embed, dim=0) - cos(s, empty_embed, dim=0))


def test_component_on_a_text_direction_gets_that_label_with_clarity_one():
    top, ref, encoder, vocab, classes = _setup()
    desc = describe_components(top, ref, encoder, vocab, classes)
    assert desc.concept[0] == "ruler"
    assert desc.concept_score[0] > 0
    torch.testing.assert_close(desc.semantic[0], _basis(0))
    assert desc.clarity[0] == pytest.approx(1.0, abs=1e-6)
    # dead component and single-instance component
    assert desc.concept[2] == "" and math.isnan(desc.concept_score[2])
    assert (desc.semantic[2] == 0).all() and desc.class_alignment[2].isnan().all()
    assert math.isnan(desc.clarity[2]) and math.isnan(desc.clarity[3])
    assert desc.concept[3] != "" and not desc.class_alignment[3].isnan().any()
    assert desc.vocabulary == "test" and desc.class_names == ["benign", "malignant"]


def test_alignment_concepts_and_classes_match_direct_computation():
    top, ref, encoder, vocab, classes = _setup()
    templates = ("{}", "a photo of {}")
    desc = describe_components(top, ref, encoder, vocab, classes, templates=templates,
                               label_floor="off")  # the paper's labels: always the argmax
    empty = encoder([""])[0]
    for j in (0, 1, 3):
        valid = top.ids[j][top.ids[j] >= 0]
        s = _unit(_unit(ref[valid]).mean(0))
        torch.testing.assert_close(desc.semantic[j], s)
        # concept embedding: normalised mean over phrasings x templates
        scores = {}
        for c in vocab.concepts:
            texts = [t.format(p) for p in vocab.phrases(c) for t in templates]
            scores[c] = _direct_alignment(s, _unit(encoder(texts)).mean(0), empty)
        best = max(scores, key=scores.get)
        assert desc.concept[j] == best
        assert float(desc.concept_score[j]) == pytest.approx(scores[best], abs=1e-5)
        for c, name in enumerate(desc.class_names):
            want = max(_direct_alignment(s, encoder([t])[0], empty) for t in classes[name])
            assert float(desc.class_alignment[j, c]) == pytest.approx(want, abs=1e-5)
        texts = ["hair", "a mole"]
        got = desc.alignment(encoder(texts))[j]
        want = [_direct_alignment(s, e, empty) for e in encoder(texts)]
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)


def test_semantic_weighs_instances_equally_and_clarity_is_mean_pairwise_cosine():
    ref = torch.stack([10 * _basis(0), _basis(1), _unit(_basis(0) + _basis(1))])
    top = SimpleNamespace(ids=torch.tensor([[0, 1, 2]]), values=torch.ones(1, 3),
                          counts=torch.tensor([3]))
    desc = describe_components(top, ref, FakeTextEncoder({}), ConceptVocabulary("v", ["x"]), {})
    torch.testing.assert_close(desc.semantic[0], _unit(_basis(0) + _basis(1)))
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = sum(float(_unit(ref[a]) @ _unit(ref[b])) for a, b in pairs) / 3
    assert float(desc.clarity[0]) == pytest.approx(want, abs=1e-6)
    assert desc.class_alignment.shape == (1, 0)


def test_semantic_embeddings_do_not_depend_on_the_chunk_size(monkeypatch):
    """Instances are read in blocks of ``_CHUNK_FLOATS`` floats; many tiny blocks (here one
    instance each) give what one block gives, padding slots (-1) included."""
    from clipaudit.describe import components as describe

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, D, generator=g)
    ids = torch.randint(0, 50, (37, 9), generator=g)
    ids[::4, 5:] = -1  # components that fired fewer than m times
    top = SimpleNamespace(ids=ids, values=torch.ones(ids.shape), counts=torch.full((37,), 9))
    whole = describe.semantic_embeddings(top, ref)
    for floats in (1, 3 * D, 7 * D):  # blocks of 1, 3 and 7 instances (and entries)
        monkeypatch.setattr(describe, "_CHUNK_FLOATS", floats)
        chunked = describe.semantic_embeddings(top, ref)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b)
    valid = ids[1] >= 0
    torch.testing.assert_close(whole[0][1], _unit(_unit(ref[ids[1][valid]]).sum(0)))


def test_reference_rows_that_are_zero_are_left_out_and_out_of_range_ids_refused():
    ref = torch.stack([_basis(0), torch.zeros(D), _basis(0)])
    top = SimpleNamespace(ids=torch.tensor([[0, 1, 2]]), values=torch.ones(1, 3),
                          counts=torch.tensor([3]))
    desc = describe_components(top, ref, FakeTextEncoder({}), ConceptVocabulary("v", ["x"]), {})
    assert float(desc.clarity[0]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(MismatchError, match="only 2 rows"):
        describe_components(top, ref[:2], FakeTextEncoder({}), ConceptVocabulary("v", ["x"]), {})
    with pytest.raises(InputError, match="template"):
        describe_components(top, ref, FakeTextEncoder({}), ConceptVocabulary("v", ["x"]), {},
                            templates=("no slot",))


def test_descriptions_round_trip(tmp_path: Path):
    top, ref, encoder, vocab, classes = _setup()
    top = top_activations([(torch.arange(3), SimpleNamespace(
        indices=torch.tensor([[0], [1], [0]]), values=torch.tensor([[2.0], [1.0], [3.0]])))], 4, 4)
    desc = describe_components(top, ref, encoder, vocab, classes,
                               provenance={"reference": {"id": "ref@1"}})
    assert desc.provenance == {"reference": {"id": "ref@1"}, "vocabulary": "test",
                               "templates": ["{}"], "m": 4, "label_floor": "scrambled"}
    fpath = save_descriptions(tmp_path / "components.safetensors", desc)
    back = load_descriptions(fpath)
    assert back.concept == desc.concept and back.class_names == desc.class_names
    assert back.vocabulary == desc.vocabulary and back.provenance == desc.provenance
    assert torch.equal(back.top.values, desc.top.values)
    assert torch.equal(back.top.counts, desc.top.counts)
    for name in ("clarity", "concept_score", "class_alignment", "empty_text"):
        torch.testing.assert_close(getattr(back, name), getattr(desc, name), equal_nan=True)
    # semantic embeddings are stored in float16: unit vectors, read back as float32
    assert back.semantic.dtype == torch.float32
    torch.testing.assert_close(back.semantic, desc.semantic, atol=1e-3, rtol=0)
    assert torch.equal(back.top.ids, desc.top.ids) and back.top.ids.dtype == torch.long


def test_descriptions_of_schema_2_still_load(tmp_path: Path):
    """Schema 2 stored float32 semantic embeddings and int64 top ids."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    top, ref, encoder, vocab, classes = _setup()
    top = top_activations([(torch.arange(3), SimpleNamespace(
        indices=torch.tensor([[0], [1], [0]]), values=torch.tensor([[2.0], [1.0], [3.0]])))], 4, 4)
    desc = describe_components(top, ref, encoder, vocab, classes)
    fpath = save_descriptions(tmp_path / "components.safetensors", desc)
    with safe_open(str(fpath), framework="pt") as f:
        header = json.loads(f.metadata()["clipaudit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors["semantic"].dtype == torch.float16 and header["schema_version"] == 3
    header["schema_version"] = 2
    tensors |= {"semantic": desc.semantic, "top_ids": desc.top.ids}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"clipaudit": json.dumps(header)})
    back = load_descriptions(old)
    assert torch.equal(back.semantic, desc.semantic) and torch.equal(back.top.ids, desc.top.ids)
    assert back.concept == desc.concept


# ------------------------------------------------------------------ images


def _write_images(dpath: Path, n: int) -> pd.DataFrame:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        pixels = (torch.rand(40 + 3 * i, 50, 3, generator=g) * 255).to(torch.uint8).numpy()
        fpath = dpath / f"img{i}.png"
        Image.fromarray(pixels).save(fpath)
        rows.append({"id": 2 * i, "path": str(fpath)})  # non-contiguous ids
    return pd.DataFrame(rows)


def test_encode_reference_images_equals_encode_image(tmp_path: Path):
    backbone = tiny_backbone("tiny-vit-b")
    items = _write_images(tmp_path, 4)
    embeds = encode_reference_images(backbone, items, batch_size=3, num_workers=0)
    images = torch.stack([backbone.preprocess(Image.open(p).convert("RGB")) for p in items.path])
    with torch.no_grad():
        want = backbone.model.encode_image(images)
    assert embeds.shape == (7, backbone.embed_dim)
    torch.testing.assert_close(embeds[items.id.tolist()], want, rtol=1e-4, atol=1e-5)
    assert (embeds[[1, 3, 5]] == 0).all()


def test_write_thumbnails_skips_unreadable_files(tmp_path: Path):
    items = _write_images(tmp_path, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = pd.concat([items, pd.DataFrame([{"id": 9, "path": str(broken)},
                                            {"id": 11, "path": str(tmp_path / "gone.png")}])])
    out = tmp_path / "audit" / "thumbnails"
    written = write_thumbnails([4, 0, -1, 9, 11, 0, 13], items, out, size=24)
    assert written == {4: "thumbnails/4.png", 0: "thumbnails/0.png"}
    for rel in written.values():
        with Image.open(tmp_path / "audit" / rel) as img:
            assert max(img.size) == 24 and img.format == "PNG"
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "4.png"]
