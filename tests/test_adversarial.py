"""What a hostile or careless user finds: each case ends in one line on stderr and exit 2
(or a skip recorded in the cache index), and nothing already written is lost.

Disk full is real where the test may mount a small tmpfs (root in a container); elsewhere
a per-file size limit on the child process (``RLIMIT_FSIZE``) makes the same writes fail
with EFBIG, which takes the same path through clipaudit. A read-only folder is a
read-only bind mount (root) or a folder without write permission (other users).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract, open_cache
from clipaudit.heads import fit_probe_on_cache, save_probe
from clipaudit.sae import SAETrainConfig, train_sae_on_cache
from clipaudit.synthetic import make_planted_dataset

from conftest import CONFIGS_DPATH

REPO_DPATH = Path(__file__).resolve().parents[1]
TINY_CONFIG = CONFIGS_DPATH / "tiny-vit-a.json"
SPEC = BackboneSpec(model="tiny-vit-a", config=TINY_CONFIG, pretrained="random")
SCRIPT, IMG_TAG, TEMPLATE = '<script>alert(1)</script>', '"><img src=x onerror=alert(1)>', "{{7*7}}"
PAYLOADS = (SCRIPT, IMG_TAG, TEMPLATE)
OUT_OF_SPACE = ("No space left on device", "File too large")
runner = CliRunner()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """A data set whose image paths, metadata values and vocabulary carry markup and
    template payloads, its cache (in a folder with such a name), an SAE and a probe."""
    root = tmp_path_factory.mktemp("hostile") / f"root {TEMPLATE}"
    data = make_planted_dataset(root / "data", artifact="ruler", rate=1.0, n=120, seed=11)
    manifest = pd.read_csv(data.manifest_fpath)
    folders = [root / "imgs" / "<script>alert(1)<" / "script>", root / "imgs" / IMG_TAG,
               root / "imgs" / TEMPLATE]
    paths = []
    for i, rel in enumerate(manifest["path"]):
        target = folders[i % 3] / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data.dpath / rel, target)
        paths.append(str(target))
    manifest["path"] = paths
    manifest["site"] = [SCRIPT if i % 2 else IMG_TAG for i in range(len(manifest))]
    manifest["batch"] = [TEMPLATE if i % 3 else "plain" for i in range(len(manifest))]
    manifest.to_csv(root / "manifest.csv", index=False)
    cache = extract(root / "manifest.csv", root / f"cache {IMG_TAG}",
                    ExtractConfig(backbone=SPEC, num_workers=0, batch_size=40, shard_size=40)).dpath
    train_sae_on_cache(cache, root / "sae.safetensors",
                       SAETrainConfig(expansion=4, k=8, steps=40, batch_size=64))
    save_probe(fit_probe_on_cache(cache).probe, root / "probe.safetensors")
    vocab = root / f"vocab {TEMPLATE}.txt"
    vocab.write_text("\n".join(PAYLOADS) + "\n")
    rules = root / "rules.yaml"  # every relied-on component a finding; one payload forbidden
    rules.write_text(yaml.safe_dump({
        "version": 1, "extends": "default",
        "thresholds": {"share_min": 0.01, "member_share_min": 0.0, "calibrated_alignment_max": 10.0,
                       "clarity_min": -1.0},
        "concepts": {"forbidden": {"*": [IMG_TAG]}}}))
    return {"root": root, "cache": cache, "sae": root / "sae.safetensors",
            "probe": root / "probe.safetensors", "vocab": vocab, "rules": rules}


def _audit_args(p: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["audit", str(p["cache"]), "--sae", str(p["sae"]), "--probe", str(p["probe"]),
            "--vocab", str(p["vocab"]), "--rules", str(p["rules"]), "--top-m", "20",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def earlier_audit(hostile) -> Path:
    """A finished audit (HTML and PDF) to attack and to protect."""
    out = hostile["root"] / "audit"
    res = runner.invoke(app, _audit_args(hostile, out, "--quiet"))
    assert res.exit_code in (0, 1), res.output
    return out


def _snapshot(dpath: Path) -> dict[str, bytes]:
    return {p.relative_to(dpath).as_posix(): p.read_bytes()
            for p in sorted(dpath.rglob("*")) if p.is_file()}


def _disk_usage_kib(dpath: Path) -> int:
    """What ``dpath`` takes on a tmpfs: whole 4 KiB pages per file, plus the folders."""
    files = [p for p in dpath.rglob("*") if p.is_file()]
    n_dirs = 1 + sum(p.is_dir() for p in dpath.rglob("*"))
    return sum(-(-p.stat().st_size // 4096) * 4 for p in files) + 4 * n_dirs


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _cli(args: list[str], limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """The CLI in a child process, optionally with a per-file size limit."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails (EFBIG) instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "clipaudit", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_DPATH)},
                          preexec_fn=limit if limit_bytes else None)


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(dpath: Path, kib: int) -> Iterator[bool]:
    """``dpath`` on a tmpfs of ``kib`` KiB (yields True), or a plain folder (False)."""
    dpath.mkdir(parents=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(dpath))
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(dpath)], check=True)


