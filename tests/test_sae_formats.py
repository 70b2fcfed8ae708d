"""Foreign SAE checkpoints, written here in their source layouts, convert exactly: the
converted SAE gives the same codes (and reconstructions) as a straightforward
reimplementation of each source's forward pass. Nothing is ever unpickled."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipaudit.errors import ArtifactError, InputError, MismatchError
from clipaudit.extraction.sources import InMemorySource
from clipaudit.sae import (
    detect_sae_format,
    import_sae,
    list_sae_formats,
    load_sae,
    sae_info,
    save_sae,
)

from conftest import ReferenceTopKSAE, topk_mask

D, M, K = 12, 40, 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(9)) * 2 + 0.3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same_codes(sae, x: torch.Tensor, z_ref: torch.Tensor) -> None:
    with torch.no_grad():
        z = sae.encode_dense(x)
    assert torch.equal(z != 0, z_ref != 0), "different active latents"
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- attributing-clip


def _write_reference(path: Path, *, parametrizations: bool = False, prefix: str = "",
                     extra: dict | None = None) -> ReferenceTopKSAE:
    torch.manual_seed(4)
    ref = ReferenceTopKSAE(D, M, K, parametrizations=parametrizations)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "original0" in name or "weight_g" in name:
                if name.startswith("encoder"):
                    p.copy_(torch.rand_like(p) + 0.5)  # encoder scales are trained
                else:
                    p.fill_(1.0)  # the decoder's are fixed at 1
        # a negative bias leaves some rows with fewer than k positive pre-activations
        ref.encoder[0].bias.copy_(torch.randn(M) - 2.5)
    state = {prefix + key: value for key, value in ref.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120,
                "pytorch-lightning_version": "2.2.0", **(extra or {})}, path)
    return ref


@pytest.mark.parametrize("parametrizations, prefix", [(False, ""), (True, ""), (False, "sae.")])
def test_reference_checkpoint_converts_exactly(tmp_path, x, parametrizations, prefix):
    fpath = tmp_path / "last.ckpt"
    ref = _write_reference(fpath, parametrizations=parametrizations, prefix=prefix)
    assert detect_sae_format(fpath) == "attributing-clip"
    sae = import_sae(fpath, k=K)
    with torch.no_grad():
        recon, _, z_bar = ref(x)
    _assert_same_codes(sae, x, z_bar)
    assert not sae.relu and (z_bar < 0).any()  # top-k on raw pre-activations, no ReLU
    with torch.no_grad():
        torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(M))
    assert sae.meta["source_format"] == "attributing-clip" and sae.meta["backbone"] is None


def test_reference_checkpoint_needs_k_unless_it_stores_it(tmp_path, x):
    fpath = tmp_path / "last.ckpt"
    _write_reference(fpath)
    with pytest.raises(InputError, match="does not store k"):
        import_sae(fpath)
    _write_reference(fpath, extra={"hyper_parameters": {"sae_k": K}})
    assert import_sae(fpath).k == K


# ---------------------------------------------------------------- SAELens


def _saelens_weights(seed: int = 1, unit_rows: bool = True) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    W_dec = torch.randn(M, D, generator=g)
    if unit_rows:
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    return {"W_enc": torch.randn(D, M, generator=g) * 0.5, "b_enc": torch.randn(M, generator=g),
            "W_dec": W_dec, "b_dec": torch.randn(D, generator=g)}


def _prisma_forward(w: dict[str, torch.Tensor], x: torch.Tensor, norm: str,
                    k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT-Prisma SparseAutoencoder.encode_standard/forward (SAELens' run-time
    normalisation): normalise each row, encode, decode, undo the normalisation."""
    if norm == "constant_norm_rescale":
        coeff = D ** 0.5 / x.norm(dim=-1, keepdim=True)
        x_in, undo = x * coeff, (lambda y: y / coeff)
    elif norm == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        x_in, undo = centred / (std + 1e-5), (lambda y: y * std + mu)
    else:
        x_in, undo = x, (lambda y: y)
    hidden_pre = (x_in - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if k is None:
        acts = hidden_pre.relu()
    else:
        top = hidden_pre.topk(k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    return acts, undo(acts @ w["W_dec"] + w["b_dec"])


def _write_saelens(dpath: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    dpath.mkdir(parents=True, exist_ok=True)
    (dpath / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(dpath / "sae_weights.safetensors"))
    return dpath


def _saelens_forward(w: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor,
                     factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens TopKSAE.encode/decode; ``factor``: the activation store's scaling."""
    sae_in = x * factor - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
    top = hidden_pre.topk(k, dim=-1)
    acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    return acts, (acts @ w["W_dec"] + w["b_dec"]) / factor


@pytest.mark.parametrize("cfg", [
    {"architecture": "topk", "d_in": D, "d_sae": M, "k": K, "apply_b_dec_to_input": True,
     "normalize_activations": "none"},
    {"architecture": "topk", "d_in": D, "d_sae": M, "k": K, "apply_b_dec_to_input": False,
     "normalize_activations": "none"},
    {"d_in": D, "d_sae": M, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
     "apply_b_dec_to_input": True, "normalize_activations": "none", "model_name": "vit"},
], ids=["b_dec-applied", "b_dec-not-applied", "legacy-cfg"])
def test_saelens_folder_converts_exactly(tmp_path, x, cfg):
    w = _saelens_weights()
    dpath = _write_saelens(tmp_path / "sae", cfg, w)
    acts, recon = _saelens_forward(w, cfg, x)
    for path in (dpath, dpath / "sae_weights.safetensors", dpath / "cfg.json"):
        assert detect_sae_format(path) == "saelens"
        sae = import_sae(path)
        _assert_same_codes(sae, x, acts)
        with torch.no_grad():
            torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)
    assert sae.relu and sae.meta["source_config"]["d_in"] == D


def test_saelens_expected_average_normalisation_uses_the_given_scale(tmp_path, x, caplog):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": M, "k": K,
           "normalize_activations": "expected_average_only_in"}
    w = _saelens_weights()
    dpath = _write_saelens(tmp_path / "sae", cfg, w)
    acts, recon = _saelens_forward(w, cfg, x, factor=0.37)
    sae = import_sae(dpath, scale=0.37)
    _assert_same_codes(sae, x, acts)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)
    # without the factor: a warning note, scale 1
    with caplog.at_level(logging.WARNING):
        plain = import_sae(dpath)
    assert float(plain.scale) == 1.0 and "does not store" in " ".join(plain.meta["notes"])
    assert "does not store" in caplog.text
    cfg["norm_scaling_factor"] = 0.37
    _write_saelens(dpath, cfg, w)
    assert float(import_sae(dpath).scale) == pytest.approx(0.37)


def test_saelens_non_unit_decoder_rows_are_kept_exactly(tmp_path, x):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": M, "k": K}
    w = _saelens_weights(unit_rows=False)
    sae = import_sae(_write_saelens(tmp_path / "sae", cfg, w))
    acts, recon = _saelens_forward(w, cfg, x)
    _assert_same_codes(sae, x, acts)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)
    assert any("not unit-norm" in note for note in sae.meta["notes"])


