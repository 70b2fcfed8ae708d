"""Issue 20 as a new user meets it: their own small CLIP checkpoint (``--checkpoint`` +
``--model-config``) and their own labelled images, through the CLI. Each mistake ends
in exit code 2 with a one-line error, or in a verdict line that shows it:

- case 1: prompt classes that match no label in the data;
- case 7: a vocabulary that describes nothing (``unlabelled (closest: ...)``);
- case 8: SAE settings that do not fit the width and the number of rows;
- case 9: ``explain`` without the audit's concept labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from clipaudit.cli import app

from conftest import CONFIGS_DPATH, tiny_backbone

CONFIG = CONFIGS_DPATH / "tiny-vit-a.json"


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, *fragments: str) -> str:
    """The single error line of an exit-2 run (no traceback), checked for ``fragments``."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for fragment in fragments:
        assert fragment in res.output.replace("\n", " "), (fragment, res.output)
    return errors[0]


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, Path]:
    """A user's checkpoint (random weights saved to a file), a data set with two classes
    made by ``clipaudit synthetic make-dataset``, its cache and an SAE."""
    root = tmp_path_factory.mktemp("own")
    ckpt = root / "my_clip.safetensors"
    model = tiny_backbone("tiny-vit-a", seed=7).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    data = root / "data"
    res = run("synthetic", "make-dataset", "--out", data, "--artifact", "ruler", "--class",
              "malignant", "--rate", "1.0", "-n", "120", "--seed", "5", "--json")
    assert res.exit_code == 0, res.output
    manifest = data / "manifest.csv"  # the user's photos: 60 benign, 25 malignant
    header, *rows = manifest.read_text().splitlines()
    malignant = [r for r in rows if ",malignant," in r]
    kept = [r for r in rows if r not in malignant[25:]]
    manifest.write_text("\n".join([header, *kept]) + "\n")
    cache = root / "cache"
    res = run("extract", manifest, "--out", cache, "--checkpoint", ckpt,
              "--model-config", CONFIG, "--workers", "0", "--batch-size", "32", "--quiet")
    assert res.exit_code == 0, res.output
    sae = root / "sae.safetensors"
    res = run("train-sae", cache, "--out", sae, "--steps", "40", "--batch-size", "64",
              "--quiet", "--json")
    assert res.exit_code == 0, res.output
    return {"root": root, "ckpt": ckpt, "data": data, "cache": cache, "sae": sae}


def _prompts(root: Path, *names: str) -> Path:
    fpath = root / f"prompts-{'-'.join(names)}.yaml"
    fpath.write_text("classes:\n" + "".join(f"  {n}: {{names: [a photo of {n}]}}\n" for n in names))
    return fpath


# ------------------------------------------------------------------ case 1


def test_case1_prompt_classes_matching_no_label_are_refused_before_any_work(own, tmp_path):
    prompts = _prompts(own["root"], "cup", "Malignant")
    res = run("audit", own["cache"], "--sae", own["sae"], "--prompts", prompts,
              "--out", tmp_path / "audit", "--no-pdf")
    one_line_error(res, "2 class(es) match no label", "'cup'", "'Malignant' (closest: 'malignant')",
                   "Labels in the data: benign, malignant", "--label-map")
    assert not (tmp_path / "audit" / "audit.json").exists()


@pytest.mark.slow
def test_case1_a_label_map_audits_them_and_small_classes_show_as_not_evaluated(own, tmp_path):
    prompts = _prompts(own["root"], "harmless mole", "melanoma")
    label_map = tmp_path / "labels.csv"
    label_map.write_text("class,label\nharmless mole,benign\nmelanoma,malignant\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nextends: default\nthresholds: {min_instances: 30}\n")
    res = run("audit", own["cache"], "--sae", own["sae"], "--prompts", prompts, "--label-map",
              label_map, "--rules", rules, "--out", tmp_path / "audit", "--no-pdf", "--top-m", "20")
    assert res.exit_code in (0, 1), res.output
    verdict_line = next(line for line in res.output.splitlines() if line.startswith("verdict:"))
    assert "class(es) not evaluated" in verdict_line
    assert "zero-shot/melanoma (25)" in res.output
    summary = (tmp_path / "audit" / "summary.md").read_text()
    assert "### Not evaluated" in summary and "melanoma" in summary
    audit_json = json.loads((tmp_path / "audit" / "audit.json").read_text())
    classes = {c["class_name"]: c["n_instances"]
               for c in audit_json["result"]["heads"][0]["classes"]}
    assert classes == {"harmless mole": 60, "melanoma": 25}
    assert audit_json["result"]["provenance"]["label_map"]["path"] == str(label_map)


# ------------------------------------------------------------------ case 7


@pytest.fixture(scope="module")
def product_audit(own) -> tuple[dict, Path]:
    """An audit of the user's model with the product vocabulary (words that describe
    nothing in skin images) under the default rules."""
    prompts = _prompts(own["root"], "benign", "malignant")
    out = own["root"] / "audit-product"
    res = run("audit", own["cache"], "--sae", own["sae"], "--prompts", prompts, "--vocab",
              "product", "--rules", "default", "--out", out, "--no-pdf", "--top-m", "20", "--json")
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.stdout), out


