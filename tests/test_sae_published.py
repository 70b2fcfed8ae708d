"""SAEs published for vision models (ViT-Prisma, CLIP-Scope, dictionary_learning and
sae-for-vlm's Matryoshka BatchTopK, PatchSAE), written here in their own layouts, load
exactly: same codes and reconstructions as their forward passes, re-implemented here
from each project's code. Non-TopK encodings and per-row input normalisation keep
attributions complete and ablations exact."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clipaudit.attribution.ablation import ablated_scores
from clipaudit.attribution.patching import attribute_cls
from clipaudit.cli import app
from clipaudit.errors import ArtifactError
from clipaudit.extraction.readout import make_readout
from clipaudit.heads import LinearProbe
from clipaudit.sae import detect_sae_format, import_sae, load_sae, sae_info, save_sae

from conftest import topk_mask

D, M, K = 12, 40, 5
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(9)) * 2 + 0.3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(seed: int = 3, b_enc: float = 0.0) -> dict[str, torch.Tensor]:
    """W_enc [d, m], b_enc [m], W_dec [m, d] (unit rows), b_dec [d]: SAELens/Prisma layout."""
    g = _gen(seed)
    W_dec = torch.randn(M, D, generator=g)
    return {"W_enc": torch.randn(D, M, generator=g) * 0.5,
            "b_enc": torch.randn(M, generator=g) * 0.3 + b_enc,
            "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(D, generator=g)}


def _assert_exact(sae, x: torch.Tensor, z_ref: torch.Tensor, recon_ref: torch.Tensor) -> None:
    with torch.no_grad():
        z = sae.encode_dense(x)
        recon = sae(x)
    assert torch.equal(z != 0, z_ref != 0), "different active latents"
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recon, recon_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ViT-Prisma


def prisma_forward(w, x, norm: str, k: int | None):
    """vit_prisma/sae/sae.py: run_time_activation_norm_fn_in, encode_standard, decode,
    run_time_activation_norm_fn_out."""
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
    else:  # Prisma's TopK: top-k of the pre-activations, then ReLU
        top = hidden_pre.topk(k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    return acts, undo(acts @ w["W_dec"] + w["b_dec"])


def _write_prisma(dpath: Path, w, *, norm: str, k: int | None, suffix: str = ".pt") -> Path:
    dpath.mkdir(parents=True, exist_ok=True)
    cfg = {"d_in": D, "d_sae": M, "architecture": "standard", "normalize_activations": norm,
           "activation_fn_str": "topk" if k else "relu", "activation_fn_kwargs": {"k": k} if k else {},
           "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
           "hook_point": "blocks.11.hook_resid_post"}
    (dpath / "config.json").write_text(json.dumps(cfg))
    weights = dpath / f"n_images_2600058{suffix}"
    if suffix == ".safetensors":
        save_file({k_: v.contiguous() for k_, v in w.items()}, str(weights))
    else:
        torch.save(w, weights)
    return dpath


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("k", [K, None], ids=["topk", "relu"])
def test_prisma_loads_exactly_with_each_normalisation(tmp_path, x, norm, k):
    w = _weights()
    dpath = _write_prisma(tmp_path / "prisma", w, norm=norm, k=k)
    z_ref, recon_ref = prisma_forward(w, x, norm, k)
    for path in (dpath, next(dpath.glob("*.pt"))):
        assert detect_sae_format(path) == "prisma"
        sae = import_sae(path)
        _assert_exact(sae, x, z_ref, recon_ref)
    assert sae.input_norm == norm and sae.activation == ("topk" if k else "threshold")
    info = sae_info(dpath)
    assert info.source_format == "prisma" and info.input_norm == norm
    if norm != "none":
        assert "undone after decoding" in info.normalisation


def test_prisma_safetensors_weights_and_clipaudit_round_trip(tmp_path, x):
    w = _weights()
    dpath = _write_prisma(tmp_path / "prisma", w, norm="layer_norm", k=K, suffix=".safetensors")
    sae = import_sae(dpath)
    own = tmp_path / "own.safetensors"
    save_sae(sae, own)
    again = load_sae(own)
    assert again.input_norm == "layer_norm" and detect_sae_format(own) == "clipaudit"
    _assert_exact(again, x, *prisma_forward(w, x, "layer_norm", K))


# ---------------------------------------------------------------- CLIP-Scope


def _write_clip_scope(fpath: Path, *, k: int | None) -> dict[str, torch.Tensor]:
    g = _gen(5)
    enc = torch.randn(D, M, generator=g) / (2 ** 0.5) / (D ** 0.5)
    state = {"pre_b": torch.randn(D, generator=g) * 0.01, "enc": enc,
             "dec": enc.T.clone() + torch.randn(M, D, generator=g) * 0.01}
    ckpt = {"n_features": M, "d_in": D, "model_state_dict": state}
    if k is not None:
        ckpt["k"] = k
    torch.save(ckpt, fpath)
    return state


@pytest.mark.parametrize("k", [30, None], ids=["TopKSAE", "SAE-relu"])  # 30 of 40: some negative
def test_clip_scope_loads_exactly(tmp_path, x, k):
    fpath = tmp_path / "1200013184.pt"
    s = _write_clip_scope(fpath, k=k)
    assert detect_sae_format(fpath) == "clip-scope"
    sae = import_sae(fpath)
    pre = (x - s["pre_b"]) @ s["enc"]
    # clipscope: TopKSAE keeps the top-k raw values (no ReLU); SAE applies a ReLU
    latent = pre * topk_mask(pre, k) if k else pre.relu()
    _assert_exact(sae, x, latent, latent @ s["dec"] + s["pre_b"])
    if k:
        assert (latent < 0).any() and not sae.relu


# ---------------------------------------------------------------- dictionary_learning


def _dl_batch_topk(threshold: float) -> dict[str, torch.Tensor]:
    g = _gen(6)
    dec = torch.randn(D, M, generator=g)
    return {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold),
            "decoder.weight": dec / dec.norm(dim=0, keepdim=True),
            "encoder.weight": torch.randn(M, D, generator=g) * 0.5,
            "encoder.bias": torch.randn(M, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g)}


def _write_dl(dpath: Path, state: dict, dict_class: str | None) -> Path:
    dpath.mkdir(parents=True, exist_ok=True)
    torch.save(state, dpath / "ae.pt")
    if dict_class:
        (dpath / "config.json").write_text(json.dumps(
            {"trainer": {"dict_class": dict_class, "k": K, "trainer_class": "BatchTopKTrainer"}}))
    return dpath


@pytest.mark.parametrize("threshold", [0.9, -1.0], ids=["learnt", "never-learnt"])
@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_batch_topk_uses_its_threshold(tmp_path, x, threshold, with_config):
    state = _dl_batch_topk(threshold)
    dpath = _write_dl(tmp_path / "trainer_0", state, "BatchTopKSAE" if with_config else None)
    for path in (dpath, dpath / "ae.pt"):
        assert detect_sae_format(path) == "dictionary-learning"
        sae = import_sae(path)
        # BatchTopKSAE.encode(use_threshold=True), the inference rule
        post = ((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"]).relu()
        f = post * (post > state["threshold"])
        _assert_exact(sae, x, f, f @ state["decoder.weight"].T + state["b_dec"])
    rows = (f != 0).sum(1)
    assert rows.min() != rows.max()  # a threshold activates a varying number per row
    assert sae.meta["architecture"] == "BatchTopKSAE"


def _matryoshka_state() -> dict[str, torch.Tensor]:
    g = _gen(8)
    W_dec = torch.randn(M, D, generator=g)
    return {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.6),
            "group_sizes": torch.tensor([8, 12, 20]),
            "W_enc": torch.randn(D, M, generator=g) * 0.5, "b_enc": torch.randn(M, generator=g) * 0.3,
            "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True), "b_dec": torch.randn(D, generator=g)}


def test_sae_for_vlm_matryoshka_batch_topk_loads_exactly(tmp_path, x):
    state = _matryoshka_state()
    dpath = _write_dl(tmp_path / "matryoshka", state, "MatryoshkaBatchTopKSAE")
    sae = import_sae(dpath)
    # MatryoshkaBatchTopKSAE.encode(use_threshold=True) with every group active
    post = ((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]).relu()
    f = post * (post > state["threshold"])
    _assert_exact(sae, x, f, f @ state["W_dec"] + state["b_dec"])
    info = sae_info(dpath)
    assert info.source_format == "dictionary-learning" and info.architecture == "MatryoshkaBatchTopKSAE"
    assert info.activation == "threshold" and info.threshold == pytest.approx(0.6)


def test_dictionary_learning_topk_relu_and_jumprelu(tmp_path, x):
    topk = {k: v for k, v in _dl_batch_topk(0.5).items() if k != "threshold"}
    sae = import_sae(_write_dl(tmp_path / "topk", topk, None))
    post = ((x - topk["b_dec"]) @ topk["encoder.weight"].T + topk["encoder.bias"]).relu()
    f = post * topk_mask(post, K)  # AutoEncoderTopK: top-k after ReLU
    _assert_exact(sae, x, f, f @ topk["decoder.weight"].T + topk["b_dec"])

    plain = {"encoder.weight": topk["encoder.weight"], "encoder.bias": topk["encoder.bias"],
             "decoder.weight": topk["decoder.weight"], "bias": topk["b_dec"]}
    sae = import_sae(_write_dl(tmp_path / "standard", plain, None))
    f = ((x - plain["bias"]) @ plain["encoder.weight"].T + plain["encoder.bias"]).relu()
    _assert_exact(sae, x, f, f @ plain["decoder.weight"].T + plain["bias"])

    w = _weights(seed=4)
    jump = {**w, "threshold": torch.rand(M, generator=_gen(2))}
    sae = import_sae(_write_dl(tmp_path / "jump", jump, None))
    pre = x @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input = False
    f = (pre * (pre > jump["threshold"])).relu()
    _assert_exact(sae, x, f, f @ w["W_dec"] + w["b_dec"])


# ---------------------------------------------------------------- pickled checkpoints


@dataclasses.dataclass
class ViTSAERunnerConfig:  # PatchSAE's config class, pickled into its checkpoints
    d_in: int = D
    d_sae: int = M


@dataclasses.dataclass
class VisionModelSAERunnerConfig:  # ViT-Prisma's, in its legacy {cfg, state_dict} files
    d_in: int = D
    d_sae: int = M
    activation_fn_str: str = "relu"
    normalize_activations: str = "none"


def _recipe(name: str) -> str:
    """The README's conversion recipe for ``name``, as the user would copy it."""
    text = README.read_text()
    match = re.search(rf"<!-- {name}-recipe -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no {name} recipe"
    return match.group(1)


def test_patchsae_pickle_is_refused_and_the_readme_recipe_converts_it(tmp_path, x, monkeypatch):
    w = _weights(seed=11)
    original = tmp_path / "patchsae.pt"
    torch.save({"cfg": ViTSAERunnerConfig(), "state_dict": w}, original)
    with pytest.raises(ArtifactError, match="PatchSAE checkpoint.*never unpickles.*patchsae"):
        detect_sae_format(original)
    with pytest.raises(ArtifactError, match="PatchSAE"):
        import_sae(original)
    monkeypatch.chdir(tmp_path)  # the recipe reads patchsae.pt and writes patchsae.safetensors
    exec(_recipe("patchsae"), {"__name__": "recipe"})
    converted = tmp_path / "patchsae.safetensors"
    assert detect_sae_format(converted) == "patchsae"
    sae = import_sae(converted)
    f = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).relu()  # PatchSAE forward_standard
    _assert_exact(sae, x, f, f @ w["W_dec"] + w["b_dec"])


