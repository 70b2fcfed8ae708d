"""Packaging promises: the library never imports the CLI, assets ship in the wheel."""

import subprocess
import sys
import zipfile

import pytest


def test_library_import_does_not_pull_in_the_cli():
    code = ("import sys, clipaudit, clipaudit.audit, clipaudit.attribution, clipaudit.extraction.cache;"
            "bad = [m for m in ('typer', 'rich', 'clipaudit.cli') if m in sys.modules];"
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"library imported {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_public_api_is_explicit():
    import clipaudit

    assert clipaudit.__all__ and all(hasattr(clipaudit, name) for name in clipaudit.__all__)


def test_cli_version_and_help():
    from typer.testing import CliRunner

    from clipaudit import __version__
    from clipaudit.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"clipaudit {__version__}"
    help_text = runner.invoke(app, ["--help"]).stdout
    for verb in ("demo", "extract", "train-sae", "fit-probe", "audit", "report", "explain", "rules"):
        assert verb in help_text


@pytest.mark.slow
def test_wheel_ships_rules_templates_and_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), "."], capture_output=True, text=True)
    if proc.returncode != 0 and "hatchling" in proc.stderr:  # no build backend in this env
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), "."],
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("clipaudit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("clipaudit/_assets/rules/dermatology.yaml", "clipaudit/_assets/rules/default.yaml",
                     "clipaudit/_data/tiny_derm_clip/model.safetensors",
                     "clipaudit/_data/concepts/dermatology.yaml", "clipaudit/_data/prompts/dermatology.yaml",
                     "clipaudit/_data/tiny_birds_clip/model.safetensors",
                     "clipaudit/_data/tiny_birds_clip/config.json",
                     "clipaudit/_data/concepts/birds.yaml", "clipaudit/_data/prompts/birds.yaml"):
        assert required in names, f"{required} missing from {wheel.name}"
    assert any(n.startswith("clipaudit/_assets/report_templates/") for n in names)