def test_saelens_relu_sae_reads_exactly_and_as_topk_when_asked(tmp_path, x):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": M}
    w = _saelens_weights()
    dpath = _write_saelens(tmp_path / "sae", cfg, w)
    ref = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()
    sae = import_sae(dpath)
    assert sae.activation == "threshold"
    _assert_same_codes(sae, x, ref)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), ref @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert (ref != 0).sum(1).max() > K  # more than K active: TopK-K would not be exact
    topk = import_sae(dpath, k=K)
    assert topk.activation == "topk" and "exact only" in " ".join(topk.meta["notes"])


def test_saelens_jumprelu_uses_its_thresholds(tmp_path, x):
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": M}
    w = {**_saelens_weights(), "threshold": torch.rand(M, generator=_gen(7)) * 2}
    sae = import_sae(_write_saelens(tmp_path / "sae", cfg, w))
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    ref = pre.relu() * (pre > w["threshold"])  # SAELens: activation(pre) * (pre > threshold)
    _assert_same_codes(sae, x, ref)


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_saelens_per_row_normalisation_is_undone_after_decoding(tmp_path, x, norm):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": M, "k": K, "normalize_activations": norm}
    w = _saelens_weights()
    sae = import_sae(_write_saelens(tmp_path / "sae", cfg, w))
    acts, recon = _prisma_forward(w, x, norm, k=K)
    _assert_same_codes(sae, x, acts)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), recon, rtol=1e-5, atol=1e-5)


