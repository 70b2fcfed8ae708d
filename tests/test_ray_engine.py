"""The ray engine (local Ray, 2 CPU actors) writes the cache the local engine writes.

One Ray for the whole session (``ray_session``): starting Ray costs seconds, and the
engine uses a Ray that is already initialised as it is. The kill -9 test starts its
own, in a subprocess, as the CLI does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract, open_cache
from clipaudit.extraction.cache_reader import shard_fpath
from clipaudit.extraction.engines import RayConfig, get_engine, list_engines
from clipaudit.synthetic import make_planted_dataset

from conftest import CONFIGS_DPATH, image_samples, write_hf_parquet, write_tars

REPO_DPATH = Path(__file__).resolve().parents[1]
TINY_A = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json",
                      pretrained="random")
N_IMAGES = 300


def _config(engine: str = "local", **kw) -> ExtractConfig:
    base = {"backbone": TINY_A, "batch_size": 16, "shard_size": 64, "num_workers": 1,
            "engine": engine, "ray": RayConfig(actors=2)}
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Workers import clipaudit from this checkout, whatever the environment has installed.
    pythonpath = os.pathsep.join(p for p in (str(REPO_DPATH), os.environ.get("PYTHONPATH"))
                                 if p)
    ray.init(address="local", num_cpus=3, object_store_memory=256 * 1024 * 1024,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    dpath = tmp_path_factory.mktemp("planted")
    make_planted_dataset(dpath, artifact="ruler", n=N_IMAGES, seed=3)
    (dpath / "images" / "000007.png").write_bytes(b"not a png")  # recorded, not fatal
    return dpath / "manifest.csv"


@pytest.fixture(scope="module")
def local_cache(planted, tmp_path_factory):
    return extract(planted, tmp_path_factory.mktemp("local") / "c", _config()).cache


def _assert_same_cache(ray_cache, local_cache) -> None:
    """What an audit reads: rows, ids, index and provenance equal; values to float tolerance."""
    torch.testing.assert_close(ray_cache.load_acts(), local_cache.load_acts(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ray_cache.load_embeds(), local_cache.load_embeds(),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(ray_cache.load_ids(), local_cache.load_ids())
    pd.testing.assert_frame_equal(ray_cache.index, local_cache.index)
    assert ray_cache.provenance == local_cache.provenance
    volatile = ("created", "engine")
    assert ({k: v for k, v in ray_cache.manifest.items() if k not in volatile}
            == {k: v for k, v in local_cache.manifest.items() if k not in volatile})


# ---------------------------------------------------------------- equality with local


@pytest.mark.slow
def test_ray_cache_equals_the_local_engines(ray_session, planted, local_cache, tmp_path):
    result = extract(planted, tmp_path / "c", _config("ray"))
    assert result.complete and result.n_ok == N_IMAGES - 1
    assert result.skipped_reasons == {"not an image": 1}
    _assert_same_cache(result.cache, local_cache)
    assert result.cache.manifest["engine"] == "ray" and local_cache.manifest["engine"] == "local"


@pytest.mark.slow
def test_a_cache_started_by_one_engine_is_finished_by_the_other(ray_session, planted,
                                                                local_cache, tmp_path):
    out = tmp_path / "c"
    first = extract(planted, out, _config(worker_index=0, worker_count=2))
    mine = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    second = extract(planted, out, _config("ray"))
    assert second.shards_resumed == first.shards_written == len(mine)
    assert {name: (out / "shards" / name).stat().st_mtime_ns for name in mine} == mine
    _assert_same_cache(second.cache, local_cache)


# ---------------------------------------------------------------- inputs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_ray_reads_webdataset_and_parquet_like_the_local_engine(ray_session, tmp_path, kind):
    samples = image_samples(40)
    if kind == "webdataset":
        write_tars(tmp_path / "data", samples, per_tar=15)
    else:
        write_hf_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", samples)
    config = _config(batch_size=8, shard_size=12)
    local = extract(tmp_path / "data", tmp_path / "local", config).cache
    on_ray = extract(tmp_path / "data", tmp_path / "ray",
                     dataclasses.replace(config, engine="ray")).cache
    _assert_same_cache(on_ray, local)
    assert on_ray.index["label"].tolist() == [s["label"] for s in samples]


# ---------------------------------------------------------------- resume


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's workers start sessions of their own, so killing
    the process group alone would orphan them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_9(proc: subprocess.Popen) -> None:
    """kill -9 the run and everything it started, at once, as a crash would."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _shard_stats(dpath: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((dpath / "shards").glob("shard-*.safetensors"))}


@pytest.mark.slow
def test_ray_resume_after_kill_9_equals_an_uninterrupted_run(ray_session, planted, local_cache,
                                                             tmp_path):
    out = tmp_path / "killed"
    args = ["extract", str(planted), "--out", str(out), "--model-config",
            str(CONFIGS_DPATH / "tiny-vit-a.json"), "--pretrained", "random",
            "--shard-size", "64", "--batch-size", "16",
            "--workers", "1", "--engine", "ray", "--ray-actors", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_DPATH), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "clipaudit", *args], cwd=REPO_DPATH, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (not shard_fpath(out, 0).exists() and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
    finally:
        _kill_9(proc)
    before = _shard_stats(out)
    n_shards = json.loads((out / "manifest.json").read_text())["n_shards"]
    assert 0 < len(before) < n_shards and not (out / "index.parquet").exists()

    resumed = CliRunner().invoke(app, [*args, "--json"])
    assert resumed.exit_code == 0, resumed.output
    report = json.loads(resumed.stdout)
    assert report["complete"] and report["shards_resumed"] == len(before)
    assert report["shards_written"] == n_shards - len(before)
    after = _shard_stats(out)
    assert {name: after[name] for name in before} == before  # not rewritten
    assert not list((out / "shards").glob(".*.tmp"))
    _assert_same_cache(open_cache(out), local_cache)


# ---------------------------------------------------------------- without Ray


def test_engines_are_registered_and_an_unknown_one_lists_them():
    assert [e.name for e in list_engines()] == ["local", "ray"]
    with pytest.raises(InputError, match="unknown extraction engine 'spark'. Available: "
                                         "local, ray"):
        get_engine("spark")


def test_ray_engine_without_ray_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "clipaudit.extraction.ray_engine", raising=False)
    res = CliRunner().invoke(app, ["extract", str(tmp_path / "nowhere"), "--out",
                                   str(tmp_path / "c"), "--engine", "ray",
                                   "--model", "tiny-derm-clip"])
    assert res.exit_code == 2
    assert "pip install 'clipaudit[ray]'" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_importing_clipaudit_does_not_import_ray():
    code = "import sys, clipaudit, clipaudit.extraction; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_DPATH, env={**os.environ, "PYTHONPATH": str(REPO_DPATH)},
                         check=True)
    assert out.stdout.strip() == "False"
