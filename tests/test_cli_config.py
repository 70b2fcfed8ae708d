"""Option precedence: command line > CLIPAUDIT_* environment > config file > default;
bad config files are one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clipaudit.cli import app


@pytest.fixture
def config(tmp_path):
    fpath = tmp_path / "team.toml"
    fpath.write_text('[synthetic.make-dataset]\nn = 6\nseed = 2\n')
    return fpath


def test_each_layer_overrides_the_ones_below(tmp_path, config, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    run = CliRunner().invoke
    base = ["synthetic", "make-dataset", "--artifact", "none", "--json"]
    env_off = {"CLIPAUDIT_SYNTHETIC_MAKE_DATASET_N": None, "CLIPAUDIT_CONFIG": None}

    def n_of(args, env=None):
        res = run(app, [*args, "--out", str(work / "d"), "--overwrite"], env={**env_off, **(env or {})})
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["ground_truth"]

    monkeypatch.chdir(work)
    assert n_of(base)["n"] == 2000  # the built-in default
    assert n_of(["--config", str(config), *base])["n"] == 6  # the file
    assert n_of(["--config", str(config), *base])["seed"] == 2
    assert n_of(base, env={"CLIPAUDIT_CONFIG": str(config)})["n"] == 6  # the file, named by env
    assert n_of(["--config", str(config), *base], env={"CLIPAUDIT_SYNTHETIC_MAKE_DATASET_N": "5"})["n"] == 5
    assert n_of(["--config", str(config), *base, "-n", "4"],
                env={"CLIPAUDIT_SYNTHETIC_MAKE_DATASET_N": "5"})["n"] == 4  # the command line
    (work / "clipaudit.toml").write_text("[synthetic.make-dataset]\nn = 3\n")
    assert n_of(base)["n"] == 3  # ./clipaudit.toml is picked up


@pytest.mark.parametrize("text, message", [
    ("[audti]\n", "no command [audti] (commands: audit,"),
    ("[audit]\ntopm = 3\n", "[audit] has no option 'topm' (options: attribution-classes, attributions,"),
    ("[rules.aply]\n", "no command [rules.aply] (commands: apply,"),
    ("[audit]\nvocab =\n", "not a readable TOML file"),
    ("audit = 3\n", "[audit] must be a table of options"),
])
def test_a_bad_config_file_is_one_line_naming_it_and_exit_2(tmp_path, text, message):
    fpath = tmp_path / "bad.toml"
    fpath.write_text(text)
    res = CliRunner().invoke(app, ["--config", str(fpath), "rules", "list"], env={"CLIPAUDIT_CONFIG": None})
    assert res.exit_code == 2
    assert f"{fpath}: " in res.output and message in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_a_missing_config_file_is_an_error(tmp_path):
    res = CliRunner().invoke(app, ["rules", "list"], env={"CLIPAUDIT_CONFIG": str(tmp_path / "gone.toml")})
    assert res.exit_code == 2 and "gone.toml: config file not found" in res.output


def test_a_list_option_takes_a_single_string_as_one_item(tmp_path):
    from typer.main import get_command

    from clipaudit.cli._config import load_default_map

    fpath = tmp_path / "c.toml"
    fpath.write_text('[audit]\nvocab = "dermatology"\ntop-m = 50\njson = true\n')
    assert load_default_map(fpath, get_command(app)) == {
        "audit": {"vocab": ["dermatology"], "top_m": 50, "as_json": True}}
