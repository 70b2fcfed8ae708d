"""End to end on the bundled tiny CLIP (it knows the world's rulers): forbidden means
forbidden whatever the alignment, its control passes, and an SAE blind to a forbidden
artifact never gets a silent PASS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipaudit.audit import AuditConfig, FaithfulnessConfig, OutputConfig, run_audit
from clipaudit.cli import app
from clipaudit.demo import DemoConfig, demo_prompts_fpath
from clipaudit.describe.config import DescribeConfig
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.heads import ProbeConfig, fit_probe_on_cache, save_probe
from clipaudit.sae import SAETrainConfig, train_sae_on_cache
from clipaudit.synthetic import make_planted_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    backbone = load_backbone(BackboneSpec.bundled())
    out: dict[str, Path] = {"root": root}
    sets = {"reference": (None, 0.5, 800, 1), "shortcut": ("ruler", 1.0, 400, 2),
            "control": ("ruler", 0.5, 400, 3)}  # control: rulers on half of each class
    for name, (artifact, rate, n, seed) in sets.items():
        data = make_planted_dataset(root / f"{name}-data", artifact=artifact, rate=rate, n=n,
                                    seed=seed)
        out[name] = extract(data.manifest_fpath, root / f"{name}-cache",
                            ExtractConfig(num_workers=0), backbone=backbone).dpath
        if name != "reference":
            save_probe(fit_probe_on_cache(out[name], config=ProbeConfig(seed=0)).probe,
                       root / f"{name}.probe.safetensors")
    demo_sae = DemoConfig().sae
    train_sae_on_cache(out["reference"], root / "sae.safetensors",
                       SAETrainConfig(expansion=demo_sae.expansion, k=demo_sae.k, steps=600,
                                      batch_size=256))
    # an SAE of 16 components after one step: its components separate no artifact
    train_sae_on_cache(out["reference"], root / "blind-sae.safetensors",
                       SAETrainConfig(n_latents=16, k=2, steps=1, batch_size=64))
    (root / "aligned.yaml").write_text(
        "version: 1\nextends: dermatology\n"
        "thresholds: {calibrated_alignment_max: -10}  # every component counts as aligned\n")
    return out


def _audit(world, name: str, rules: str, sae: str = "sae.safetensors", **config):
    root = world["root"]
    return run_audit(
        world[name], root / sae, root / f"audit-{name}-{Path(rules).stem}-{sae.split('.')[0]}",
        probe=root / f"{name}.probe.safetensors", prompts=demo_prompts_fpath(),
        config=AuditConfig(rules=rules, outputs=OutputConfig(html=False, pdf=False),
                           faithfulness=FaithfulnessConfig(instances=32),
                           describe=DescribeConfig(vocabularies=("dermatology",),
                                                   reference_cache=world["reference"]), **config),
        backbone=load_backbone(BackboneSpec.bundled()))


def _failing(outcome, check: str, class_name: str | None = None):
    return [v for v in outcome.result.verdicts if v.check == check and v.status == "fail"
            and (class_name is None or v.class_name == class_name)]


def test_a_relied_on_forbidden_concept_fails_with_its_alignment_above_the_limit(world):
    """Every component counts as aligned with its class (calibrated_alignment_max -10), so
    no plain shortcut can exist; the probe relies on rulers (on every malignant image), and
    the gate fails on the forbidden ruler anyway, showing the reliance figure."""
    outcome = _audit(world, "shortcut", str(world["root"] / "aligned.yaml"))
    assert outcome.exit_code == 1
    rulers = [f for f in outcome.result.head("probe").findings
              if f.class_name == "malignant" and f.kind == "forbidden-concept"
              and "ruler" in f.concept]
    assert rulers, [(f.class_name, f.concept) for f in outcome.result.head("probe").findings]
    top = rulers[0]
    assert top.calibrated_alignment is not None and top.calibrated_alignment >= -10
    assert top.reliance is not None and top.reliance >= 0.05 and top.reliance_source
    (verdict,) = _failing(outcome, "forbidden-concept", "malignant")[:1]
    assert "the head relies on it" in verdict.message
    assert any("`has_ruler`" in v.message for v in _failing(outcome, "concept-reliance",
                                                           "malignant"))


def test_its_control_with_the_artifact_on_half_of_each_class_passes(world):
    outcome = _audit(world, "control", str(world["root"] / "aligned.yaml"))
    assert outcome.exit_code == 0, [v.message for v in outcome.result.verdicts
                                    if v.status == "fail"]
    probe = outcome.result.head("probe")
    assert not [f for f in probe.findings if "ruler" in f.concept]
    measured = [r for r in probe.concept_reliance if r.concept == "has_ruler"]
    assert measured and all(abs(r.reliance) < 0.05 for r in measured)


def test_an_sae_blind_to_the_artifacts_never_passes_silently(world):
    """On the clean control the blind SAE finds nothing, so without the coverage check the
    SAE route would have nothing to say; the gate fails and names what it cannot see."""
    outcome = _audit(world, "control", "dermatology", sae="blind-sae.safetensors")
    assert outcome.exit_code == 1
    (coverage,) = _failing(outcome, "sae-coverage")
    blind = [v["message"] for v in coverage.details["violations"]]
    assert any(m.startswith("the SAE cannot see `has_ruler`: decodable at AUC") for m in blind)
    assert all("findings about it are blind" in m for m in blind)
    shortcut = _audit(world, "shortcut", "dermatology", sae="blind-sae.safetensors")
    assert shortcut.exit_code == 1
    assert any("`has_ruler`" in v.message for v in _failing(shortcut, "concept-reliance",
                                                           "malignant"))


def test_column_roles_from_the_command_line(world):
    outcome = _audit(world, "control", "dermatology")
    runner = CliRunner()
    bad = runner.invoke(app, ["rules", "apply", str(outcome.audit_dpath), "--rules",
                              "dermatology", "--column-role", "has_ruler"])
    assert bad.exit_code == 2 and "expected COLUMN=ROLE" in bad.output
    res = runner.invoke(app, ["rules", "apply", str(outcome.audit_dpath), "--rules", "dermatology",
                              "--column-role", "lesion_border=artifact", "--json"])
    assert res.exit_code == 1, res.output
    messages = [v["message"] for v in json.loads(res.stdout)["verdicts"]
                if v["check"] == "concept-reliance" and v["status"] == "fail"]
    assert messages and all("`lesion_border`" in m for m in messages)