def test_saelens_configs_clipaudit_cannot_represent_are_refused(tmp_path):
    cfg = {"architecture": "gated", "d_in": D, "d_sae": M}
    dpath = _write_saelens(tmp_path / "sae", cfg, _saelens_weights())
    with pytest.raises(ArtifactError, match="not supported"):
        import_sae(dpath)


# ---------------------------------------------------------------- saev


def _saev_weights(seed: int = 2) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    W_dec = torch.randn(M, D, generator=g)
    return {"W_enc": torch.randn(D, M, generator=g) * 0.5, "b_enc": torch.randn(M, generator=g),
            "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(D, generator=g)}


def _write_saev(fpath: Path, header: dict, state: dict) -> Path:
    with open(fpath, "wb") as fd:
        fd.write((json.dumps(header) + "\n").encode("utf-8"))
        torch.save(state, fd)
    return fpath


SAEV_TOPK_V2 = {"schema": 2, "cfg": {"d_vit": D, "exp_factor": M // D, "seed": 0,
                                     "activation": {"cls": "TopK", "params": {"top_k": K}}},
                "commit": "abc1234", "lib": "0.4.0"}
SAEV_TOPK_V1 = {"schema": 1, "cls": "TopK", "cfg": {"d_vit": D, "exp_factor": 4, "top_k": K},
                "commit": "unknown", "lib": "0.2.0"}
SAEV_RELU_OLD = {"d_vit": D, "exp_factor": 4, "sparsity_coeff": 4e-4, "ghost_grads": False}


@pytest.mark.parametrize("header", [SAEV_TOPK_V2, SAEV_TOPK_V1], ids=["schema2", "schema1"])
def test_saev_topk_converts_exactly(tmp_path, x, header):
    w = _saev_weights()
    fpath = _write_saev(tmp_path / "sae.pt", header, w)
    assert detect_sae_format(fpath) == "saev"
    sae = import_sae(fpath)
    # saev's current encode: h_pre = x W_enc + b_enc; TopK keeps the raw top-k values
    h_pre = x @ w["W_enc"] + w["b_enc"]
    f_x = h_pre * topk_mask(h_pre, K)
    _assert_same_codes(sae, x, f_x)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), f_x @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert not sae.relu and sae.meta["source_config"]["schema"] == header["schema"]


def test_saev_b_dec_convention_can_be_overridden(tmp_path, x):
    w = _saev_weights()
    fpath = _write_saev(tmp_path / "sae.pt", SAEV_TOPK_V2, w)
    sae = import_sae(fpath, apply_b_dec_to_input=True)
    h_pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    _assert_same_codes(sae, x, h_pre * topk_mask(h_pre, K))


SAEV_RELU_V1A = {"schema": 1, "cls": "Relu", "cfg": {"d_vit": D, "exp_factor": 4},
                 "commit": "unknown", "lib": "0.1.0"}
SAEV_V1B_DEFAULT = {"schema": 1, "cls": "SparseAutoencoderConfig",
                    "cfg": {"d_vit": D, "exp_factor": 4, "seed": 0}, "commit": "x", "lib": "0.2.1"}
SAEV_BATCHTOPK_V2 = {"schema": 2, "cfg": {"d_vit": D, "exp_factor": 4,
                                          "activation": {"cls": "BatchTopK", "params": {"top_k": K}}}}


@pytest.mark.parametrize("header, subtracts, relu", [
    (SAEV_RELU_OLD, True, True), (SAEV_RELU_V1A, True, True), (SAEV_V1B_DEFAULT, False, True),
    (SAEV_BATCHTOPK_V2, False, False),
], ids=["pre-schema", "schema1A-relu", "schema1B-default", "schema2-batchtopk"])
def test_saev_every_header_schema_reads_exactly(tmp_path, x, header, subtracts, relu):
    w = _saev_weights()
    fpath = _write_saev(tmp_path / "sae.pt", header, w)
    assert detect_sae_format(fpath) == "saev"
    sae = import_sae(fpath)
    h_pre = (x - w["b_dec"] * subtracts) @ w["W_enc"] + w["b_enc"]
    f_x = h_pre.relu() if relu else h_pre * topk_mask(h_pre, K)  # BatchTopK: per row at inference
    _assert_same_codes(sae, x, f_x)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), f_x @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- safety and detection


