"""The streaming audit's pieces against the dense computations they replace:
per-class relevance, the attribution table, spilled codes, sparse AUCs and ablations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clipaudit.attribution.ablation import ablation_effect
from clipaudit.attribution.audit_pass import relevance_over_spill
from clipaudit.attribution.patching import attribute_cls, class_relevance
from clipaudit.attribution.sparse_ablation import (
    AblationContext,
    ComponentAblation,
    ablate_component,
    ablation_effect_sparse,
    class_effect,
)
from clipaudit.attribution.spill import CodeSpill
from clipaudit.attribution.stream import RelevanceAccumulator, attribute_batch
from clipaudit.attribution.table import AttributionTableWriter, kept_classes
from clipaudit.extraction.hooks import VisionTower
from clipaudit.findings import metadata_aucs
from clipaudit.findings.evidence import (
    Firing,
    binary_columns,
    firing_rows,
    sparse_metadata_aucs,
)
from clipaudit.heads import LinearProbe, ZeroShotHead
from clipaudit.sae.model import TopKSAE

from conftest import tiny_backbone

N, K, LATENTS, CLASSES = 300, 4, 24, 5


@pytest.fixture(scope="module")
def setup():
    backbone = tiny_backbone("tiny-vit-a")
    tower = VisionTower(backbone.model)
    d, dim = tower.width, backbone.embed_dim
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sae = TopKSAE(d, LATENTS, K)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.b_enc.copy_(torch.randn(LATENTS, generator=g) * 0.1)
    acts = torch.randn(N, d, generator=g) * 2 + torch.randn(d, generator=g)
    t = torch.randn(CLASSES, dim, generator=g)
    names = [f"class {i}" for i in range(CLASSES)]
    heads = {"zero-shot": ZeroShotHead(t / t.norm(dim=1, keepdim=True), names),
             "probe": LinearProbe(torch.randn(CLASSES, dim, generator=g),
                                  torch.randn(CLASSES, generator=g), names, "l2")}
    labels = [names[i % CLASSES] if i % 7 else None for i in range(N)]
    return {"tower": tower, "sae": sae, "acts": acts, "heads": heads, "labels": labels}


def _truth(labels, names):
    return torch.tensor([names.index(x) if x in names else -1 for x in labels])


@pytest.mark.parametrize("head_name", ["zero-shot", "probe"])
def test_streamed_relevance_equals_the_dense_computation(setup, head_name):
    sae, tower, acts, head = setup["sae"], setup["tower"], setup["acts"], setup["heads"][head_name]
    dense = attribute_cls(acts, torch.arange(N), sae, head, tower)
    expected = class_relevance(dense, setup["labels"])
    acc = RelevanceAccumulator(LATENTS, CLASSES)
    truth = _truth(setup["labels"], head.class_names)
    readout = None
    for start in range(0, N, 64):  # batches of another size than the dense pass
        h = acts[start:start + 64]
        batch = attribute_batch(h, sae.encode(h), sae, head, tower, readout)
        readout = batch.readout
        t = truth[start:start + 64]
        acc.add(batch, torch.where(t >= 0, t, batch.predictions))
        chosen = torch.stack([batch.predictions, t.clamp_min(0)], 1)
        rows = dense.rows >= start
        rows &= dense.rows < start + len(h)
        # any class of any instance, from the gather: equals the dense values
        values = batch.components(chosen)
        slot = (batch.indices[dense.rows[rows] - start] == dense.components[rows, None]).int().argmax(1)
        for r_i, (row, s) in enumerate(zip(dense.rows[rows] - start, slot)):
            want = dense.values[rows][r_i][chosen[row]]
            torch.testing.assert_close(values[row, s], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.error(chosen), dense.error[start:start + 64].gather(1, chosen),
                                   rtol=1e-4, atol=1e-5)
    got = acc.result("label")
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.share, expected.share, rtol=1e-4, atol=1e-6)
    assert got.n_instances.tolist() == expected.n_instances.tolist()
    torch.testing.assert_close(got.unexplained_share, expected.unexplained_share, rtol=1e-4, atol=1e-6)


def test_relevance_over_spilled_codes_equals_the_first_pass(setup, tmp_path):
    sae, tower, acts, head = setup["sae"], setup["tower"], setup["acts"], setup["heads"]["probe"]
    spill = CodeSpill(tmp_path / "spill", N, ("inv-0",))
    acc = RelevanceAccumulator(LATENTS, CLASSES)
    assign = torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(3))
    readout = None
    for start in range(0, N, 50):
        h = acts[start:start + 50]
        codes = sae.encode(h)
        batch = attribute_batch(h, codes, sae, head, tower, readout)
        readout = batch.readout
        acc.add(batch, assign[start:start + 50])
        spill.append(codes.indices, codes.values, {"inv-0": batch.dec})
    spill.finish()
    rel = relevance_over_spill(spill, readout, "inv-0", assign.numpy(), "label")
    torch.testing.assert_close(rel.share, acc.result("label").share, rtol=1e-4, atol=1e-6)
    # rows come back in any order, chunks in row order
    pos = np.array([7, 3, 299, 0])
    idx, z = spill.rows(pos)
    codes = sae.encode(acts[torch.from_numpy(pos)])
    assert torch.equal(idx, codes.indices) and torch.equal(z, codes.values)
    starts = [s for s, *_ in spill.chunks(chunk_rows=128)]
    assert starts == [0, 128, 256]
    with pytest.raises(ValueError, match="expects"):
        CodeSpill(tmp_path / "other", 1, ("inv-0",)).append(idx[:1], z[:1])


def test_the_attribution_table_adds_up_to_the_scores(setup, tmp_path):
    sae, tower, acts, head = setup["sae"], setup["tower"], setup["acts"], setup["heads"]["zero-shot"]
    truth = _truth(setup["labels"], head.class_names)
    writer = AttributionTableWriter(tmp_path / "attributions-zs", head.class_names, "top3", {"head": "zs"})
    for start in (0, 150):
        h = acts[start:start + 150]
        writer.add(torch.arange(start, start + 150) + 1000, attribute_batch(h, sae.encode(h), sae, head, tower),
                   truth[start:start + 150])
        writer.flush()
    writer.close()
    assert sorted(p.name for p in (tmp_path / "attributions-zs").iterdir()) == \
        ["part-00000.parquet", "part-00001.parquet"]
    table = pd.read_parquet(tmp_path / "attributions-zs")
    assert str(table["activation"].dtype) == "float16" and isinstance(table["class"].dtype, pd.CategoricalDtype)
    per = table.groupby(["instance_id", "class"], observed=True).agg(
        attribution=("attribution", lambda x: x.astype("float64").sum()), error=("error", "first"),
        bias=("bias", "first"), score=("score", "first"), is_label=("is_label", "first"),
        is_pred=("is_pred", "first"))
    b_c = dict(zip(head.class_names, head.linear_form(torch.ones(1, head.text_dirs.shape[1])).bias.tolist()))
    bias_c = np.array([b_c[c] for c in per.index.get_level_values("class")])
    total = per["attribution"] + per["error"].astype("float64") + per["bias"].astype("float64") + bias_c
    np.testing.assert_allclose(total, per["score"].astype("float64"), atol=0.02)
    counts = per.groupby(level="instance_id").size()
    assert counts.min() >= 3 and counts.max() <= 5  # top3, label and prediction, without repeats
    assert per["is_pred"].groupby(level="instance_id").sum().eq(1).all()
    labelled = [i + 1000 for i in range(N) if truth[i] >= 0]
    assert per["is_label"].groupby(level="instance_id").sum()[labelled].eq(1).all()


def test_kept_classes_drop_repeats_and_unknown_labels():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.1, 0.2, 0.3]])
    kept = kept_classes("label+pred", scores, torch.tensor([1, -1]))
    assert [sorted(x for x in row if x >= 0) for row in kept.tolist()] == [[1], [0]]
    kept = kept_classes("top3", scores, torch.tensor([0, 3]))
    assert [sorted(x for x in row if x >= 0) for row in kept.tolist()] == [[0, 1, 2, 3], [0, 2, 3]]
    assert kept_classes("all", scores, torch.tensor([0, 3])).shape == (2, 4)


def _auc_cases():
    rng = np.random.default_rng(0)
    n = 400
    fire = rng.random(n) < 0.3
    values = np.where(fire, rng.choice([0.5, 1.0, 1.5, 2.0], n), 0.0).astype(np.float32)
    meta = pd.DataFrame({
        "has_ruler": rng.random(n) < 0.4 + 0.4 * fire,
        "site": rng.choice(["a", "b"], n),
        "tone": pd.Series(rng.choice(["dark", "light", None], n), dtype="object"),
        "three": rng.choice(["x", "y", "z"], n),
        "all_true": np.ones(n, bool),
    })
    return values, meta


def test_sparse_aucs_equal_sklearn_with_ties_and_missing_values():
    values, meta = _auc_cases()
    positions = np.flatnonzero(values)
    got = sparse_metadata_aucs(Firing(positions, values[positions]), binary_columns(meta))
    want = metadata_aucs(values, meta)
    # column keys: binary columns whole, a categorical one value by value; one-valued left out
    assert set(got) == set(want) == {"has_ruler", "site", "tone", "three=x", "three=y", "three=z"}
    for column in want:
        assert got[column] == pytest.approx(want[column], abs=1e-12)
    # negative activations (SAEs without ReLU) rank below the silent zeros
    signed = values.copy()
    signed[positions[::3]] *= -1
    got = sparse_metadata_aucs(Firing(positions, signed[positions]), binary_columns(meta))
    assert got["has_ruler"] == pytest.approx(roc_auc_score(meta["has_ruler"], signed), abs=1e-12)


def test_firing_rows_find_every_nonzero_entry_in_budgeted_groups():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(10, generator=g)[:3] for _ in range(100)])  # as TopK: no repeats
    val = torch.rand(100, 3, generator=g) * (torch.rand(100, 3, generator=g) > 0.2)

    def chunks():
        for s in range(0, 100, 33):
            yield s, idx[s:s + 33], val[s:s + 33]

    groups = list(firing_rows(chunks, [4, 7, 4], torch.full((10,), 1 << 22)))
    assert [sorted(g) for g in groups] == [[4, 7]]
    groups = list(firing_rows(chunks, [4, 7], torch.full((10,), 1 << 23)))
    assert [list(g) for g in groups] == [[4], [7]]  # over budget together: one pass each
    for j in (4, 7):
        dense = (val * (idx == j)).sum(1)
        firing = next(g[j] for g in groups if j in g)
        assert firing.positions.tolist() == torch.nonzero(dense).flatten().tolist()
        np.testing.assert_allclose(firing.values, dense[dense != 0].numpy())


@pytest.mark.parametrize("labelled", [True, False])
def test_sparse_ablation_equals_the_dense_ablation(setup, labelled):
    sae, tower, acts, head = setup["sae"], setup["tower"], setup["acts"], setup["heads"]["probe"]
    labels = setup["labels"] if labelled else [None] * N
    rng = np.random.default_rng(1)
    meta = pd.DataFrame({"has_ruler": rng.random(N) < 0.5, "site": rng.choice(["a", "b", "c"], N),
                         "many": rng.integers(0, 50, N)})
    with torch.no_grad():
        codes = sae.encode(acts)
        pred = head.scores(tower.readout_cls(acts)).argmax(1).numpy()
    ctx = AblationContext.build(pred, _truth(labels, head.class_names).numpy(), meta)
    for j in torch.unique(codes.indices)[:6].tolist():
        column = (codes.values * (codes.indices == j)).sum(1)
        positions = torch.nonzero(column).flatten().numpy()
        firing = Firing(positions, column[positions].numpy())
        for c in ("class 0", "class 3"):
            want = ablation_effect(acts, sae, head, tower, j, c, labels, meta)
            got = ablation_effect_sparse(ctx, head, tower, sae, j, c, firing,
                                         acts[torch.from_numpy(positions)])
            assert got.flipped == want.flipped and got.component == want.component
            assert got.score_delta == pytest.approx(want.score_delta, abs=1e-5)
            for key in ("accuracy_before", "accuracy_after"):
                assert getattr(got, key) == pytest.approx(getattr(want, key))
            assert [(s.column, s.value, s.n, s.flipped) for s in got.slices] == \
                [(s.column, s.value, s.n, s.flipped) for s in want.slices]
            for a, b in zip(got.slices, want.slices):
                assert a.score_delta == pytest.approx(b.score_delta, abs=1e-5)
                assert a.accuracy_after == pytest.approx(b.accuracy_after)


def test_ablation_in_row_chunks_for_some_classes_equals_the_whole_ablation(setup):
    """The audit ablates a component's firing rows in chunks, keeping the candidates'
    classes' score changes only: the effects must not change."""
    sae, tower, acts, head = setup["sae"], setup["tower"], setup["acts"], setup["heads"]["probe"]
    rng = np.random.default_rng(2)
    meta = pd.DataFrame({"site": rng.choice(["a", "b"], N)})
    with torch.no_grad():
        codes = sae.encode(acts)
        pred = head.scores(tower.readout_cls(acts)).argmax(1).numpy()
    ctx = AblationContext.build(pred, _truth(setup["labels"], head.class_names).numpy(), meta)
    j = int(torch.mode(codes.indices.flatten()).values)  # fires on many rows
    column = (codes.values * (codes.indices == j)).sum(1)
    positions = torch.nonzero(column).flatten().numpy()
    firing = Firing(positions, column[positions].numpy())
    assert len(positions) > 10
    whole = ablate_component(ctx, head, tower, sae, j, firing, acts[torch.from_numpy(positions)])
    classes = [3, 0]
    chunks = [ablate_component(ctx, head, tower, sae, j, Firing(positions[a:a + 7], firing.values[a:a + 7]),
                               acts[torch.from_numpy(positions[a:a + 7])], classes)
              for a in range(0, len(positions), 7)]
    joined = ComponentAblation.concat(chunks)
    assert joined.delta.shape == (len(positions), 2)
    for c in classes:
        want = class_effect(ctx, whole, j, c, f"class {c}")
        got = class_effect(ctx, joined, j, c, f"class {c}")
        assert got.flipped == want.flipped and got.accuracy_after == want.accuracy_after
        assert got.score_delta == pytest.approx(want.score_delta, abs=1e-9)
        assert [(x.score_delta, x.flipped) for x in got.slices] == \
            [pytest.approx((x.score_delta, x.flipped), abs=1e-9) for x in want.slices]


