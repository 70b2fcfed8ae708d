"""TopK SAE: forward pass, sparse training step, training, metrics, files, refusal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipaudit.errors import ArtifactError, InputError, MismatchError
from clipaudit.extraction.sources import InMemorySource
from clipaudit.sae import (
    SAETrainConfig,
    SAETrainer,
    SparseCodes,
    TopKSAE,
    canonical_topk,
    evaluate_sae,
    load_sae,
    save_sae,
    train_sae,
)
from clipaudit.sae.train import initialise_sae

PROVENANCE = {"backbone": {"id": "tiny-vit-a@random-seed0+cfg1234", "model": "tiny-vit-a"},
              "hook": {"layer": 2, "token": "cls"}, "data_sha256": "abc"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the CI machines are shared; small ops are faster on one thread there
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sparse_world(n: int = 3000, d: int = 16, n_true: int = 48, active: int = 3,
                 seed: int = 0) -> torch.Tensor:
    """Rows that are sparse non-negative combinations of random unit directions, plus
    an offset and a little noise: what an SAE should reconstruct well."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_true, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_true, (n, active), generator=gen)
    coef = torch.rand(n, active, generator=gen) * 4
    offset = torch.randn(d, generator=gen)
    return torch.einsum("na,nad->nd", coef, dirs[idx]) + offset + 0.01 * torch.randn(n, d, generator=gen)


def random_sae(d: int = 8, m: int = 24, k: int = 4, seed: int = 0, relu: bool = True,
               scale: float = 1.7) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d, m, generator=gen)
    sae = TopKSAE(d, m, k, relu=relu)
    return sae.set_weights(torch.randn(m, d, generator=gen), torch.randn(m, generator=gen) * 0.1,
                           W_dec / W_dec.norm(dim=0), torch.randn(d, generator=gen), scale)


def reference_forward(sae: TopKSAE, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md's formulas, written densely: (z [n, m], h_hat [n, d])."""
    x = h * sae.scale
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu() if sae.relu else vals)
    return z, (z @ sae.W_dec.T + sae.b_dec) / sae.scale


# ---------------------------------------------------------------- the model


@torch.no_grad()
def test_encode_decode_follow_the_design_formulas():
    sae = random_sae()
    h = torch.randn(10, sae.d) * 3
    z_ref, h_hat_ref = reference_forward(sae, h)
    codes = sae.encode(h)
    assert isinstance(codes, SparseCodes)
    assert codes.indices.shape == codes.values.shape == (10, sae.k)
    assert codes.indices.dtype == torch.long
    torch.testing.assert_close(sae.encode_dense(h), z_ref)
    torch.testing.assert_close(sae.decode(codes), h_hat_ref)
    torch.testing.assert_close(sae.decode_dense(z_ref), h_hat_ref)
    torch.testing.assert_close(sae(h), h_hat_ref)
    assert sae.W_enc.shape == (24, 8) and sae.W_dec.shape == (8, 24)


@torch.no_grad()
def test_leading_dims_are_rows_and_dense_shapes_keep_them():
    sae = random_sae()
    h = torch.randn(3, 5, sae.d)
    assert sae.encode(h).indices.shape == (15, sae.k)
    assert sae.encode_dense(h).shape == (3, 5, sae.n_latents)
    assert sae(h).shape == h.shape
    torch.testing.assert_close(sae.encode_dense(h).reshape(15, -1),
                               sae.encode_dense(h.reshape(15, -1)))


def test_codes_are_canonical_under_ties():
    pre = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                        [2.0, 2.0, 2.0, 2.0, 2.0],
                        [0.5, 4.0, 1.0, 4.0, -1.0]])
    values, indices = canonical_topk(pre, 2)
    assert indices.tolist() == [[1, 2], [0, 1], [1, 3]]
    assert values.tolist() == [[3.0, 3.0], [2.0, 2.0], [4.0, 4.0]]
    # order within a row: value descending, then index
    values, indices = canonical_topk(torch.tensor([[1.0, 5.0, 2.0, 5.0, 3.0]]), 4)
    assert indices.tolist() == [[1, 3, 4, 2]]