class _Boom:
    """Unpickling this would create a file: proof that something was executed."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_torch_files_are_never_unpickled(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Boom(target)}}, ckpt)
    with pytest.raises(ArtifactError, match="pickled Python object") as refused:
        import_sae(ckpt, k=K)
    assert "weights_only" not in str(refused.value)  # never torch's advice to unpickle
    buffer = io.BytesIO()
    torch.save({"W_enc": _Boom(target)}, buffer)
    saev = tmp_path / "evil-sae.pt"
    saev.write_bytes((json.dumps(SAEV_TOPK_V2) + "\n").encode() + buffer.getvalue())
    with pytest.raises(ArtifactError, match="pickled Python object"):
        import_sae(saev)
    assert not target.exists()


def test_unknown_files_and_formats_are_refused_listing_the_formats(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ArtifactError, match="saelens"):
        detect_sae_format(junk)
    with pytest.raises(InputError, match="Available: clipaudit"):
        import_sae(junk, fmt="nope")
    with pytest.raises(ArtifactError, match="not found"):
        import_sae(tmp_path / "missing.pt")
    assert set(list_sae_formats()) == {"clipaudit", "saelens", "saev", "attributing-clip", "prisma",
                                       "clip-scope", "dictionary-learning", "patchsae"}


def test_foreign_sae_checks_width_only_and_can_be_saved_natively(tmp_path, x, caplog):
    fpath = _write_saev(tmp_path / "sae.pt", SAEV_TOPK_V2, _saev_weights())
    with pytest.raises(MismatchError, match=f"expected 768, file has {D}"):
        load_sae(fpath, expect_d=768)
    with caplog.at_level(logging.WARNING):
        sae = load_sae(fpath, expect_backbone_id="ViT-B-16@openai", expect_d=D)
    assert "only its width" in caplog.text
    native = load_sae(save_sae(sae, tmp_path / "native.safetensors"), expect_d=D)
    assert native.meta["source_format"] == "saev" and not native.relu
    with torch.no_grad():
        assert torch.equal(native.encode(x).indices, sae.encode(x).indices)


def test_sae_info_reports_poor_fvu_and_the_scale_that_fixes_it(tmp_path):
    """A published-style checkpoint trained on inputs scaled to a mean squared norm of d,
    shipped without that scale: exact with it, poor without."""
    g = _gen(5)
    # normalised space: a constant offset plus two positive coordinates per row
    e = torch.zeros(400, D).scatter(1, torch.randint(0, D, (400, 2), generator=g),
                                    torch.rand(400, 2, generator=g) + 0.5)
    offset = torch.full((D,), 0.8)
    norm = float((D / (offset + e).pow(2).sum(1).mean()).sqrt())
    x_norm, offset = (offset + e) * norm, offset * norm
    h = x_norm * 40  # what the cache holds: the true input scale is 1/40
    eye = torch.eye(D)
    w = {"W_enc": torch.cat([eye, -eye, torch.zeros(M - 2 * D, D)]).T.contiguous(),
         "b_enc": torch.zeros(M),
         "W_dec": torch.cat([eye, -eye, eye[torch.arange(M - 2 * D) % D]]),
         "b_dec": offset}
    dpath = _write_saelens(tmp_path / "sae", {"architecture": "topk", "d_in": D, "d_sae": M,
                                              "k": 2, "normalize_activations": "none"}, w)
    poor = sae_info(dpath, source=InMemorySource(h))
    assert poor.cache_metrics.fvu > 0.3 and len(poor.warnings) == 1
    assert "--scale 0.025" in poor.warnings[0] and "FVU is 0.000" in poor.warnings[0]
    good = sae_info(dpath, source=InMemorySource(h), scale=1 / 40)
    assert good.cache_metrics.fvu == pytest.approx(0, abs=1e-6) and not good.warnings
    assert good.backbone is None and good.stored_metrics is None
