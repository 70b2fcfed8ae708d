"""The activation cache: contents, streaming, resume after kill -9, refusal, parallel workers."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import ArtifactError, InputError, MismatchError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract, open_cache
from clipaudit.extraction.cache_reader import shard_fpath
from clipaudit.extraction.data import decode_image, load_image_source
from clipaudit.extraction.hooks import HookPoint, VisionTower

from conftest import CONFIGS_DPATH, tiny_backbone

REPO_DPATH = Path(__file__).resolve().parents[1]
TINY_A = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json", pretrained="random")


def _config(**kw) -> ExtractConfig:
    base = {"backbone": TINY_A, "batch_size": 3, "shard_size": 5, "num_workers": 0}
    return ExtractConfig(**{**base, **kw})


def _make_images(root: Path, n_per_class: int = 6, size: int = 40, bad: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / label / f"{i:03d}.jpg", quality=90)
    if bad:
        (root / "benign" / "000-notes.jpg").write_text("not an image")
        (root / "malignant" / "empty.png").write_bytes(b"")
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return _make_images(tmp_path / "images")


def _assert_same_cache(a_dpath: Path, b_dpath: Path) -> None:
    a, b = open_cache(a_dpath), open_cache(b_dpath)
    assert torch.equal(a.load_acts(), b.load_acts())
    assert torch.equal(a.load_embeds(), b.load_embeds())
    assert torch.equal(a.load_ids(), b.load_ids())
    pd.testing.assert_frame_equal(a.index, b.index)
    assert a.provenance == b.provenance


def _shard_stats(dpath: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted((dpath / "shards").glob("shard-*.safetensors"))}


# ---------------------------------------------------------------- contents


def test_cache_holds_encode_image_embeddings_and_hook_acts(images, tmp_path):
    backbone = tiny_backbone("tiny-vit-a")
    result = extract(images, tmp_path / "cache", _config())
    cache = result.cache
    assert result.complete and (result.n_ok, result.n_skipped) == (12, 2)
    assert result.skipped_reasons == {"empty file": 1, "not an image": 1}
    assert cache.n_ok == 12 and cache.d == 64 and cache.embed_dim == 32
    skipped = cache.index[cache.index["status"] == "skipped"]
    assert sorted(Path(p).name for p in skipped["path"]) == ["000-notes.jpg", "empty.png"]
    assert skipped["reason"].str.startswith(("empty file", "not an image")).all()
    assert cache.ok_index["id"].tolist() == cache.load_ids().tolist()
    pixels = torch.stack([backbone.preprocess(decode_image(p)) for p in cache.ok_index["path"]])
    with torch.no_grad():
        expected = backbone.model.encode_image(pixels)
        cap = VisionTower(backbone.model).capture(pixels, HookPoint())
    torch.testing.assert_close(cache.load_embeds(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.load_acts(), cap.acts, rtol=1e-5, atol=1e-5)
    assert cache.provenance["hook"] == {"layer": None, "token": "pooled"}
    assert cache.manifest["tower"] == "open_clip-vit" and "created_with" not in cache.manifest
    assert cache.provenance["backbone"]["id"] == backbone.id
    assert cache.provenance["data_sha256"] == load_image_source(images).source_sha256
    assert (cache.ok_index["label"] == "benign").sum() == 6


def test_spatial_cache_flattens_tokens_into_rows(images, tmp_path):
    cache = extract(images, tmp_path / "c", _config(hook=HookPoint(1, "spatial"))).cache
    acts = cache.load_acts()
    assert acts.shape == (12, 16, 64) and cache.n_rows == 12 * 16
    batches = list(cache.iter_batches(50, fields=("acts", "ids")))
    assert [len(b["acts"]) for b in batches] == [50, 50, 50, 42]
    torch.testing.assert_close(torch.cat([b["acts"] for b in batches]), acts.reshape(-1, 64))
    ids = torch.cat([b["ids"] for b in batches])
    assert torch.equal(ids, cache.load_ids().repeat_interleave(16))
    with pytest.raises(ValueError, match="cls"):
        next(cache.iter_batches(4, fields=("embeds",)))


def test_iter_batches_streams_and_shuffles_deterministically(images, tmp_path):
    cache = extract(images, tmp_path / "c", _config()).cache
    acts, embeds, ids = cache.load_acts(), cache.load_embeds(), cache.load_ids()
    plain = list(cache.iter_batches(5, fields=("acts", "embeds", "ids")))
    assert [len(b["acts"]) for b in plain] == [5, 5, 2]
    assert torch.equal(torch.cat([b["acts"] for b in plain]), acts)
    assert torch.equal(torch.cat([b["embeds"] for b in plain]), embeds)

    def shuffled(seed):
        return list(cache.iter_batches(5, shuffle=True, seed=seed, fields=("acts", "ids")))

    first, again, other = shuffled(0), shuffled(0), shuffled(1)
    got_ids = torch.cat([b["ids"] for b in first])
    assert sorted(got_ids.tolist()) == sorted(ids.tolist()) and not torch.equal(got_ids, ids)
    assert torch.equal(got_ids, torch.cat([b["ids"] for b in again]))
    assert not torch.equal(got_ids, torch.cat([b["ids"] for b in other]))
    position = {int(i): n for n, i in enumerate(ids)}
    expected = acts[[position[int(i)] for i in got_ids]]
    assert torch.equal(torch.cat([b["acts"] for b in first]), expected)


def test_take_maps_one_shard_at_a_time_and_returns_rows_in_the_order_asked(images, tmp_path):
    """A sample spread over every shard must not keep every shard's pages resident: each
    shard ``take`` maps is unmapped once its rows are copied (a million-row cache held
    600 MB of mapped pages until the last shard was read)."""
    cache = extract(images, tmp_path / "c", _config()).cache
    acts, embeds = cache.load_acts(), cache.load_embeds()
    cache._maps.clear()
    held = []
    shard = type(cache)._shard

    def counting(self, k):
        held.append(len(self._maps))
        return shard(self, k)

    rows = np.array([11, 0, 6, 5, 1, 10, 3])  # every shard (5 rows each), out of order
    type(cache)._shard = counting
    try:
        got_acts, got_embeds = cache.take("acts", rows), cache.take("embeds", rows)
    finally:
        type(cache)._shard = shard
    assert torch.equal(got_acts, acts[rows]) and torch.equal(got_embeds, embeds[rows])
    assert len(held) == 6 and max(held) == 0  # 3 shards per field, none mapped alongside
    assert not cache._maps


def test_float16_store_is_close_to_float32(images, tmp_path):
    full = extract(images, tmp_path / "f32", _config()).cache
    half = extract(images, tmp_path / "f16", _config(store_dtype="float16")).cache
    assert half.load_acts().dtype == torch.float32
    torch.testing.assert_close(half.load_acts(), full.load_acts(), rtol=1e-2, atol=1e-2)
    assert (tmp_path / "f16" / "shards" / "shard-00000.safetensors").stat().st_size < \
        (tmp_path / "f32" / "shards" / "shard-00000.safetensors").stat().st_size


def test_manifest_metadata_reaches_the_index(tmp_path):
    _make_images(tmp_path / "imgs", n_per_class=2, bad=False)
    paths = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "imgs").rglob("*.jpg"))
    pd.DataFrame({"path": paths + ["imgs/gone.jpg"], "label": ["a", "b", "a", "b", "a"],
                  "has_ruler": [True, False, True, False, True]}).to_csv(tmp_path / "m.csv",
                                                                         index=False)
    cache = extract(tmp_path / "m.csv", tmp_path / "c", _config()).cache
    assert cache.index["has_ruler"].tolist() == [True, False, True, False, True]
    assert cache.index["status"].tolist() == ["ok"] * 4 + ["skipped"]
    assert cache.index["reason"].iloc[4].startswith("missing file")
    assert cache.ok_index["has_ruler"].tolist() == [True, False, True, False]


def test_decompression_bomb_is_recorded_and_skipped(tmp_path):
    images = _make_images(tmp_path / "imgs", n_per_class=2, bad=False)
    Image.new("RGB", (200, 200)).save(images / "benign" / "huge.png")
    result = extract(images, tmp_path / "c", _config(max_image_pixels=100 * 100))
    assert result.skipped_reasons == {"decompression bomb": 1}
    row = result.cache.index.set_index("path").loc[str(images.resolve() / "benign" / "huge.png")]
    assert row["status"] == "skipped" and "10000" in row["reason"]


class _RecordingReporter:
    def __init__(self):
        self.tasks: dict[str, list] = {}

    def task(self, description, total=None):
        record = self.tasks.setdefault(description, [total, 0])

        class _Task:
            def advance(self, n=1, **fields):
                record[1] += n

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return _Task()


def test_progress_is_reported_per_image(images, tmp_path):
    reporter = _RecordingReporter()
    extract(images, tmp_path / "c", _config(), reporter=reporter)
    assert reporter.tasks["extract"] == [14, 14]
    assert reporter.tasks["index"] == [3, 3]


# ---------------------------------------------------------------- resume and refusal


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    images = _make_images(tmp_path / "images", n_per_class=60, size=320)
    out = tmp_path / "killed"
    args = ["extract", str(images), "--out", str(out), "--model-config",
            str(CONFIGS_DPATH / "tiny-vit-a.json"), "--pretrained", "random",
            "--shard-size", "2", "--batch-size", "1",
            "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO_DPATH)}
    proc = subprocess.Popen([sys.executable, "-m", "clipaudit", *args], cwd=REPO_DPATH,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    first = shard_fpath(out, 0)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding worker, like kill -9
    proc.wait()
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

    extract(images, tmp_path / "whole", _config(batch_size=1, shard_size=2, num_workers=1))
    _assert_same_cache(out, tmp_path / "whole")


def test_rerun_of_partial_cache_computes_only_missing_shards(images, tmp_path):
    out = tmp_path / "c"
    extract(images, out, _config(worker_count=3, worker_index=1))
    before = _shard_stats(out)
    stale = shard_fpath(out, 0).parent / f".{shard_fpath(out, 0).name}.abc123.tmp"
    stale.write_bytes(b"half a shard from a killed run")
    result = extract(images, out, _config())
    assert result.complete and result.shards_resumed == len(before) == 1
    assert result.shards_written == result.n_shards - 1
    assert {k: v for k, v in _shard_stats(out).items() if k in before} == before
    assert not stale.exists()
    extract(images, tmp_path / "whole", _config())
    _assert_same_cache(out, tmp_path / "whole")
    again = extract(images, out, _config())
    assert again.shards_written == 0 and again.complete


def test_parallel_workers_write_disjoint_shards_of_one_cache(images, tmp_path):
    out = tmp_path / "c"
    first = extract(images, out, _config(worker_index=0, worker_count=2))
    assert not first.complete and first.cache is None
    assert sorted(_shard_stats(out)) == ["shard-00000.safetensors", "shard-00002.safetensors"]
    with pytest.raises(ArtifactError, match="incomplete"):
        open_cache(out)
    second = extract(images, out, _config(worker_index=1, worker_count=2))
    assert second.complete and second.shards_written == 1
    assert first.n_ok + second.n_ok == second.cache.n_ok
    extract(images, tmp_path / "single", _config())
    _assert_same_cache(out, tmp_path / "single")


@pytest.mark.parametrize("change, named", [
    ({"hook": HookPoint(0, "cls")}, ["pooled", "layer 0, token cls"]),
    ({"backbone": dataclasses.replace(TINY_A, model="tiny-vit-b",
                                      config=CONFIGS_DPATH / "tiny-vit-b.json")},
     ["tiny-vit-a@", "tiny-vit-b@"]),
    ({"backbone": dataclasses.replace(TINY_A, seed=1)}, ["random-seed0", "random-seed1"]),
    ({"shard_size": 4}, ["shard size 5", "4"]),
])
def test_other_model_or_layer_into_same_folder_is_refused(images, tmp_path, change, named):
    extract(images, tmp_path / "c", _config())
    with pytest.raises(MismatchError) as info:
        extract(images, tmp_path / "c", _config(**change))
    assert all(text in str(info.value) for text in named), str(info.value)


def test_other_data_into_same_folder_is_refused(images, tmp_path):
    extract(images, tmp_path / "c", _config())
    Image.new("RGB", (30, 30)).save(images / "benign" / "new.jpg")
    with pytest.raises(MismatchError, match="data set"):
        extract(images, tmp_path / "c", _config())


def test_non_cache_output_folder_is_refused(images, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        extract(images, tmp_path / "mine", _config())


# ---------------------------------------------------------------- CLI


def _cli(*args: str):
    return CliRunner().invoke(app, ["extract", *args, "--pretrained", "random"])


def test_cli_extracts_and_reports_skips(images, tmp_path):
    cfg = str(CONFIGS_DPATH / "tiny-vit-a.json")
    res = _cli(str(images), "--out", str(tmp_path / "c"), "--model-config", cfg,
               "--workers", "0", "--quiet")
    assert res.exit_code == 0, res.output
    assert "12 images extracted, 2 skipped (empty file 1, not an image 1)" in res.stdout
    res = _cli(str(images), "--out", str(tmp_path / "c"), "--model-config", cfg, "--json")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report["n_ok"] == 12 and report["skipped_reasons"]["not an image"] == 1
    assert report["shards_written"] == 0


def test_cli_refuses_another_layer_naming_both(images, tmp_path):
    cfg = str(CONFIGS_DPATH / "tiny-vit-a.json")
    assert _cli(str(images), "--out", str(tmp_path / "c"), "--model-config", cfg,
                "--workers", "0", "-q").exit_code == 0
    res = _cli(str(images), "--out", str(tmp_path / "c"), "--model-config", cfg,
               "--layer", "0", "--token", "cls", "-q")
    assert res.exit_code == 2
    assert "pooled" in res.stderr and "layer 0" in res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("problem, message", [
    ("missing-data", "not found"),
    ("no-path-column", "no path column"),
    ("duplicate-path", "duplicate path"),
    ("bad-token", "token 'mean'"),
    ("bad-worker-index", "worker index 3"),
    ("unknown-option", "No such option"),
])
def test_cli_user_errors_exit_2_without_traceback(images, tmp_path, problem, message):
    manifest = tmp_path / "m.csv"
    rows = {"no-path-column": {"file": ["a.jpg"]}, "duplicate-path": {"path": ["a.jpg"] * 2}}
    pd.DataFrame(rows.get(problem, {"path": ["a.jpg"]})).to_csv(manifest, index=False)
    data = (tmp_path / "nothing" if problem == "missing-data"
            else manifest if problem in rows else images)
    extra = {"bad-token": ["--token", "mean"],
             "bad-worker-index": ["--worker-index", "3", "--worker-count", "2"],
             "unknown-option": ["--frobnicate"]}.get(problem, [])
    res = _cli(str(data), "--out", str(tmp_path / "c"), "--model-config",
               str(CONFIGS_DPATH / "tiny-vit-a.json"), "--workers", "0", "-q", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
