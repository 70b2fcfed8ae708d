"""SAE training on a cache that does not fit in memory: streamed shards, windowed
shuffling, checkpoints and resume, bf16 autocast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipaudit.artifacts import read_tensor_meta
from clipaudit.cli import app
from clipaudit.errors import MismatchError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.cache_reader import ActivationCache
from clipaudit.sae import SAETrainConfig, read_sae_file, train_sae, train_sae_on_cache
from clipaudit.sae.checkpoint import checkpoint_fpath_for

from conftest import CONFIGS_DPATH

REPO_DPATH = Path(__file__).resolve().parents[1]
TINY_A = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json",
                      pretrained="random")
WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "scale")


@pytest.fixture(scope="module")
def cache_dpath(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sae-stream")
    rng = np.random.default_rng(0)
    for i in range(96):
        (root / "images" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        arr[:, :, i % 3] = 255  # some structure for the SAE to find
        Image.fromarray(arr).save(root / "images" / f"c{i % 3}" / f"{i:03d}.png")
    config = ExtractConfig(backbone=TINY_A, batch_size=16, shard_size=16, num_workers=0)
    extract(root / "images", root / "cache", config)
    return root / "cache"


@pytest.fixture
def cache(cache_dpath) -> ActivationCache:
    from clipaudit.extraction.cache import open_cache

    return open_cache(cache_dpath)


def _config(**kw) -> SAETrainConfig:
    base = {"n_latents": 128, "k": 8, "steps": 30, "batch_size": 20, "seed": 3,
            "shuffle_window": 40, "init_rows": 64, "device": "cpu"}
    return SAETrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- streaming order


def test_windowed_shuffle_visits_every_row_once_reading_few_shards(cache):
    ids = []
    for batch in cache.iter_batches(20, shuffle=True, seed=1, window_rows=40, fields=("ids",)):
        ids += batch["ids"].tolist()
    assert sorted(ids) == list(range(96))
    # windows of whole shards (3 of 16 rows >= 40), rows shuffled within each window
    windows = [set(i // 16 for i in ids[w:w + 48]) for w in (0, 48)]
    assert [len(w) for w in windows] == [3, 3] and not windows[0] & windows[1]
    assert ids[:48] != sorted(ids[:48])
    global_order = [b["ids"] for b in cache.iter_batches(96, shuffle=True, seed=1,
                                                         fields=("ids",))]
    same_as_global = [b["ids"] for b in cache.iter_batches(96, shuffle=True, seed=1,
                                                           window_rows=10**6, fields=("ids",))]
    assert torch.equal(global_order[0], same_as_global[0])  # a window >= the rows: global
    other = [b["ids"] for b in cache.iter_batches(96, shuffle=True, seed=2, window_rows=40,
                                                  fields=("ids",))]
    assert not torch.equal(other[0], torch.tensor(ids))


def test_skip_batches_continues_the_same_order(cache):
    full = [b["acts"] for b in cache.iter_batches(20, shuffle=True, seed=4, window_rows=40)]
    rest = [b["acts"] for b in cache.iter_batches(20, shuffle=True, seed=4, window_rows=40,
                                                  skip_batches=3)]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(full[3:], rest))


def test_training_streams_without_loading_the_cache(cache_dpath, tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("the whole cache was loaded")

    monkeypatch.setattr(ActivationCache, "load_acts", refuse)
    result = train_sae_on_cache(cache_dpath, tmp_path / "sae.safetensors", _config())
    assert result.steps == 30 and result.metrics.n_rows == 96


# ---------------------------------------------------------------- checkpoints


class _Interrupt(Exception):
    pass


class _StopAt:
    """A reporter whose training task raises after ``step`` steps, like a killed run."""

    def __init__(self, step: int):
        self.step = step

    def task(self, description, total=None):
        outer = self

        class _Task:
            done = 0

            def advance(self, n=1, **fields):
                self.done += n
                if description == "train SAE" and self.done > outer.step:
                    raise _Interrupt

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return _Task()


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(cache, tmp_path):
    config = _config(checkpoint_every=7)
    whole = train_sae(cache, config).sae
    ckpt = tmp_path / "run.checkpoint.safetensors"
    with pytest.raises(_Interrupt):
        train_sae(cache, config, checkpoint_fpath=ckpt, reporter=_StopAt(17))
    assert read_tensor_meta(ckpt)["steps_done"] == 14  # the last multiple of 7 before 17
    resumed = train_sae(cache, config, checkpoint_fpath=ckpt).sae
    for name in WEIGHTS:
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name


def test_a_checkpoint_of_other_options_is_refused_naming_them(cache, tmp_path):
    ckpt = tmp_path / "c.checkpoint.safetensors"
    with pytest.raises(_Interrupt):
        train_sae(cache, _config(checkpoint_every=5), checkpoint_fpath=ckpt,
                  reporter=_StopAt(6))
    with pytest.raises(MismatchError, match="k=8; this run asks for 16"):
        train_sae(cache, _config(checkpoint_every=5, k=16), checkpoint_fpath=ckpt)
    # the device and the checkpoint frequency may change between runs
    train_sae(cache, _config(checkpoint_every=9), checkpoint_fpath=ckpt)


@pytest.mark.slow
def test_train_sae_cli_resumes_after_kill_9(cache_dpath, tmp_path):
    args = ["train-sae", str(cache_dpath), "--n-latents", "128", "--k", "8", "--steps", "300",
            "--batch-size", "32", "--checkpoint-every", "10", "--device", "cpu", "--quiet",
            "--no-embed-check"]
    out = tmp_path / "sae.safetensors"
    ckpt = checkpoint_fpath_for(out)
    proc = subprocess.Popen([sys.executable, "-m", "clipaudit", *args, "--out", str(out)],
                            cwd=REPO_DPATH, env={**os.environ, "PYTHONPATH": str(REPO_DPATH)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "the run finished before it could be killed"
    reached = read_tensor_meta(ckpt)["steps_done"]
    assert 0 < reached < 300

    resumed = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["steps"] == 300 and not ckpt.exists()
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole.safetensors")])
    assert whole.exit_code == 0, whole.output
    a, b = read_sae_file(out), read_sae_file(tmp_path / "whole.safetensors")
    for name in WEIGHTS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------- bf16


def test_bf16_autocast_trains_about_as_well_as_float32(cache):
    fp32 = train_sae(cache, _config(steps=120))
    bf16 = train_sae(cache, _config(steps=120, bf16=True))
    assert not torch.equal(bf16.sae.W_enc, fp32.sae.W_enc)  # the autocast path ran
    assert abs(bf16.metrics.fvu - fp32.metrics.fvu) < 0.1
    assert bf16.sae.W_enc.dtype == torch.float32  # weights stay float32