@torch.no_grad()
def test_same_input_same_codes():
    sae = random_sae()
    h = torch.randn(50, sae.d)
    a, b = sae.encode(h), sae.encode(h.clone())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_decode_is_differentiable_in_the_code_values():
    sae = random_sae()
    codes = sae.encode(torch.randn(4, sae.d))
    values = codes.values.detach().requires_grad_()
    sae.decode(SparseCodes(codes.indices, values)).sum().backward()
    expected = (sae.W_dec.T[codes.indices].sum(-1) / sae.scale).detach()
    torch.testing.assert_close(values.grad, expected)


def test_w_dec_keeps_its_column_major_layout_when_moved():
    sae = random_sae().to(torch.float64).to(torch.float32)
    assert sae.W_dec.T.is_contiguous()


# ---------------------------------------------------------------- sparse training step


def _dense_reference_grads(sae: TopKSAE, h: torch.Tensor, variance: float, dead: torch.Tensor,
                           aux_k: int, aux_coef: float) -> dict[str, torch.Tensor]:
    """The same loss written densely with plain autograd; W_dec's gradient with its
    component along each (unit) column removed."""
    params = {n: getattr(sae, n).detach().clone().requires_grad_()
              for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = h * sae.scale
    pre = (x - params["b_dec"]) @ params["W_enc"].T + params["b_enc"]
    vals, idx = pre.topk(sae.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    x_hat = z @ params["W_dec"].T + params["b_dec"]
    loss = (x_hat - x).pow(2).sum(1).mean() / variance
    residual = (x - x_hat).detach()
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    a_vals, a_idx = aux_pre.topk(min(aux_k, int(dead.sum())), dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, a_idx, a_vals.relu())
    aux = (z_aux @ params["W_dec"].T - residual).pow(2).sum(1).mean() / residual.pow(2).sum(1).mean()
    (loss + aux_coef * aux).backward()
    grads = {n: p.grad for n, p in params.items()}
    w = params["W_dec"].detach()
    grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * w).sum(0, keepdim=True) * w
    return grads


@pytest.mark.parametrize("dense_below", [0, 10_000], ids=["scatter-kernels", "dense-matmuls"])
def test_sparse_step_gradients_equal_dense_autograd(monkeypatch, dense_below):
    from clipaudit.sae import sparse_ops

    monkeypatch.setattr(sparse_ops, "DENSE_LATENTS_PER_ACTIVE", dense_below)
    sae = random_sae(d=12, m=40, k=5, seed=3)
    h = torch.randn(64, 12, generator=torch.Generator().manual_seed(1)) * 2
    config = SAETrainConfig(n_latents=40, k=5, aux_k=6, aux_coef=0.5)
    trainer = SAETrainer(sae, config, total_steps=10, dead_after_samples=100, data_variance=3.0)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True  # some latents dead, so the auxiliary loss takes part
    trainer.rows_since_fired[dead] = 1000
    trainer.compute_gradients(h)
    expected = _dense_reference_grads(sae, h, 3.0, dead, aux_k=6, aux_coef=0.5)
    for name, grad in expected.items():
        torch.testing.assert_close(getattr(sae, name).grad, grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert float(expected["b_enc"][dead].abs().sum()) > 0  # dead latents did get a gradient


def test_decoder_columns_stay_unit_norm_through_training_steps():
    h = sparse_world(n=512)
    sae = TopKSAE(16, 64, 4)
    config = SAETrainConfig(n_latents=64, k=4, lr=1e-2)
    variance = initialise_sae(sae, h, config)
    trainer = SAETrainer(sae, config, total_steps=20, dead_after_samples=10**6,
                         data_variance=variance)
    before = sae.W_dec.detach().clone()
    for step in range(20):
        trainer.step(h[step * 25:(step + 1) * 25])
    assert not torch.allclose(before, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(64))


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def world() -> InMemorySource:
    return InMemorySource(sparse_world(), provenance=PROVENANCE)


@pytest.fixture(scope="module")
def trained(world):
    return train_sae(world, SAETrainConfig(n_latents=96, k=4, steps=600, batch_size=256, seed=7))


def test_training_explains_structured_data(world, trained):
    untrained = TopKSAE(16, 96, 4)
    initialise_sae(untrained, world.acts, SAETrainConfig(n_latents=96, k=4, seed=7))
    before = evaluate_sae(untrained, world)
    assert before.fvu > 0.3
    assert trained.metrics.fvu < 0.15 < before.fvu / 2
    assert trained.metrics.cosine > 0.97
    assert trained.metrics.l0 <= 4
    assert trained.metrics.dead_fraction <= 0.1
    assert trained.metrics.n_rows == world.n_rows


def test_input_is_scaled_to_mean_squared_norm_d(world, trained):
    x = world.acts * trained.sae.scale
    assert abs(float(x.pow(2).sum(1).mean()) - 16) < 0.5


def test_training_meta_records_provenance_config_and_metrics(trained):
    meta = trained.sae.meta
    assert meta["backbone"] == PROVENANCE["backbone"] and meta["hook"] == PROVENANCE["hook"]
    assert meta["data"]["data_sha256"] == "abc" and meta["data"]["n_rows"] == 3000
    assert (meta["d"], meta["n_latents"], meta["k"], meta["seed"]) == (16, 96, 4, 7)
    assert meta["metrics"]["fvu"] == trained.metrics.fvu
    assert meta["train_config"]["steps"] == 600
    assert meta["source_format"] == "clipaudit"


def test_same_seed_same_weights_other_seed_other_weights(world):
    config = SAETrainConfig(n_latents=32, k=4, steps=15, batch_size=128, seed=1)
    a = train_sae(world, config).sae
    b = train_sae(world, config).sae
    c = train_sae(world, dataclasses.replace(config, seed=2)).sae
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "scale"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.W_dec, c.W_dec)


def _revive_run(aux_coef: float) -> float:
    """A third of the latents start dead (encoder rows shrunk so that they never make
    the top-k, though their pre-activations stay positive on part of the data); returns
    the dead fraction after training."""
    h = sparse_world(n=2048, seed=5)
    config = SAETrainConfig(n_latents=48, k=4, lr=5e-3, aux_k=8, aux_coef=aux_coef)
    sae = TopKSAE(16, 48, 4)
    variance = initialise_sae(sae, h, config)
    with torch.no_grad():
        sae.W_enc[::3] *= 0.02
        sae.b_enc[::3] = 0.01
    source = InMemorySource(h)
    assert evaluate_sae(sae, source).dead_fraction >= 0.3
    trainer = SAETrainer(sae, config, total_steps=240, dead_after_samples=512,
                         data_variance=variance)
    for epoch in range(30):
        for batch in source.iter_batches(256, shuffle=True, seed=epoch):
            trainer.step(batch["acts"])
    return evaluate_sae(sae, source).dead_fraction


def test_aux_k_revives_dead_latents():
    without_aux, with_aux = _revive_run(0.0), _revive_run(1 / 8)
    assert without_aux >= 0.3
    assert with_aux <= without_aux / 2


@pytest.mark.parametrize("change, message", [
    ({"k": 0}, "k must be between"), ({"n_latents": 8, "k": 9}, "k must be between"),
    ({"batch_size": 0}, "batch_size"), ({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"),
    ({"device": "nonsense"}, "device"),
])
def test_bad_training_config_is_a_user_error(world, change, message):
    with pytest.raises(InputError, match=message):
        train_sae(world, SAETrainConfig(**{"steps": 1, **change}))


def test_empty_source_is_a_user_error():
    with pytest.raises(InputError, match="empty"):
        train_sae(InMemorySource(torch.zeros(0, 4)), SAETrainConfig(steps=1))


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def test_metrics_of_an_exact_and_of_a_constant_reconstruction():
    d = 6
    h = torch.randn(500, d, generator=torch.Generator().manual_seed(0))
    # +-e_i dictionary with k = 2d: relu(x) and relu(-x) rebuild x exactly
    eye = torch.eye(d)
    exact = TopKSAE(d, 2 * d, 2 * d).set_weights(torch.cat([eye, -eye]), torch.zeros(2 * d),
                                                 torch.cat([eye, -eye]).T, torch.zeros(d))
    m = evaluate_sae(exact, InMemorySource(h), embed_readout=lambda a: a @ torch.ones(d, 3),
                     batch_size=128)
    assert m.fvu == pytest.approx(0, abs=1e-10) and m.cosine == pytest.approx(1)
    assert m.embed_cosine == pytest.approx(1) and m.dead_fraction == 0 and m.n_rows == 500
    assert m.l0 == pytest.approx(float((h != 0).sum(1).float().mean()))
    # an SAE whose output is always the data mean explains nothing
    mean_only = TopKSAE(d, 4, 1).set_weights(torch.zeros(4, d), torch.zeros(4), eye[:, :4],
                                             h.mean(0))
    m = evaluate_sae(mean_only, InMemorySource(h))
    assert m.fvu == pytest.approx(1, abs=1e-6) and m.embed_cosine is None
    assert m.l0 == 0 and m.dead_fraction == 1


# ---------------------------------------------------------------- files


def test_save_load_round_trip_gives_identical_codes(tmp_path, world, trained):
    fpath = save_sae(trained.sae, tmp_path / "sae.safetensors")
    loaded = load_sae(fpath, expect_backbone_id=PROVENANCE["backbone"]["id"],
                      expect_hook={"layer": 2, "token": "cls"}, expect_d=16)
    with torch.no_grad():
        a, b = trained.sae.encode(world.acts), loaded.encode(world.acts)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "scale"):
        assert torch.equal(getattr(trained.sae, name), getattr(loaded, name)), name
    assert loaded.meta["metrics"] == trained.sae.meta["metrics"]
    assert loaded.meta["source_format"] == "clipaudit" and loaded.relu
    assert loaded.W_dec.T.is_contiguous()


def test_a_loaded_sae_holds_no_view_of_the_files_memory(tmp_path, trained, monkeypatch):
    """safetensors hands out tensors over one memory map of the file; keeping a view (a
    scalar threshold once) kept the whole file mapped: 200 MB at 32,768 latents."""
    import clipaudit.sae.files as files
    from clipaudit.artifacts import TensorFile

    fpath = save_sae(trained.sae, tmp_path / "sae.safetensors")
    real = files.load_tensors

    def one_buffer(*args, **kwargs):  # every tensor a view of one buffer, as over an mmap
        tf = real(*args, **kwargs)
        flat = torch.cat([t.reshape(-1).float() for t in tf.tensors.values()])
        views, at = {}, 0
        for name, t in tf.tensors.items():
            views[name] = flat[at:at + t.numel()].view(t.shape)
            at += t.numel()
        return TensorFile(tensors=views, meta=tf.meta)

    monkeypatch.setattr(files, "load_tensors", one_buffer)
    loaded = files.read_sae_file(fpath)
    for name, t in loaded.state_dict().items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


@pytest.mark.parametrize("kwargs, what, expected, found", [
    ({"expect_backbone_id": "ViT-B-16@openai"}, "backbone", "ViT-B-16@openai",
     PROVENANCE["backbone"]["id"]),
    ({"expect_hook": {"layer": 1, "token": "cls"}}, "hook point", "'layer': 1", "'layer': 2"),
    ({"expect_hook": {"layer": 2, "token": "spatial"}}, "hook point", "spatial", "cls"),
    ({"expect_d": 768}, "width", "768", "16"),
])
def test_loading_for_another_backbone_hook_or_width_is_refused_naming_both(
        tmp_path, trained, kwargs, what, expected, found):
    fpath = save_sae(trained.sae, tmp_path / "sae.safetensors")
    with pytest.raises(MismatchError) as info:
        load_sae(fpath, **kwargs)
    message = str(info.value)
    assert what in message and expected in message and found in message
    assert str(fpath) in message


def test_a_file_of_another_kind_is_refused(tmp_path):
    from clipaudit.artifacts import save_tensors

    fpath = save_tensors(tmp_path / "probe.safetensors", "probe", {"w": torch.zeros(2)}, {})
    with pytest.raises(ArtifactError, match="not an SAE file"):
        load_sae(fpath)
    with pytest.raises(ArtifactError, match="expected a clipaudit 'sae' file"):
        load_sae(fpath, fmt="clipaudit")


@pytest.mark.parametrize("n_latents, batch, threads_inside", [(32, 128, 1), (4096, 1024, 2)])
def test_small_saes_step_on_one_thread_and_the_callers_setting_survives(
        world, monkeypatch, n_latents, batch, threads_inside):
    """Splitting a tiny step over threads costs more than it saves: an SAE whose step is
    below SMALL_STEP_MACS trains on one thread, a larger one on the caller's threads, and
    the caller's setting is back afterwards."""
    from clipaudit.device import torch_threads
    from clipaudit.sae.trainer import SAETrainer

    seen = []
    step = SAETrainer.step
    monkeypatch.setattr(SAETrainer, "step", lambda self, h: (seen.append(torch.get_num_threads()),
                                                             step(self, h))[1])
    with torch_threads(2):
        train_sae(world, SAETrainConfig(n_latents=n_latents, k=4, steps=2, batch_size=batch))
        assert torch.get_num_threads() == 2
    assert set(seen) == {threads_inside}