def test_the_audits_descriptions_file_keeps_what_a_reuse_needs(tmp_path):
    from types import SimpleNamespace

    from clipaudit.describe.components import (
        describe_components,
        load_descriptions,
        realign_classes,
        save_descriptions,
        top_activations,
    )
    from clipaudit.describe.concepts import ConceptVocabulary

    g = torch.Generator().manual_seed(0)
    codes = SimpleNamespace(indices=torch.randint(0, 6, (40, 1), generator=g),
                            values=torch.rand(40, 1, generator=g) + 0.1)
    top = top_activations([(torch.arange(40), codes)], 6, m=10)
    ref = torch.randn(40, 8, generator=g)

    def encoder(texts):
        return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(len(t))) for t in texts])

    desc = describe_components(top, ref, encoder, ConceptVocabulary("v", ["a", "bb", "ccc"]),
                               {"x": ["x1"], "y": ["yy2"]})
    back = load_descriptions(save_descriptions(tmp_path / "d.safetensors", desc, top_kept=3,
                                               class_alignment=False))
    assert back.class_alignment.shape == (6, 0) and back.class_names == []
    assert torch.equal(back.top.ids, desc.top.ids[:, :3]) and torch.equal(back.top.counts, desc.top.counts)
    again = realign_classes(back, encoder, {"x": ["x1"], "y": ["yy2"]})
    # the semantic embeddings come back from float16
    torch.testing.assert_close(again.class_alignment, desc.class_alignment, equal_nan=True,
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("input_norm", ["layer_norm", "constant_norm_rescale"])
def test_streamed_attributions_of_a_row_normalising_threshold_sae_equal_the_dense_ones(
        setup, tmp_path, input_norm):
    """Published SAEs (Prisma's normalisation, ReLU/JumpReLU thresholds): a row's decoder is
    affine per row and the number of active latents varies; the streamed closed form, the
    relevance over the spill and the completeness of the attributions still hold."""
    tower, acts, head = setup["tower"], setup["acts"], setup["heads"]["probe"]
    d = tower.width
    g = torch.Generator().manual_seed(5)
    sae = TopKSAE(d, LATENTS, K, activation="threshold", input_norm=input_norm)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(LATENTS, d, generator=g) / d ** 0.5)
        sae.b_enc.copy_(torch.randn(LATENTS, generator=g) * 0.3 - 0.2)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    dense = attribute_cls(acts, torch.arange(N), sae, head, tower)
    widths = set()
    spill = CodeSpill(tmp_path / f"spill-{input_norm}", N, ("inv-0",))
    acc = RelevanceAccumulator(LATENTS, CLASSES)
    assign = torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(3))
    readout = None
    for start in range(0, N, 50):
        h = acts[start:start + 50]
        codes = sae.encode(h)
        widths.add(codes.indices.shape[1])
        batch = attribute_batch(h, codes, sae, head, tower, readout)
        readout = batch.readout
        classes = torch.arange(CLASSES).expand(len(h), -1)
        # every class: components + error + bias add up to the score minus the head's bias
        total = batch.components(classes).sum(1) + batch.error(classes) + batch.bias(classes)
        torch.testing.assert_close(total, batch.scores - readout.head_bias, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(batch.error(classes), dense.error[start:start + 50],
                                   rtol=1e-3, atol=1e-4)
        acc.add(batch, assign[start:start + 50])
        spill.append(codes.indices, codes.values, {"inv-0": batch.dec})
    spill.finish()
    assert len(widths) > 1  # rows of several widths went through the spill
    rel = relevance_over_spill(spill, readout, "inv-0", assign.numpy(), "label")
    torch.testing.assert_close(rel.share, acc.result("label").share, rtol=1e-4, atol=1e-6)
    expected = class_relevance(dense, [head.class_names[i] for i in assign.tolist()])
    torch.testing.assert_close(acc.result("label").mean, expected.mean, rtol=1e-3, atol=1e-5)