def test_prisma_legacy_pickle_is_refused_and_the_readme_recipe_converts_it(tmp_path, x, monkeypatch):
    w = _weights(seed=12)
    original = tmp_path / "sae.pt"
    torch.save({"cfg": VisionModelSAERunnerConfig(), "state_dict": w}, original)
    with pytest.raises(ArtifactError, match="ViT-Prisma checkpoint.*prisma"):
        import_sae(original)
    monkeypatch.chdir(tmp_path)
    exec(_recipe("prisma"), {"__name__": "recipe"})
    sae = import_sae(tmp_path / "prisma-sae")
    _assert_exact(sae, x, *prisma_forward(w, x, "none", None))


# ---------------------------------------------------------------- attribution and CLI


def _head(n_classes: int = 3) -> LinearProbe:
    g = _gen(1)
    return LinearProbe(torch.randn(n_classes, 8, generator=g), torch.randn(n_classes, generator=g),
                       [f"c{i}" for i in range(n_classes)], "l2")


def _readout():
    g = _gen(2)
    ln = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(D, generator=g) + 0.5)
        ln.bias.copy_(torch.randn(D, generator=g) * 0.1)
    proj = torch.nn.Linear(D, 8)
    return make_readout(D, ln, [proj])


@pytest.mark.parametrize("kind", ["prisma-layer_norm", "prisma-constant_norm", "matryoshka"])
def test_attributions_stay_complete_and_ablation_exact_for_these_saes(tmp_path, x, kind):
    if kind == "matryoshka":
        sae = import_sae(_write_dl(tmp_path / "m", _matryoshka_state(), None))
    else:
        norm = "layer_norm" if kind == "prisma-layer_norm" else "constant_norm_rescale"
        sae = import_sae(_write_prisma(tmp_path / "p", _weights(), norm=norm, k=K))
    readout, head = _readout(), _head()
    attr = attribute_cls(x, torch.arange(len(x)), sae, head, readout, batch_size=20)
    total = attr.dense().sum(1) + attr.error + attr.bias
    torch.testing.assert_close(total, attr.scores - attr.head_bias, rtol=1e-4, atol=1e-5)
    # the attribution of each active component against autograd through the SAE's decoder
    with torch.no_grad():
        codes = sae.encode(x)
    z = codes.to_dense(sae.n_latents).requires_grad_(True)
    h_hat = sae.decode_dense(z, codes)
    e = readout.frozen(h_hat + (x - h_hat).detach())
    scores = head.linear_form(e).scores(e)
    for c in range(3):
        (grad,) = torch.autograd.grad(scores[:, c].sum(), z, retain_graph=True)
        torch.testing.assert_close(attr.dense()[:, :, c], (z * grad).detach(), rtol=1e-4, atol=1e-5)
    # ablating a component removes exactly its decoded contribution
    j = int(codes.indices[0, 0])
    zj = codes.to_dense(sae.n_latents)[:, j]
    dense = codes.to_dense(sae.n_latents)
    dense[:, j] = 0
    expected = head.scores(readout(x - (sae.decode_dense(codes.to_dense(sae.n_latents), codes)
                                        - sae.decode_dense(dense, codes))))
    got = ablated_scores(x, sae, head, readout, [j])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (zj != 0).any()


def test_sae_info_names_the_format_architecture_and_normalisation(tmp_path):
    dpath = _write_prisma(tmp_path / "prisma", _weights(), norm="layer_norm", k=K)
    res = CliRunner().invoke(app, ["sae-info", str(dpath)])
    assert res.exit_code == 0, res.output
    assert "format prisma [Prisma topk]" in res.stdout and "TopK SAE, k=5" in res.stdout
    assert "layer_norm" in res.stdout and "undone after decoding" in res.stdout
    dl = _write_dl(tmp_path / "dl", _dl_batch_topk(0.9), "BatchTopKSAE")
    res = CliRunner().invoke(app, ["sae-info", str(dl)])
    assert res.exit_code == 0, res.output
    assert "format dictionary-learning [BatchTopKSAE]" in res.stdout
    assert "active where ReLU(pre) > 0.9" in res.stdout
