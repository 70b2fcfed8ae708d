import pytest
import torch

from clipaudit.errors import ArtifactError, InputError, MismatchError
from clipaudit.heads import (
    LinearProbe,
    ProbeConfig,
    fit_probe,
    load_probe,
    load_prompt_set,
    make_zero_shot_head,
    save_probe,
)


def _blobs(n_per_class=60, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 3
    x = torch.cat([centres[c] + torch.randn(n_per_class, dim, generator=g) for c in range(3)])
    labels = [name for name in ("cat", "dog", "eel") for _ in range(n_per_class)]
    return x, labels


@pytest.mark.parametrize("normalisation", ["none", "l2", "standardize"])
def test_fit_probe_separates_blobs_and_round_trips(tmp_path, normalisation):
    x, labels = _blobs()
    fit = fit_probe(x, labels, ProbeConfig(normalisation=normalisation),
                    provenance={"backbone": {"id": "m@1"}})
    assert fit.probe.class_names == ["cat", "dog", "eel"]
    assert fit.metrics["heldout_accuracy"] > 0.9
    assert set(fit.metrics["heldout_accuracy_per_class"]) == {"cat", "dog", "eel"}
    pred = fit.probe.scores(x).argmax(1)
    assert (pred == torch.tensor([0] * 60 + [1] * 60 + [2] * 60)).float().mean() > 0.9
    save_probe(fit.probe, tmp_path / "p.safetensors")
    loaded = load_probe(tmp_path / "p.safetensors", expect_backbone_id="m@1", expect_dim=8)
    torch.testing.assert_close(loaded.scores(x), fit.probe.scores(x))
    assert loaded.normalisation == normalisation


def test_binary_probe_has_two_rows_with_the_same_decision():
    x, labels = _blobs()
    keep = [i for i, lab in enumerate(labels) if lab != "eel"]
    fit = fit_probe(x[keep], [labels[i] for i in keep])
    assert fit.probe.weight.shape == (2, 8)
    assert fit.metrics["heldout_accuracy"] > 0.9


def test_probe_mismatch_and_bad_files_are_refused(tmp_path):
    probe = LinearProbe(torch.randn(2, 4), torch.zeros(2), ["a", "b"], "none",
                        meta={"provenance": {"backbone": {"id": "model-A"}}})
    save_probe(probe, tmp_path / "p.safetensors")
    with pytest.raises(MismatchError, match="expected 5.*file has 4"):
        load_probe(tmp_path / "p.safetensors", expect_dim=5)
    with pytest.raises(MismatchError, match="model-B.*model-A"):
        load_probe(tmp_path / "p.safetensors", expect_backbone_id="model-B")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ArtifactError, match="junk.safetensors"):
        load_probe(tmp_path / "junk.safetensors")


def test_user_probe_exported_from_sklearn_loads(tmp_path):
    """The README's recipe for bringing your own probe."""
    import json

    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    x, labels = _blobs()
    clf = LogisticRegression(max_iter=500).fit(x.numpy(), labels)
    save_file({"weight": torch.tensor(clf.coef_, dtype=torch.float32).contiguous(),
               "bias": torch.tensor(clf.intercept_, dtype=torch.float32)},
              str(tmp_path / "mine.safetensors"),
              metadata={"clipaudit": json.dumps({"kind": "probe", "schema_version": 1,
                                                  "class_names": list(clf.classes_),
                                                  "normalisation": "none"})})
    probe = load_probe(tmp_path / "mine.safetensors")
    expected = torch.tensor(clf.decision_function(x.numpy()), dtype=torch.float32)
    torch.testing.assert_close(probe.scores(x), expected, rtol=1e-4, atol=1e-4)


def test_too_few_classes_is_a_user_error():
    with pytest.raises(InputError, match="two classes"):
        fit_probe(torch.randn(10, 3), ["a"] * 10)


def test_prompt_set_ensembles_and_validates(tmp_path):
    fpath = tmp_path / "p.yaml"
    fpath.write_text("templates: ['a photo of {}.', '{}']\n"
                     "classes:\n  cat: {names: [a cat, a kitten]}\n  dog: {prompts: [a dog photo]}\n")
    ps = load_prompt_set(fpath)
    assert ps.texts["cat"] == ["a photo of a cat.", "a cat", "a photo of a kitten.", "a kitten"]
    assert ps.texts["dog"] == ["a dog photo"]

    def encode(texts):  # deterministic fake text tower
        return torch.stack([torch.tensor([len(t), 1.0, t.count("a")]) for t in texts])

    head = make_zero_shot_head(ps, encode)
    emb = encode(ps.texts["cat"])
    mean = (emb / emb.norm(dim=1, keepdim=True)).mean(0)
    torch.testing.assert_close(head.text_dirs[0], mean / mean.norm())
    e = torch.randn(4, 3)
    torch.testing.assert_close(head.scores(e), torch.nn.functional.cosine_similarity(
        e[:, None], head.text_dirs[None], dim=-1))


@pytest.mark.parametrize("text,match", [
    ("classes: [a, b]", "mapping of at least two"),
    ("classes: {a: {names: [x]}}", "at least two"),
    ("classes: {a: {names: [x]}, b: {nmes: [y]}}", "classes.b: unknown key"),
    ("classes: {a: {names: x}, b: {names: [y]}}", "classes.a.names: expected a list"),
    ("templates: ['no slot']\nclasses: {a: {names: [x]}, b: {names: [y]}}", "templates\\[0\\]"),
    ("foo: 1", "unknown key"),
    ("[: bad", "not valid YAML"),
])
def test_prompt_set_errors_name_the_file_and_key(tmp_path, text, match):
    fpath = tmp_path / "bad.yaml"
    fpath.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_prompt_set(fpath)
    assert "bad.yaml" in str(info.value)
