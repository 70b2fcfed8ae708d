"""Audit folders are replaced whole or not at all.

An audit is killed (SIGKILL, in a subprocess) at chosen moments while it writes into a
folder that holds an earlier audit: while writing its files, just before and after the
swap, and between the two renames of the fallback swap. Right after each kill (and
after the next run's repair) the folder must be the earlier audit, byte for byte, or
the new audit whole, never a mix. The kill points are chosen by a test-only patch of
``os.replace``/``os.rename``/the exchange in the child process; clipaudit has no test
hooks of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipaudit.audit import AuditConfig, OutputConfig, run_audit
from clipaudit.describe.config import DescribeConfig
from clipaudit.errors import OutputError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.heads import fit_probe_on_cache, save_probe
from clipaudit.results import load_audit
from clipaudit.sae import SAETrainConfig, train_sae_on_cache
from clipaudit.staging import repair, staged_folder
from clipaudit.synthetic import make_planted_dataset

from conftest import CONFIGS_DPATH

REPO_DPATH = Path(__file__).resolve().parents[1]
SPEC = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json", pretrained="random")
OLD_TOP_M, NEW_TOP_M = 30, 20

CHILD = r"""
import os, signal, sys
import clipaudit.staging as staging

point, nth = os.environ["KILL_AT"].split(":")
seen = {}

def arrive(name):
    seen[name] = seen.get(name, 0) + 1
    if name == point and seen[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)

def hooked(fn, before, after):
    def call(*args, **kwargs):
        arrive(before)
        out = fn(*args, **kwargs)
        arrive(after)
        return out
    return call

os.replace = hooked(os.replace, "write", "written")
os.rename = hooked(os.rename, "rename", "renamed")
if os.environ.get("NO_EXCHANGE"):
    staging._exchange = lambda a, b: False
else:
    staging._exchange = hooked(staging._exchange, "exchange", "exchanged")
