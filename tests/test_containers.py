"""WebDataset tar shards and Parquet files of image bytes as inputs (local engine).

The reference is the same images extracted from a CSV manifest: an item read from a
container must give the same activations, labels and content hash as the file itself.
"""

from __future__ import annotations

import hashlib
import json
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.data import decode_image, load_image_source

from conftest import (
    CONFIGS_DPATH,
    add_member,
    image_samples,
    png_bytes,
    write_hf_parquet,
    write_manifest,
    write_tars,
)

TINY_A = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json",
                      pretrained="random")


def _config(**kw) -> ExtractConfig:
    return ExtractConfig(**{"backbone": TINY_A, "batch_size": 4, "shard_size": 6,
                            "num_workers": 0, **kw})


def _assert_same_activations(a, b) -> None:
    torch.testing.assert_close(a.load_acts(), b.load_acts(), rtol=0, atol=0)
    torch.testing.assert_close(a.load_embeds(), b.load_embeds(), rtol=0, atol=0)
    assert a.index["label"].tolist() == b.index["label"].tolist()
    assert a.index["sha256"].tolist() == b.index["sha256"].tolist()


# ---------------------------------------------------------------- WebDataset


def test_webdataset_folder_reads_labels_captions_and_json_metadata(tmp_path):
    samples = image_samples(7)
    write_tars(tmp_path / "shards", samples, per_tar=3)
    source = load_image_source(tmp_path / "shards")
    items = source.items
    assert len(items) == 7 and items["id"].tolist() == list(range(7))
    assert items["label"].tolist() == [s["label"] for s in samples]
    assert items["caption"].tolist() == [s["caption"] for s in samples]
    assert items["source"].tolist() == [s["meta"]["source"] for s in samples]
    assert json.loads(items["nested"][5]) == {"a": 5}
    assert items["path"][4].endswith("00001.tar/000004.png")
    assert decode_image(items["path"][4]).size == (48, 40)  # thumbnails and explain read it
    assert set(source.metadata_columns) == {"caption", "width", "source", "nested"}


def test_webdataset_cache_equals_the_manifest_cache_of_the_same_images(tmp_path):
    samples = image_samples(10)
    write_tars(tmp_path / "shards", samples, per_tar=4)
    from_tar = extract(tmp_path / "shards", tmp_path / "c-tar", _config()).cache
    from_files = extract(write_manifest(tmp_path / "m", samples), tmp_path / "c-csv",
                         _config()).cache
    _assert_same_activations(from_tar, from_files)
    assert from_tar.index["sha256"][3] == hashlib.sha256(samples[3]["png"]).hexdigest()
    assert from_tar.provenance["data_sha256"] != from_files.provenance["data_sha256"]


def test_webdataset_brace_pattern_selects_shards(tmp_path):
    write_tars(tmp_path / "shards", image_samples(9), per_tar=3)
    source = load_image_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert len(source.items) == 6
    assert not any("00002.tar" in p for p in source.items["path"])
    with pytest.raises(InputError, match="00006.tar: not found"):
        load_image_source(str(tmp_path / "shards" / "{00006..00007}.tar"))


def test_webdataset_bad_members_are_recorded_with_their_reason(tmp_path):
    dpath = tmp_path / "shards"
    dpath.mkdir()
    with tarfile.open(dpath / "00000.tar", "w") as tf:
        add_member(tf, "a.png", png_bytes(1))
        add_member(tf, "b.jpg", b"this is not a jpeg")
        add_member(tf, "c.json", b'{"label": "benign", "status": "ok", "w": 3}')  # no image
        add_member(tf, "d.png", png_bytes(2)[:60])  # truncated
    result = extract(dpath, tmp_path / "c", _config())
    index = result.cache.index
    assert index["status"].tolist() == ["ok", "skipped", "skipped", "skipped"]
    reasons = index["reason"].tolist()
    assert reasons[1].startswith("not an image") and reasons[2].startswith("missing file")
    assert reasons[3].split(":")[0] in ("truncated", "corrupt")
    assert index["label"][2] == "benign" and index["json_status"][2] == "ok"


# ---------------------------------------------------------------- Parquet


def test_hf_parquet_cache_equals_the_manifest_cache_of_the_same_images(tmp_path):
    samples = image_samples(10)
    write_hf_parquet(tmp_path / "hf" / "data" / "train-00000-of-00002.parquet", samples[:6])
    write_hf_parquet(tmp_path / "hf" / "data" / "train-00001-of-00002.parquet", samples[6:])
    source = load_image_source(tmp_path / "hf")
    assert source.items["label"].tolist() == [s["label"] for s in samples]  # ClassLabel names
    assert source.metadata_columns == ["source"]  # the list column is left out
    assert source.items["path"][7].endswith("train-00001-of-00002.parquet/image/1")
    from_parquet = extract(source, tmp_path / "c-pq", _config()).cache
    from_files = extract(write_manifest(tmp_path / "m", samples), tmp_path / "c-csv",
                         _config()).cache
    _assert_same_activations(from_parquet, from_files)


def test_parquet_rows_without_bytes_are_skipped_with_a_reason(tmp_path):
    table = pa.table({"img": pa.array([png_bytes(0), None, b"garbage"], pa.binary()),
                      "y": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "x.parquet")
    result = extract(load_image_source(tmp_path / "x.parquet", label_column="y"),
                     tmp_path / "c", _config())
    index = result.cache.index
    assert index["label"].tolist() == ["a", "b", "c"]
    assert index["status"].tolist() == ["ok", "skipped", "skipped"]
    assert index["reason"][1].startswith("missing file")
    assert index["reason"][2].startswith("not an image")


def test_parquet_manifest_with_a_path_column_is_still_a_manifest(tmp_path):
    samples = image_samples(2)
    csv = write_manifest(tmp_path, samples)
    pd.read_csv(csv).to_parquet(tmp_path / "manifest.parquet")
    items = load_image_source(tmp_path / "manifest.parquet").items
    assert items["path"].tolist() == [str(tmp_path / "files" / f"{s['key']}.png")
                                      for s in samples]


@pytest.mark.parametrize("make, message", [
    (lambda d: pq.write_table(pa.table({"a": [1, 2]}), d / "x.parquet"), "no path column"),
    (lambda d: pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"])}),
                              d / "x.parquet"), "several columns could hold images"),
])
def test_parquet_without_a_usable_column_is_a_user_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(InputError, match=message):
        load_image_source(tmp_path / "x.parquet")


def test_folder_of_several_hf_splits_is_refused_naming_them(tmp_path):
    samples = image_samples(2)
    write_hf_parquet(tmp_path / "hf" / "train-00000-of-00001.parquet", samples)
    write_hf_parquet(tmp_path / "hf" / "test-00000-of-00001.parquet", samples)
    with pytest.raises(InputError, match="several splits .test, train."):
        load_image_source(tmp_path / "hf")
    assert len(load_image_source(str(tmp_path / "hf" / "train-*.parquet")).items) == 2


def test_cli_extracts_tar_shards_by_pattern(tmp_path):
    write_tars(tmp_path / "shards", image_samples(5), per_tar=2)
    res = CliRunner().invoke(app, [
        "extract", str(tmp_path / "shards" / "{00000..00002}.tar"), "--out", str(tmp_path / "c"),
        "--model-config", str(CONFIGS_DPATH / "tiny-vit-a.json"), "--pretrained", "random",
        "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_ok"] == 5