@pytest.mark.slow
def test_case7_a_vocabulary_that_describes_nothing_shows_in_the_verdict(product_audit):
    """Product-photo words on skin images through a CLIP that knows neither: components
    the vocabulary does not describe are 'unlabelled (closest: ...)', can match no
    forbidden term (default forbids watermark, text, logo ...), and the vocabulary-fit
    rule says so in the verdict, naming the other vocabularies."""
    outcome, audit_dpath = product_audit
    fit = [v for v in outcome["verdicts"] if v["rule"] == "vocabulary-fit"]
    assert fit and fit[0]["status"] == "warn", fit
    assert "describes little" in fit[0]["message"] and "dermatology" in fit[0]["message"]
    assert outcome["verdict"] in ("warn", "fail")
    labels = [p["concept"] for h in json.loads((audit_dpath / "audit.json").read_text())
              ["result"]["heads"] for c in h["classes"] for p in c["components"]]
    assert any(label.startswith("unlabelled (closest: ") for label in labels)
    forbidden = [f for f in outcome["findings"] if f["kind"] == "forbidden-concept"]
    assert not any(f["concept"].startswith("unlabelled") for f in forbidden)
    assert "vocabulary-fit" in (audit_dpath / "summary.md").read_text()


# ------------------------------------------------------------------ case 9


@pytest.mark.slow
def test_case9_explain_shows_the_audits_concept_labels(own, product_audit, tmp_path):
    from clipaudit.describe import load_descriptions

    _, audit_dpath = product_audit
    image = next((own["data"] / "images").glob("*.png"))
    prompts = _prompts(own["root"], "benign", "malignant")
    bare = run("explain", image, "--sae", own["sae"], "--prompts", prompts)
    assert bare.exit_code == 0, bare.output
    assert "add --audit AUDIT_DIR" in bare.output
    res = run("explain", image, "--sae", own["sae"], "--prompts", prompts, "--audit", audit_dpath,
              "--json")
    assert res.exit_code == 0, res.output
    labels = load_descriptions(audit_dpath / "descriptions.safetensors").concept
    shown = [(c["component"], c["concept"]) for e in json.loads(res.stdout)
             for cls in e["classes"] for c in cls["top"]]
    assert shown and all(concept == labels[j] for j, concept in shown)
    table = run("explain", image, "--sae", own["sae"], "--prompts", prompts, "--audit", audit_dpath)
    assert table.exit_code == 0 and "concept" in table.output and "add --audit" not in table.output
    # the labels of another SAE's audit would name the wrong components
    other = tmp_path / "other-sae.safetensors"
    assert run("train-sae", own["cache"], "--out", other, "--steps", "5", "--batch-size", "64",
               "--seed", "1", "--quiet").exit_code == 0
    wrong = run("explain", image, "--sae", other, "--prompts", prompts, "--audit", audit_dpath)
    one_line_error(wrong, "SAE sha256 mismatch")


# ------------------------------------------------------------------ case 8


def test_case8_train_sae_picks_settings_from_the_data_and_says_why(own, tmp_path):
    res = run("train-sae", own["cache"], "--out", tmp_path / "auto.safetensors", "--quiet")
    assert res.exit_code == 0, res.output
    text = res.output
    assert "SAE settings for d=64, 85 rows" in text
    assert "from the data: 1.6 x sqrt(d) within 8-64" in text  # k
    assert "from the data: largest power of two" in text  # expansion
    assert "from the data: 10 passes over the rows" in text  # steps
    assert "128 latents, k=13, d=64, 1000 steps" in text
    assert "warning: 128 latents for 85 rows: each fires on ~9 rows" in text.replace("\n", " ")
    from clipaudit.sae.files import read_sae_file

    recorded = read_sae_file(tmp_path / "auto.safetensors").meta["settings"]
    assert [(c["name"], c["value"], c["given"]) for c in recorded["choices"]] == [
        ("k", 13, False), ("expansion", 2, False), ("steps", 1000, False)]


def test_case8_settings_that_do_not_fit_are_named_or_refused(own, tmp_path):
    res = run("train-sae", own["cache"], "--out", tmp_path / "big.safetensors", "--expansion", "8",
              "--k", "32", "--steps", "3", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout)["settings"]
    assert settings["n_latents"] == 512 and settings["rows_per_latent"] < 100
    assert [c["given"] for c in settings["choices"]] == [True, True, True]
    assert any("the rule picks expansion 2, k 13" in w for w in settings["warnings"])
    assert any("k 32 is more than a quarter of d 64" in w for w in settings["warnings"])
    dense = run("train-sae", own["cache"], "--out", tmp_path / "dense.safetensors", "--k", "64",
                "--steps", "3")
    one_line_error(dense, "k 64 >= d 64", "the rule picks 13")
    assert not (tmp_path / "dense.safetensors").exists()