from clipaudit.cli import main
sys.argv = ["clipaudit", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    data = make_planted_dataset(root / "data", artifact="ruler", rate=1.0, n=120, seed=5)
    cache = extract(data.manifest_fpath, root / "cache",
                    ExtractConfig(backbone=SPEC, num_workers=0, batch_size=40)).dpath
    train_sae_on_cache(cache, root / "sae.safetensors",
                       SAETrainConfig(expansion=4, k=8, steps=40, batch_size=64))
    save_probe(fit_probe_on_cache(cache).probe, root / "probe.safetensors")
    return {"root": root, "cache": cache, "sae": root / "sae.safetensors",
            "probe": root / "probe.safetensors"}


def _config(top_m: int) -> AuditConfig:
    return AuditConfig(rules="dermatology", outputs=OutputConfig(pdf=False),
                       describe=DescribeConfig(vocabularies=("dermatology",), top_m=top_m))


def _argv(pipeline: dict[str, Path], out: Path, top_m: int) -> list[str]:
    return ["audit", str(pipeline["cache"]), "--sae", str(pipeline["sae"]), "--probe",
            str(pipeline["probe"]), "--rules", "dermatology", "--vocab", "dermatology",
            "--top-m", str(top_m), "--no-pdf", "--out", str(out), "--json"]


def _snapshot(dpath: Path) -> dict[str, bytes]:
    return {p.relative_to(dpath).as_posix(): p.read_bytes()
            for p in sorted(dpath.rglob("*")) if p.is_file()}


def _comparable(audit_json: bytes) -> dict:
    """audit.json without its dates (the header's and the provenance's)."""
    doc = json.loads(audit_json)
    doc.pop("created")
    doc["provenance"].pop("date")
    doc["result"]["provenance"].pop("date")
    return doc


@pytest.fixture(scope="module")
def audits(pipeline) -> dict[str, dict[str, bytes]]:
    """The earlier audit (top-m 30) and what the killed runs write (top-m 20), complete."""
    out = {}
    for name, top_m in (("old", OLD_TOP_M), ("new", NEW_TOP_M)):
        dpath = pipeline["root"] / f"reference-{name}"
        run_audit(pipeline["cache"], pipeline["sae"], dpath, probe=pipeline["probe"],
                  config=_config(top_m))
        out[name] = _snapshot(dpath)
    return out


def _state(dpath: Path, audits: dict[str, dict[str, bytes]]) -> str:
    """'old' (the earlier audit, byte for byte), 'new' (the new audit whole), 'missing'."""
    if not dpath.exists():
        return "missing"
    files = _snapshot(dpath)
    if files == audits["old"]:
        return "old"
    new = audits["new"]
    assert set(files) == set(new), f"a mix: {sorted(set(files) ^ set(new))}"
    assert _comparable(files["audit.json"]) == _comparable(new["audit.json"])
    audit_id = _audit_id(files["audit.json"])
    for name in ("junit.xml", "summary.md", "report.html"):
        assert audit_id.encode() in files[name], f"{name} is not of this audit"
    for name in ("junit.xml", "summary.md", "descriptions.safetensors"):
        assert files[name] != audits["old"][name], name
    return "new"


def _audit_id(audit_json: bytes) -> str:
    return json.loads(audit_json)["result"]["audit_id"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name)


# kill point -> the states the folder may be in right after the kill, and after repair
KILL_POINTS = {
    "write:1": ({"old"}, {"old"}),
    "written:3": ({"old"}, {"old"}),  # a few files into the new audit
    "exchange:1": ({"old"}, {"old"}),
    "exchanged:1": ({"new"}, {"new"}),
    "renamed:1/fallback": ({"missing"}, {"old"}),
    "renamed:2/fallback": ({"new"}, {"new"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_audit_leaves_the_earlier_audit_whole_or_the_new_one(point, pipeline, audits,
                                                                      tmp_path):
    target = tmp_path / "audit"
    shutil.copytree(pipeline["root"] / "reference-old", target)
    kill_at, _, mode = point.partition("/")
    env = {**os.environ, "PYTHONPATH": str(REPO_DPATH), "KILL_AT": kill_at}
    if mode == "fallback":
        env["NO_EXCHANGE"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, *_argv(pipeline, target, NEW_TOP_M)],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    right_after, after_repair = KILL_POINTS[point]
    assert _state(target, audits) in right_after
    repair(target)
    assert _state(target, audits) in after_repair
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_the_next_run_cleans_up_and_finishes(pipeline, audits, tmp_path):
    target = tmp_path / "audit"
    shutil.copytree(pipeline["root"] / "reference-old", target)
    env = {**os.environ, "PYTHONPATH": str(REPO_DPATH), "KILL_AT": "written:4"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *_argv(pipeline, target, NEW_TOP_M)],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert any(".staging-" in name for name in _leftovers(tmp_path))
    marker = next(tmp_path.glob(".audit.staging-*.json"))
    info = json.loads(marker.read_text())
    assert info["command"] == "audit" and info["state"] == "building" and "Safe to delete" in info["what"]
    run_audit(pipeline["cache"], pipeline["sae"], target, probe=pipeline["probe"],
              config=_config(NEW_TOP_M))
    assert _state(target, audits) == "new"
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_the_same_audit_twice_gives_the_same_audit_json_apart_from_its_date(pipeline, audits,
                                                                             tmp_path):
    run_audit(pipeline["cache"], pipeline["sae"], tmp_path / "again", probe=pipeline["probe"],
              config=_config(OLD_TOP_M))
    again = _snapshot(tmp_path / "again")
    assert _comparable(again["audit.json"]) == _comparable(audits["old"]["audit.json"])
    assert _audit_id(again["audit.json"]) == _audit_id(audits["old"]["audit.json"])
    assert _audit_id(audits["new"]["audit.json"]) != _audit_id(again["audit.json"]), \
        "the id ignores the settings"


def test_a_failing_run_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "audit"
    target.mkdir()
    (target / "audit.json").write_text("earlier")
    with pytest.raises(RuntimeError), staged_folder(target, command="audit",
                                                    replaces="audit.json") as staging:
        (staging / "audit.json").write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["audit"]
    assert (target / "audit.json").read_text() == "earlier"


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not empty"), staged_folder(
            tmp_path / "mine", command="audit", replaces="audit.json"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"), staged_folder(
            tmp_path / "file", command="audit"):
        pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def test_a_live_run_is_not_disturbed_and_a_second_one_refuses(tmp_path):
    target = tmp_path / "audit"
    script = ("import sys, time\nfrom clipaudit.staging import staged_folder\n"
              "with staged_folder(sys.argv[1], command='audit') as s:\n"
              "    (s / 'audit.json').write_text('new')\n    print('ready', flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO_DPATH)})
    try:
        assert proc.stdout.readline().strip() == b"ready"
        with pytest.raises(OutputError, match=f"another clipaudit run.*pid {proc.pid}"):
            repair(target)
        assert len(_leftovers(tmp_path)) == 2  # its staging folder and marker are untouched
    finally:
        proc.kill()
        proc.wait()
    repair(target)  # now it is a killed run's leftover
    assert _leftovers(tmp_path) == [] and not target.exists()


def test_report_and_rules_apply_in_a_killed_state_keep_the_folder(tmp_path, monkeypatch):
    """``report`` and ``rules apply`` stage a copy: an error midway changes nothing."""
    from test_report import make_audit_folder

    from clipaudit.gate import apply_rules
    from clipaudit.report import render as render_module
    from clipaudit.report import write_report

    audit = tmp_path / "audit"
    make_audit_folder(audit)
    write_report(audit, html=True, pdf=False)
    before = _snapshot(audit)

    def broken(*_args, **_kwargs):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(render_module, "render_html", broken)
    with pytest.raises(RuntimeError):
        apply_rules(audit, "strict")  # rewrites audit.json, junit, summary, then the report
    with pytest.raises(RuntimeError):
        write_report(audit, html=True, pdf=False)
    assert _snapshot(audit) == before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    run = apply_rules(audit, "strict")
    assert run.audit_fpath == audit / "audit.json" and run.junit_fpath.parent == audit
    after = _snapshot(audit)
    assert after["report.html"] != before["report.html"]  # the report shows the new verdicts
    assert load_audit(audit).rules_file == "strict"
    assert dataclasses.is_dataclass(run)