@contextlib.contextmanager
def read_only(dpath: Path) -> Iterator[None]:
    """``dpath`` (and what is in it) cannot be written while in the block."""
    if os.geteuid() == 0:
        if not (_mount("--bind", str(dpath), str(dpath))
                and _mount("-o", "remount,bind,ro", str(dpath))):
            pytest.skip("root without permission to mount: cannot make a folder read-only")
        try:
            yield
        finally:
            subprocess.run(["umount", str(dpath)], check=True)
        return
    modes = {p: p.stat().st_mode for p in [dpath, *dpath.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# ------------------------------------------------------------------ disk full


@pytest.mark.slow
def test_disk_full_while_extracting_keeps_finished_shards_and_resumes(hostile, tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, kib=48) as mounted:
        cache = disk / "cache"
        args = ["extract", str(hostile["root"] / "manifest.csv"), "--out", str(cache),
                "--model-config", str(TINY_CONFIG), "--pretrained", "random", "--workers", "0",
                "--batch-size", "40",
                "--shard-size", "40", "-q"]
        proc = _cli(args, limit_bytes=None if mounted else 16_000)
        assert proc.returncode == 2, proc.stderr
        line = _one_error_line(proc.stderr)
        assert any(reason in line for reason in OUT_OF_SPACE) and "cannot write" in line
        shards = sorted((cache / "shards").glob("*"))
        assert all(p.name.startswith("shard-") for p in shards), "a temporary file was left"
        for shard in shards:  # what exists is complete
            assert load_file(str(shard))["acts"].shape[1] > 0
        if mounted:  # free space, as a user would, and resume
            subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        resumed = _cli(args)
        assert resumed.returncode == 0, resumed.stderr
        assert torch.equal(open_cache(cache).load_acts(), open_cache(hostile["cache"]).load_acts())


@pytest.mark.slow
def test_disk_full_while_auditing_keeps_the_earlier_audit(hostile, earlier_audit, tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, kib=_disk_usage_kib(earlier_audit) + 120) as mounted:
        target = disk / "audit"
        shutil.copytree(earlier_audit, target)
        before = _snapshot(target)
        proc = _cli(_audit_args(hostile, target, "-q"), limit_bytes=None if mounted else 60_000)
        assert proc.returncode == 2, proc.stderr
        line = _one_error_line(proc.stderr)
        assert any(reason in line for reason in OUT_OF_SPACE)
        assert _snapshot(target) == before
        assert sorted(p.name for p in disk.iterdir()) == ["audit"]  # no staging folder left


@pytest.mark.slow
def test_disk_full_while_rendering_keeps_both_reports(earlier_audit, tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, kib=_disk_usage_kib(earlier_audit) + 24) as mounted:
        target = disk / "audit"
        shutil.copytree(earlier_audit, target)
        before = _snapshot(target)
        proc = _cli(["report", str(target), "-q"], limit_bytes=None if mounted else 30_000)
        assert proc.returncode == 2, proc.stderr
        assert any(reason in _one_error_line(proc.stderr) for reason in OUT_OF_SPACE)
        assert _snapshot(target) == before
        assert sorted(p.name for p in disk.iterdir()) == ["audit"]


# ------------------------------------------------------------------ where outputs go


@pytest.mark.slow
def test_a_read_only_output_folder_is_refused_in_one_line(hostile, earlier_audit, tmp_path):
    shelf = tmp_path / "shelf"
    shutil.copytree(earlier_audit, shelf / "audit")
    before = _snapshot(shelf / "audit")
    with read_only(shelf):
        for args in (_audit_args(hostile, shelf / "audit"), ["report", str(shelf / "audit")],
                     ["rules", "apply", str(shelf / "audit"), "--rules", "strict"],
                     ["extract", str(hostile["root"] / "manifest.csv"), "--out",
                      str(shelf / "cache"), "--model-config", str(TINY_CONFIG),
                      "--pretrained", "random"]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2, (args[0], res.output)
            line = _one_error_line(res.stderr)
            assert "Read-only file system" in line or "Permission denied" in line, line
    assert _snapshot(shelf / "audit") == before


def test_an_output_path_that_is_a_file_or_folder_is_refused(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    _png(tmp_path / "images" / "benign" / "a.png")
    cases = [
        (["audit", "cache", "--sae", "s", "--probe", "p", "--out", str(a_file)], "not a folder"),
        (["extract", str(tmp_path / "images"), "--out", str(a_file), "--model-config",
          str(TINY_CONFIG), "--pretrained", "random"], "not a folder"),
        (["demo", "--out", str(a_file), "-q"], "not a folder"),
        (["report", str(a_file)], "audit.json: file not found"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert message in _one_error_line(res.stderr), args[0]
    assert a_file.read_text() == "mine"


@pytest.mark.slow
def test_an_output_file_path_that_is_a_folder_is_refused(hostile, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    for args in (["train-sae", str(hostile["cache"]), "--out", str(folder), "--steps", "2",
                  "--no-embed-check", "-q"],
                 ["fit-probe", str(hostile["cache"]), "--out", str(folder), "-q"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert "Is a directory" in _one_error_line(res.stderr)
    assert (folder / "keep.txt").read_text() == "keep"
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def test_a_folder_of_someone_elses_files_is_never_replaced(tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    res = runner.invoke(app, ["audit", "cache", "--sae", "s", "--probe", "p", "--out", str(mine)])
    assert res.exit_code == 2 and "not empty" in _one_error_line(res.stderr)
    assert (mine / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------ concurrent extracts

HOLD_AND_EXTRACT = r"""
import sys, time
import clipaudit.extraction.cache as cache
prepare = cache._prepare
def slow_prepare(*args, **kwargs):
    print("started", flush=True)
    time.sleep(4)
    return prepare(*args, **kwargs)
cache._prepare = slow_prepare
from clipaudit.cli import main
sys.argv = ["clipaudit", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_two_extracts_at_once_on_one_cache_second_refuses(hostile, tmp_path):
    cache = tmp_path / "cache"
    args = ["extract", str(hostile["root"] / "manifest.csv"), "--out", str(cache),
            "--model-config", str(TINY_CONFIG), "--pretrained", "random", "--workers", "0",
                "--batch-size", "40",
            "--shard-size", "40", "-q"]
    first = subprocess.Popen([sys.executable, "-c", HOLD_AND_EXTRACT, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_DPATH)})
    try:
        assert first.stdout.readline().strip() == "started"
        second = runner.invoke(app, args)
        assert second.exit_code == 2, second.output
        line = _one_error_line(second.stderr)
        assert f"pid {first.pid}" in line and "another clipaudit extract" in line
        other_slot = runner.invoke(app, [*args, "--worker-index", "1", "--worker-count", "2"])
        assert other_slot.exit_code == 0, other_slot.output  # another slot is not held up
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert torch.equal(open_cache(cache).load_acts(), open_cache(hostile["cache"]).load_acts())


@pytest.mark.slow
def test_a_killed_extract_does_not_block_the_next(hostile, tmp_path):
    cache = tmp_path / "cache"
    args = ["extract", str(hostile["root"] / "manifest.csv"), "--out", str(cache),
            "--model-config", str(TINY_CONFIG), "--pretrained", "random", "--workers", "0", "-q"]
    first = subprocess.Popen([sys.executable, "-c", HOLD_AND_EXTRACT, *args],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO_DPATH)})
    assert first.stdout.readline().strip() == "started"
    first.kill()
    first.wait()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ odd file names


def _png(fpath: Path) -> None:
    from PIL import Image

    fpath.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (120, 60, 30)).save(fpath)


def _extract_folder(images: Path, out: Path):
    return runner.invoke(app, ["extract", str(images), "--out", str(out), "--model-config",
                               str(TINY_CONFIG), "--pretrained", "random", "--workers", "0",
                               "--json"])


def test_file_names_with_newlines_and_quotes_are_extracted(tmp_path):
    names = ["new\nline.png", 'say "cheese".png', "it's.png", "tab\there.png", "plain.png"]
    for i, name in enumerate(names):
        _png(tmp_path / "images" / ("benign" if i % 2 else "malignant") / name)
    res = _extract_folder(tmp_path / "images", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    index = open_cache(tmp_path / "cache").ok_index
    assert sorted(Path(p).name for p in index["path"]) == sorted(names)


def test_a_file_name_that_is_not_utf8_is_refused_in_one_line_before_any_write(tmp_path):
    images = tmp_path / "images"
    _png(images / "benign" / "fine.png")
    _png(Path(os.fsdecode(bytes(images / "benign") + b"/caf\xe9.png")))
    res = _extract_folder(images, tmp_path / "cache")
    assert res.exit_code == 2, res.output
    line = _one_error_line(res.stderr)
    assert "not valid UTF-8" in line and "caf\\xe9.png" in line
    assert not (tmp_path / "cache").exists()


def test_a_symlink_loop_in_an_image_folder_ends_the_walk_and_records_skips(tmp_path):
    images = tmp_path / "images"
    for label in ("benign", "malignant"):
        for i in range(2):
            _png(images / label / f"{i}.png")
    (images / "benign" / "loop").symlink_to("..")  # benign/loop/benign/loop/...
    (images / "malignant" / "self.png").symlink_to("self.png")  # ELOOP when opened
    (images / "malignant" / "gone.png").symlink_to("nowhere.png")
    os.mkfifo(images / "malignant" / "pipe.png")  # reading it would block forever
    res = _extract_folder(images, tmp_path / "cache")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["n_ok"] == 4 and result["n_skipped"] == 2
    index = open_cache(tmp_path / "cache").index
    skipped = index[index["status"] != "ok"]
    assert sorted(Path(p).name for p in skipped["path"]) == ["gone.png", "self.png"]
    names = [Path(p).relative_to(images.resolve()).as_posix() for p in index["path"]]
    assert not any("loop" in n or "pipe" in n for n in names), names


# ------------------------------------------------------------------ weights


def _nan_probe(tmp_path: Path, hostile: dict[str, Path]) -> Path:
    from clipaudit.artifacts import read_tensor_meta

    fpath = tmp_path / "nan-probe.safetensors"
    tensors = load_file(str(hostile["probe"]))
    tensors["weight"][0, 3] = float("nan")
    save_file(tensors, str(fpath), metadata={"clipaudit": json.dumps(read_tensor_meta(hostile["probe"]))})
    return fpath


def _inf_sae(tmp_path: Path, hostile: dict[str, Path]) -> Path:
    from clipaudit.artifacts import read_tensor_meta

    fpath = tmp_path / "inf-sae.safetensors"
    tensors = load_file(str(hostile["sae"]))
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(fpath), metadata={"clipaudit": json.dumps(read_tensor_meta(hostile["sae"]))})
    return fpath


@pytest.mark.slow
def test_nan_or_inf_in_probe_or_sae_weights_is_refused_at_load(hostile, tmp_path):
    image = next(hostile["root"].glob("imgs/*/*.png"))
    nan_probe, inf_sae = _nan_probe(tmp_path, hostile), _inf_sae(tmp_path, hostile)
    cases = [(["explain", str(image), "--sae", str(hostile["sae"]), "--probe", str(nan_probe)],
              "'weight' holds 1 NaN or infinite"),
             (_audit_args({**hostile, "probe": nan_probe}, tmp_path / "a1"), "'weight' holds 1 NaN"),
             (["sae-info", str(inf_sae)], "holds 1 NaN or infinite"),
             (_audit_args({**hostile, "sae": inf_sae}, tmp_path / "a2"), "holds 1 NaN or infinite")]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args[0], res.output)
        assert message in _one_error_line(res.stderr), args[0]
    assert not (tmp_path / "a1").exists() and not (tmp_path / "a2").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_checkpoint_is_refused_without_advice_to_unpickle(tmp_path):
    evil = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload()}, evil)
    truncated = tmp_path / "cut.pt"
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buffer)
    truncated.write_bytes(buffer.getvalue()[:200])
    cases = [(["sae-info", str(evil)], "pickled Python object (posix.system)"),
             (["extract", str(tmp_path), "--out", str(tmp_path / "c"), "--checkpoint", str(evil),
               "--model-config", str(TINY_CONFIG)], "pickled Python object"),
             (["sae-info", str(truncated), "--format", "attributing-clip"], "truncated or corrupt")]
    _png(tmp_path / "benign" / "a.png")
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        line = _one_error_line(res.stderr)
        assert message in line, line
        assert "weights_only" not in line and "False" not in line


# ------------------------------------------------------------------ markup in user data


@pytest.mark.slow
def test_payloads_stay_text_in_summary_junit_and_pdf(earlier_audit):
    summary = (earlier_audit / "summary.md").read_text()
    assert "<script>" not in summary and "<img" not in summary
    junit = ET.parse(earlier_audit / "junit.xml")  # well-formed, user text kept as text
    assert any(p in (e.get("message") or "") or p in (e.text or "")  # a label, a forbidden term
               for e in junit.iter() for p in (SCRIPT, IMG_TAG))
    pdftotext = shutil.which("pdftotext")
    if pdftotext is None:
        pytest.fail("pdftotext not found: install Debian's poppler-utils (scripts/test.sh does)")
    text = subprocess.run([pdftotext, str(earlier_audit / "report.pdf"), "-"], check=True,
                          capture_output=True, text=True).stdout
    flat = re.sub(r"\s+", " ", text)
    for payload in PAYLOADS:  # concept labels, metadata slices, provenance paths
        assert payload in flat, payload
    assert f"cache {IMG_TAG}" in flat  # the path of the cache, in the provenance


@pytest.mark.slow
def test_payloads_stay_text_in_the_html_dom(earlier_audit, tmp_path):
    from test_report_browser import Chromium, _chromium_exe

    browser = Chromium(_chromium_exe(), tmp_path)
    try:
        url = (earlier_audit / "report.html").resolve().as_uri()
        browser.open(url)
        browser.js("new Promise(r => setTimeout(r, 300))")  # give a stray handler time to fire
        assert browser.js("document.scripts.length") == 1  # the report's own script only
        assert browser.js("document.querySelectorAll('[onerror]').length") == 0
        assert browser.events_of("Page.javascriptDialogOpening") == []
        assert browser.problems() == []
        bad = [u for u in browser.requested_urls() if u != url and not u.startswith("data:")]
        assert bad == [], f"the report requested {bad}"
        text = browser.js("document.body.innerText")
        for payload in PAYLOADS:
            assert payload in text, payload
        titles = browser.js("Array.from(document.querySelectorAll('[title]')).map(e => e.title)")
        assert any(SCRIPT in t for t in titles), "image paths are shown as titles"
    finally:
        browser.close()
