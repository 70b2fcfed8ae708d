"""WebDataset tar shards and Parquet files of image bytes as inputs (local engine).

The reference is the same images extracted from a CSV manifest: an item read from a
container must give the same activations, labels and content hash as the file itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipaudit.cli import app
from clipaudit.errors import InputError
from clipaudit.extraction.backbone import BackboneSpec
from clipaudit.extraction.cache import ExtractConfig, extract
from clipaudit.extraction.data import decode_image, load_image_source

from conftest import CONFIGS_DPATH

TINY_A = BackboneSpec(model="tiny-vit-a", config=CONFIGS_DPATH / "tiny-vit-a.json")
LABELS = ("benign", "malignant")


def _config(**kw) -> ExtractConfig:
    return ExtractConfig(**{"backbone": TINY_A, "batch_size": 4, "shard_size": 6,
                            "num_workers": 0, **kw})


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _samples(n: int) -> list[dict]:
    return [{"key": f"{i:06d}", "png": _png(i), "label": LABELS[i % 2],
             "caption": f"image number {i}", "meta": {"width": 48, "source": f"s{i % 3}",
                                                       "nested": {"a": i}}}
            for i in range(n)]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_tars(dpath: Path, samples: list[dict], per_tar: int) -> list[Path]:
    dpath.mkdir(parents=True, exist_ok=True)
    out = []
    for t in range(0, len(samples), per_tar):
        fpath = dpath / f"{t // per_tar:05d}.tar"
        with tarfile.open(fpath, "w") as tf:
            for s in samples[t:t + per_tar]:
                _add(tf, f"{s['key']}.png", s["png"])
                _add(tf, f"{s['key']}.cls", s["label"].encode())
                _add(tf, f"{s['key']}.txt", s["caption"].encode())
                _add(tf, f"{s['key']}.json", json.dumps(s["meta"]).encode())
        out.append(fpath)
    return out


def _write_manifest(dpath: Path, samples: list[dict]) -> Path:
    (dpath / "files").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        (dpath / "files" / f"{s['key']}.png").write_bytes(s["png"])
        rows.append({"path": f"files/{s['key']}.png", "label": s["label"]})
    pd.DataFrame(rows).to_csv(dpath / "manifest.csv", index=False)
    return dpath / "manifest.csv"


def _write_hf_parquet(fpath: Path, samples: list[dict], row_group_size: int = 4) -> Path:
    """A Hugging Face ``datasets``-style file: image structs and a ClassLabel column."""
    table = pa.table({
        "image": pa.array([{"bytes": s["png"], "path": f"{s['key']}.png"} for s in samples],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([LABELS.index(s["label"]) for s in samples], pa.int64()),
        "source": pa.array([s["meta"]["source"] for s in samples]),
        "tags": pa.array([[s["key"]] for s in samples]),
    })
    features = {"image": {"_type": "Image"},
                "label": {"names": list(LABELS), "_type": "ClassLabel"},
                "source": {"dtype": "string", "_type": "Value"}}
    table = table.replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    fpath.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, fpath, row_group_size=row_group_size)
    return fpath


def _assert_same_activations(a, b) -> None:
    torch.testing.assert_close(a.load_acts(), b.load_acts(), rtol=0, atol=0)
    torch.testing.assert_close(a.load_embeds(), b.load_embeds(), rtol=0, atol=0)
    assert a.index["label"].tolist() == b.index["label"].tolist()
    assert a.index["sha256"].tolist() == b.index["sha256"].tolist()


# ---------------------------------------------------------------- WebDataset


def test_webdataset_folder_reads_labels_captions_and_json_metadata(tmp_path):
    samples = _samples(7)
    _write_tars(tmp_path / "shards", samples, per_tar=3)
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
    samples = _samples(10)
    _write_tars(tmp_path / "shards", samples, per_tar=4)
    from_tar = extract(tmp_path / "shards", tmp_path / "c-tar", _config()).cache
    from_files = extract(_write_manifest(tmp_path / "m", samples), tmp_path / "c-csv",
                         _config()).cache
    _assert_same_activations(from_tar, from_files)
    assert from_tar.index["sha256"][3] == hashlib.sha256(samples[3]["png"]).hexdigest()
    assert from_tar.provenance["data_sha256"] != from_files.provenance["data_sha256"]


def test_webdataset_brace_pattern_selects_shards(tmp_path):
    _write_tars(tmp_path / "shards", _samples(9), per_tar=3)
    source = load_image_source(str(tmp_path / "shards" / "{00000..00001}.tar"))
    assert len(source.items) == 6
    assert not any("00002.tar" in p for p in source.items["path"])
    with pytest.raises(InputError, match="00006.tar: not found"):
        load_image_source(str(tmp_path / "shards" / "{00006..00007}.tar"))


def test_webdataset_bad_members_are_recorded_with_their_reason(tmp_path):
    dpath = tmp_path / "shards"
    dpath.mkdir()
    with tarfile.open(dpath / "00000.tar", "w") as tf:
        _add(tf, "a.png", _png(1))
        _add(tf, "b.jpg", b"this is not a jpeg")
        _add(tf, "c.json", b'{"label": "benign", "status": "ok", "w": 3}')  # no image
        _add(tf, "d.png", _png(2)[:60])  # truncated
    result = extract(dpath, tmp_path / "c", _config())
    index = result.cache.index
    assert index["status"].tolist() == ["ok", "skipped", "skipped", "skipped"]
    reasons = index["reason"].tolist()
    assert reasons[1].startswith("not an image") and reasons[2].startswith("missing file")
    assert reasons[3].split(":")[0] in ("truncated", "corrupt")
    assert index["label"][2] == "benign" and index["json_status"][2] == "ok"


# ---------------------------------------------------------------- Parquet


def test_hf_parquet_cache_equals_the_manifest_cache_of_the_same_images(tmp_path):
    samples = _samples(10)
    _write_hf_parquet(tmp_path / "hf" / "data" / "train-00000-of-00002.parquet", samples[:6])
    _write_hf_parquet(tmp_path / "hf" / "data" / "train-00001-of-00002.parquet", samples[6:])
    source = load_image_source(tmp_path / "hf")
    assert source.items["label"].tolist() == [s["label"] for s in samples]  # ClassLabel names
    assert source.metadata_columns == ["source"]  # the list column is left out
    assert source.items["path"][7].endswith("train-00001-of-00002.parquet/image/1")
    from_parquet = extract(source, tmp_path / "c-pq", _config()).cache
    from_files = extract(_write_manifest(tmp_path / "m", samples), tmp_path / "c-csv",
                         _config()).cache
    _assert_same_activations(from_parquet, from_files)


def test_parquet_rows_without_bytes_are_skipped_with_a_reason(tmp_path):
    table = pa.table({"img": pa.array([_png(0), None, b"garbage"], pa.binary()),
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
    samples = _samples(2)
    csv = _write_manifest(tmp_path, samples)
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
    samples = _samples(2)
    _write_hf_parquet(tmp_path / "hf" / "train-00000-of-00001.parquet", samples)
    _write_hf_parquet(tmp_path / "hf" / "test-00000-of-00001.parquet", samples)
    with pytest.raises(InputError, match="several splits .test, train."):
        load_image_source(tmp_path / "hf")
    assert len(load_image_source(str(tmp_path / "hf" / "train-*.parquet")).items) == 2


def test_cli_extracts_tar_shards_by_pattern(tmp_path):
    _write_tars(tmp_path / "shards", _samples(5), per_tar=2)
    res = CliRunner().invoke(app, [
        "extract", str(tmp_path / "shards" / "{00000..00002}.tar"), "--out", str(tmp_path / "c"),
        "--model-config", str(CONFIGS_DPATH / "tiny-vit-a.json"), "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_ok"] == 5
