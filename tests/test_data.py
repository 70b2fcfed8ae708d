"""Image sources and robust decoding: every bad input is decoded or skipped with a reason."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from clipaudit.errors import InputError
from clipaudit.extraction.data import (
    MAX_PIXELS_ENV,
    ImageDecodeError,
    decode_image,
    iter_decoded,
    load_image_source,
    reason_category,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _noise(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(fpath: Path, im: Image.Image, **kw) -> Path:
    im.save(fpath, **kw)
    return fpath


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _near(pixel, colour, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


# ---------------------------------------------------------------- images decoded correctly


def _cmyk(tmp: Path) -> Path:
    return _save(tmp / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))


def _rgba(tmp: Path) -> Path:
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black
    im.paste((255, 0, 0, 255), (0, 0, 8, 16))  # opaque red left half
    return _save(tmp / "rgba.png", im)


def _palette(tmp: Path, transparent: bool = False) -> Path:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.paste(1, (8, 0, 16, 16))
    name = "palette-t.png" if transparent else "palette.png"
    return _save(tmp / name, im, **({"transparency": 0} if transparent else {}))


def _sixteen_bit(tmp: Path) -> Path:
    arr = np.full((16, 16), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    arr[:, 8:] = 65535
    return _save(tmp / "sixteen.png", Image.fromarray(arr))


def _gray(tmp: Path) -> Path:
    return _save(tmp / "gray.png", Image.fromarray(_noise()[..., 0]))


def _exif_rotated(tmp: Path) -> Path:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored: wide, red left, blue right
    arr[:, :20], arr[:, 20:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _save(tmp / "rotated.jpg", Image.fromarray(arr), exif=exif.tobytes(), quality=95)


def test_cmyk_is_converted(tmp_path):
    im = decode_image(_cmyk(tmp_path))
    assert im.mode == "RGB" and _near(im.getpixel((8, 8)), RED)


def test_rgba_is_composited_onto_white(tmp_path):
    im = decode_image(_rgba(tmp_path))
    assert im.mode == "RGB"
    assert _near(im.getpixel((2, 8)), RED, 0) and _near(im.getpixel((12, 8)), WHITE, 0)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_is_converted(tmp_path, transparent):
    im = decode_image(_palette(tmp_path, transparent))
    assert im.mode == "RGB"
    assert _near(im.getpixel((2, 8)), WHITE if transparent else RED, 0)
    assert _near(im.getpixel((12, 8)), BLUE, 0)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    im = decode_image(_sixteen_bit(tmp_path))
    assert im.mode == "RGB"
    assert im.getpixel((2, 8)) == (128, 128, 128) and im.getpixel((12, 8)) == WHITE


def test_grayscale_keeps_its_values(tmp_path):
    fpath = _gray(tmp_path)
    arr = np.asarray(decode_image(fpath))
    assert arr.shape == (24, 32, 3)
    np.testing.assert_array_equal(arr[..., 0], np.asarray(Image.open(fpath)))
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    im = decode_image(_exif_rotated(tmp_path))
    # rotated clockwise: tall, and the stored left (red) half is now on top
    assert im.size == (20, 40)
    assert _near(im.getpixel((10, 5)), RED, 40) and _near(im.getpixel((10, 35)), BLUE, 40)


# ---------------------------------------------------------------- images refused


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected reason category)."""
    jpeg, png = _encoded(Image.fromarray(_noise()), "JPEG"), _encoded(Image.fromarray(_noise()), "PNG")
    corrupt = bytearray(png)
    corrupt[60:120] = bytes(60)  # zero a run of compressed pixel data
    files = {
        "zero-byte": (b"", "empty file"),
        "text-named-jpg": (b"these are not the pixels you are looking for\n", "not an image"),
        "random-bytes": (np.random.default_rng(1).bytes(500), "not an image"),
        "truncated-png": (png[: len(png) // 2], "truncated"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "corrupt-png": (bytes(corrupt), "corrupt"),
        "broken-header-png": (png[:30], "corrupt"),
        "eps-named-jpg": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not an image"),
    }
    out = {}
    for name, (data, category) in files.items():
        (tmp / f"{name}.jpg").write_bytes(data)
        out[name] = (tmp / f"{name}.jpg", category)
    out["missing"] = (tmp / "missing.jpg", "missing file")
    out["strip"] = (_save(tmp / "strip.png", Image.new("RGB", (3000, 2))), "extreme aspect ratio")
    return out


BAD = ("zero-byte", "text-named-jpg", "random-bytes", "truncated-png", "truncated-jpeg",
       "corrupt-png", "broken-header-png", "eps-named-jpg", "missing", "strip")


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_with_its_reason(tmp_path, name):
    fpath, category = _bad_inputs(tmp_path)[name]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(fpath)
    assert info.value.category == category
    assert reason_category(info.value.reason) == category
    assert str(fpath) in str(info.value)


def test_truncated_images_stay_errors_when_another_library_allows_them(tmp_path, monkeypatch):
    """weasyprint sets Pillow's LOAD_TRUNCATED_IMAGES on import: a process that rendered a
    PDF report must still refuse half an image."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in ("truncated-png", "corrupt-png"):
        fpath, category = _bad_inputs(tmp_path)[name]
        with pytest.raises(ImageDecodeError) as info:
            decode_image(fpath)
        assert info.value.category == category
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is left as it was


def test_decompression_bomb_is_refused_over_the_limit(tmp_path):
    fpath = _save(tmp_path / "big.png", Image.new("RGB", (100, 100)))
    assert decode_image(fpath, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="decompression bomb") as info:
        decode_image(fpath, max_pixels=9_999)
    assert "9999" in info.value.reason


def test_bomb_limit_from_the_environment(tmp_path, monkeypatch):
    fpath = _save(tmp_path / "big.png", Image.new("RGB", (100, 100)))
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(fpath)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_PIXELS_ENV):
        decode_image(fpath)


def test_raised_limit_overrides_pillows_own_and_restores_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 50 x 50
    fpath = _save(tmp_path / "mid.png", Image.new("RGB", (50, 50)))
    assert decode_image(fpath, max_pixels=10_000).size == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---------------------------------------------------------------- batches in workers


def _preprocess(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _mixed_folder(tmp: Path) -> Path:
    root = tmp / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(3):
        _save(root / "cat" / f"c{i}.jpg", Image.fromarray(_noise(seed=i)))
        _save(root / "dog" / f"d{i}.png", Image.fromarray(_noise(seed=10 + i)))
    for name, (fpath, _) in _bad_inputs(tmp).items():
        if name != "missing":
            fpath.rename(root / "dog" / f"bad-{fpath.name}")
    for maker in (_cmyk, _rgba, _palette, _sixteen_bit, _gray, _exif_rotated):
        maker(root / "cat")
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iter_decoded_decodes_good_and_records_bad_files(tmp_path, num_workers):
    source = load_image_source(_mixed_folder(tmp_path))
    items = source.items
    batches = list(iter_decoded(items, _preprocess, batch_size=4, num_workers=num_workers))
    assert len(batches) == -(-len(items) // 4)
    ids = torch.cat([b.ids for b in batches]).tolist()
    skipped = dict(s for b in batches for s in b.skipped)
    assert sorted(ids + list(skipped)) == items["id"].tolist() and ids == sorted(ids)
    bad = items[items["path"].str.contains("/bad-")]
    assert set(skipped) == set(bad["id"]) and len(bad) == len(BAD) - 1
    for row in items.itertuples():
        digest = {i: h for b in batches for i, h in b.sha256.items()}.get(row.id)
        assert digest == hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
    first_ok = batches[0].ids[0].item()
    expected = _preprocess(decode_image(items.loc[first_ok, "path"]))
    torch.testing.assert_close(batches[0].images[0], expected)


def test_iter_decoded_follows_given_batches(tmp_path):
    source = load_image_source(_mixed_folder(tmp_path))
    batches = [[0, 1], [5], [2, 3, 4]]
    out = list(iter_decoded(source.items, _preprocess, batches=batches, num_workers=0))
    got = [sorted(b.ids.tolist() + [i for i, _ in b.skipped]) for b in out]
    assert got == [[0, 1], [5], [2, 3, 4]]


# ---------------------------------------------------------------- sources


def test_folder_source_labels_order_and_ignored_files(tmp_path):
    root = tmp_path / "data"
    for label in ("zebra", "ant"):
        (root / label).mkdir(parents=True)
        for i in (2, 1):
            _save(root / label / f"{i}.jpg", Image.fromarray(_noise(seed=i)))
    _save(root / "loose.png", Image.fromarray(_noise()))
    (root / "ant" / "notes.txt").write_text("not an image by extension")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "x.png", Image.fromarray(_noise()))
    source = load_image_source(root)
    rel = [Path(p).relative_to(root.resolve()).as_posix() for p in source.items["path"]]
    assert rel == ["ant/1.jpg", "ant/2.jpg", "loose.png", "zebra/1.jpg", "zebra/2.jpg"]
    assert source.items["id"].tolist() == [0, 1, 2, 3, 4]
    assert source.items["id"].dtype == np.int64
    labels = [None if pd.isna(v) else v for v in source.items["label"]]
    assert labels == ["ant", "ant", None, "zebra", "zebra"]
    assert source.root == root.resolve()
    assert load_image_source(root).source_sha256 == source.source_sha256


def _manifest_dir(tmp: Path) -> Path:
    (tmp / "imgs").mkdir()
    for i in range(3):
        _save(tmp / "imgs" / f"{i}.png", Image.fromarray(_noise(seed=i)))
    return tmp


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_keeps_metadata_and_resolves_paths(tmp_path, suffix):
    _manifest_dir(tmp_path)
    df = pd.DataFrame({"file": ["imgs/2.png", str(tmp_path / "imgs" / "0.png"), "imgs/1.png"],
                       "label": ["b", "a", None], "has_ruler": [True, False, True],
                       "site": ["x", "y", "z"]})
    fpath = tmp_path / f"m{suffix}"
    df.to_csv(fpath, index=False) if suffix == ".csv" else df.to_parquet(fpath)
    items = load_image_source(fpath, path_column="file").items
    assert list(items.columns) == ["id", "path", "label", "has_ruler", "site"]
    assert items["path"].tolist() == [str(tmp_path / "imgs" / f"{i}.png") for i in (2, 0, 1)]
    assert items["has_ruler"].tolist() == [True, False, True]
    assert items["label"].iloc[0] == "b" and pd.isna(items["label"].iloc[2])


def test_manifest_without_label_column_is_unlabelled(tmp_path):
    _manifest_dir(tmp_path)
    pd.DataFrame({"path": ["imgs/0.png"]}).to_csv(tmp_path / "m.csv", index=False)
    items = load_image_source(tmp_path / "m.csv").items
    assert items["label"].isna().all()


def test_manifest_source_hash_follows_labels_and_metadata(tmp_path):
    _manifest_dir(tmp_path)
    hashes = set()
    for label, site in (("a", "x"), ("b", "x"), ("a", "y")):
        pd.DataFrame({"path": ["imgs/0.png"], "label": [label], "site": [site]}).to_csv(
            tmp_path / "m.csv", index=False)
        hashes.add(load_image_source(tmp_path / "m.csv").source_sha256)
    assert len(hashes) == 3


@pytest.mark.parametrize("rows, kwargs, message", [
    ({"file": ["imgs/0.png"]}, {}, "no path column 'path'.*file"),
    ({"path": ["imgs/0.png", "imgs/1.png", "./imgs/0.png"]}, {}, "duplicate path.*rows 1 and 3"),
    ({"path": ["imgs/0.png", None]}, {}, "row 2: empty path"),
    ({"path": ["imgs/0.png"]}, {"label_column": "diagnosis"}, "no label column 'diagnosis'"),
    ({"path": ["imgs/0.png"], "status": ["x"]}, {}, "status.*clash"),
])
def test_manifest_errors_name_the_problem(tmp_path, rows, kwargs, message):
    _manifest_dir(tmp_path)
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(InputError, match=message) as info:
        load_image_source(tmp_path / "m.csv", **kwargs)
    assert "m.csv" in str(info.value)


def test_manifest_missing_file_is_a_recorded_skip(tmp_path):
    _manifest_dir(tmp_path)
    pd.DataFrame({"path": ["imgs/0.png", "imgs/gone.png"]}).to_csv(tmp_path / "m.csv",
                                                                   index=False)
    [batch] = iter_decoded(load_image_source(tmp_path / "m.csv").items, _preprocess,
                           batch_size=8, num_workers=0)
    assert batch.ids.tolist() == [0]
    assert [(i, reason_category(r)) for i, r in batch.skipped] == [(1, "missing file")]


@pytest.mark.parametrize("what", ["nothing", "empty-folder", "text-file", "bad-csv"])
def test_unusable_data_path_is_a_user_error(tmp_path, what):
    target = {"nothing": tmp_path / "nope", "empty-folder": tmp_path,
              "text-file": tmp_path / "a.txt", "bad-csv": tmp_path / "m.csv"}[what]
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "m.csv").write_bytes(b'"unterminated\n\x00\x00')
    with pytest.raises(InputError, match=str(target.name)):
        load_image_source(target)
