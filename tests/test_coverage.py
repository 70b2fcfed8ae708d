"""SAE coverage: decodable from the activations vs isolated by a component."""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clipaudit.columns import column_keys
from clipaudit.findings.coverage import coverage_status, measure_coverage, sae_coverage, sparse_aucs
from clipaudit.sae import TopKSAE


@pytest.mark.parametrize("seed", range(3))
def test_sparse_aucs_equal_sklearn_on_every_column(seed):
    g = torch.Generator().manual_seed(seed)
    n, n_cols, k = 300, 25, 4
    indices = torch.stack([torch.randperm(n_cols, generator=g)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=g)
    values[values < 0.4] = 0.0
    y = torch.rand(n, generator=g) < 0.3
    fired = values > 0
    rows = torch.arange(n)[:, None].expand_as(indices)[fired]
    got = sparse_aucs(rows, indices[fired], values[fired], y, n_cols)
    dense = torch.zeros(n, n_cols).scatter(1, indices, values)
    want = [roc_auc_score(y.numpy(), dense[:, j].numpy()) for j in range(n_cols)]
    assert np.allclose(got.numpy(), want, atol=1e-6)


def test_duplicate_entries_are_summed_when_asked():
    y = torch.tensor([True, False, True, False])
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0])
    values = torch.tensor([0.2, 0.3, 0.4])
    # row 0 sums to 0.5 > 0.4 (row 1, negative) > 0 (rows 2 and 3): pairs 1 + 1 + 0 + 0.5 of 4
    assert float(sparse_aucs(rows, cols, values, y, 1, sum_duplicates=True)[0]) == 0.625


def _sae(d: int, directions: torch.Tensor, k: int) -> TopKSAE:
    sae = TopKSAE(d, directions.shape[0], k)
    with torch.no_grad():
        sae.W_enc.copy_(directions)
        sae.W_dec.copy_(directions.T)
    return sae


def test_an_isolated_column_and_a_blind_one():
    """Activations encode two binary columns along axes 0 and 1. The SAE has a component
    on axis 0 (``has_ruler`` is isolated) but spreads axis 1 over many components mixed
    with noise (``has_tag`` is decodable, yet no component separates it)."""
    g = torch.Generator().manual_seed(0)
    n, d = 600, 12
    ruler = torch.rand(n, generator=g) < 0.3
    tag = torch.rand(n, generator=g) < 0.4
    acts = torch.randn(n, d, generator=g) * 0.5
    acts[:, 0] += 3.0 * ruler
    acts[:, 1] += 1.5 * tag
    directions = torch.cat([torch.eye(d)[:1], torch.nn.functional.normalize(
        torch.randn(15, d, generator=g) + 0.1 * torch.eye(d)[1], dim=1)])
    sae = _sae(d, directions, k=3)
    meta = pd.DataFrame({"has_ruler": ruler.numpy(), "has_tag": tag.numpy()})
    concepts = ["ruler"] + [f"blob {i}" for i in range(15)]
    by = {c.column: c for c in sae_coverage(acts, sae, meta, concepts=concepts)}
    ruler_cov, tag_cov = by["has_ruler"], by["has_tag"]
    assert ruler_cov.decodable_auc > 0.99 and ruler_cov.best_component == 0
    assert ruler_cov.best_component_auc > 0.99 and ruler_cov.best_concept == "ruler"
    assert coverage_status(ruler_cov, 0.9, 0.9) == "isolated"
    assert tag_cov.decodable_auc > 0.9 and tag_cov.isolated_auc < 0.9
    assert coverage_status(tag_cov, 0.9, 0.9) == "blind"
    assert coverage_status(tag_cov, 0.99, 0.9) == "not-decodable"


def test_too_few_positives_and_categorical_keys():
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(100, 4, generator=g)
    meta = pd.DataFrame({"has_rare": [True] * 3 + [False] * 97,
                         "tone": ["a", "b", "c", "d"] * 25})
    keys = column_keys(meta)
    assert [k.key for k in keys] == ["has_rare", "tone=a", "tone=b", "tone=c", "tone=d"]
    sae = _sae(4, torch.eye(4), k=2)
    got = measure_coverage(acts, *_codes(sae, acts), 4, meta, keys)
    assert got[0].status == "too-few" and got[0].decodable_auc is None
    assert [c.status for c in got[1:]] == ["measured"] * 4
    with pytest.raises(ValueError, match="one metadata row"):
        measure_coverage(acts[:50], *_codes(sae, acts[:50]), 4, meta, keys)


def _codes(sae, acts):
    codes = sae.encode(acts)
    return codes.indices, codes.values.detach()


def test_the_continuous_auc_averages_ties_as_sklearn_does():
    from clipaudit.findings.coverage import roc_auc

    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (200,), generator=g).double()  # many ties
    y = torch.rand(200, generator=g) < 0.4
    assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y.numpy(), scores.numpy()))


def test_a_key_with_missing_values_is_measured_on_its_known_rows():
    g = torch.Generator().manual_seed(3)
    n = 300
    flag = torch.rand(n, generator=g) < 0.5
    acts = torch.randn(n, 4, generator=g)
    acts[:, 0] += 3.0 * flag
    values = pd.Series(flag.numpy(), dtype=object)
    values[:40] = None
    meta = pd.DataFrame({"has_flag": values})
    (cov,) = measure_coverage(acts, *_codes(_sae(4, torch.eye(4), k=1), acts), 4, meta)
    assert cov.n == n - 40 and cov.decodable_auc > 0.95 and cov.best_component == 0
