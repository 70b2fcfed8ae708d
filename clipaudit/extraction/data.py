"""Image data: an image folder or a CSV/Parquet manifest, decoded robustly in workers.

``load_image_source`` turns a folder (one sub-folder per class) or a manifest (a
path column, an optional label column, any metadata columns) into an
``ImageSource``: a table of items in a deterministic order. ``iter_decoded``
decodes them in DataLoader worker processes into preprocessed batches.

Bad inputs never stop a run. ``decode_image`` either returns an RGB image or
raises ``ImageDecodeError`` with a short reason category (``truncated``,
``not an image``, ``decompression bomb``, ...); ``iter_decoded`` records such
files as skipped and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipaudit.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
"""Pillow's default decompression-bomb limit (about 0.25 GiB of 24-bit pixels)."""
MAX_PIXELS_ENV = "CLIPAUDIT_MAX_IMAGE_PIXELS"
MAX_ASPECT_RATIO = 1000
"""Longer / shorter side. Resizing the shorter side of a 1 x 10^6 strip to 224 would
allocate gigabytes, so such strips are refused like bombs."""

# Formats decoded by Pillow itself (MPO, phones' multi-picture JPEG, opens as JPEG).
# Others (EPS via ghostscript, PDF, ...) are refused: a data set may come from anyone.
DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA",
                  "ICO", "JPEG2000", "QOI")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF",
          b"\x00\x00\x00\x0cjP", b"\xff\x4f\xff\x51")
RESERVED_COLUMNS = ("id", "sha256", "status", "reason")

# Reason categories recorded for a skipped file (the part of a reason before ':').
MISSING, EMPTY, NOT_IMAGE, TRUNCATED, CORRUPT, BOMB, ASPECT, MODE, FAILED = (
    "missing file", "empty file", "not an image", "truncated", "corrupt",
    "decompression bomb", "extreme aspect ratio", "unsupported mode", "decode error")


class ImageDecodeError(InputError):
    """An image file that cannot be used; ``category`` says why in a few words."""

    def __init__(self, fpath: Path | str, category: str, detail: str = ""):
        self.fpath, self.category, self.detail = Path(fpath), category, detail
        super().__init__(f"{fpath}: {self.reason}")

    @property
    def reason(self) -> str:
        """``category: detail`` as recorded in the cache index."""
        return f"{self.category}: {self.detail}" if self.detail else self.category


def reason_category(reason: str) -> str:
    """The category of a recorded reason (``"truncated: 3 bytes ..."`` -> ``"truncated"``)."""
    return reason.split(":", 1)[0]


def max_image_pixels() -> int:
    """The decompression-bomb limit: ``$CLIPAUDIT_MAX_IMAGE_PIXELS`` or Pillow's default."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


# ---------------------------------------------------------------- decoding


@contextlib.contextmanager
def _pil_limit(max_pixels: int) -> Iterator[None]:
    # Pillow refuses at twice its global limit while parsing headers; align it with ours
    # so that a raised limit works. Our own check below is the exact one. Truncated
    # images are always an error here, whatever another library set globally (weasyprint
    # sets ImageFile.LOAD_TRUNCATED_IMAGES on import, so a process that rendered a PDF
    # would otherwise decode half an image as a whole one).
    saved = Image.MAX_IMAGE_PIXELS
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated


def decode_image(fpath: Path | str, *, max_pixels: int | None = None,
                 data: bytes | None = None) -> Image.Image:
    """Decode ``fpath`` (or its already-read bytes ``data``) into an RGB image.

    EXIF orientation is applied; alpha is composited onto white; 16-bit and float
    images are scaled to 8 bits; CMYK, palette and grayscale are converted. Raises
    ``ImageDecodeError`` for a missing, empty, non-image, truncated, corrupt or
    oversized file (more than ``max_pixels``, default ``max_image_pixels()``).
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if data is None:
        data = _read_bytes(fpath)
    if not data:
        raise ImageDecodeError(fpath, EMPTY, "zero bytes")
    with _pil_limit(limit):
        im = _open(fpath, data, limit)
        try:
            im.load()
        except Exception as e:  # Pillow raises OSError, SyntaxError, EOFError, zlib.error, ...
            raise ImageDecodeError(fpath, _load_failure(e), _short(e)) from None
    im = _apply_exif_orientation(im)
    return _to_rgb(fpath, im)


def _read_bytes(fpath: Path | str) -> bytes:
    try:
        if not stat.S_ISREG(os.stat(fpath).st_mode) and not os.path.isdir(fpath):
            raise ImageDecodeError(fpath, NOT_IMAGE, "not a regular file (a pipe, socket or "
                                                     "device)")
        return Path(fpath).read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(fpath, MISSING) from None
    except NotADirectoryError:  # a path into a tar or Parquet file (see ``containers``)
        return _read_member(fpath)
    except IsADirectoryError:
        raise ImageDecodeError(fpath, NOT_IMAGE, "a directory") from None
    except OSError as e:
        raise ImageDecodeError(fpath, MISSING, f"unreadable ({e.strerror})") from None


def _read_member(fpath: Path | str) -> bytes:
    from clipaudit.extraction.containers import read_member_bytes

    try:
        return read_member_bytes(fpath)
    except ValueError:
        raise ImageDecodeError(fpath, MISSING) from None
    except FileNotFoundError as e:
        raise ImageDecodeError(fpath, MISSING, str(e)) from None
    except EOFError as e:
        raise ImageDecodeError(fpath, TRUNCATED, str(e)) from None
    except OSError as e:
        raise ImageDecodeError(fpath, MISSING, f"unreadable ({e.strerror or e})") from None


def _open(fpath: Path | str, data: bytes, limit: int) -> Image.Image:
    Image.init()  # registers every plugin, so that `formats` can name them
    formats = [f for f in DECODE_FORMATS if f in Image.OPEN]
    try:
        im = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        raise ImageDecodeError(fpath, BOMB, f"more than the limit of {limit} pixels (set "
                                            f"{MAX_PIXELS_ENV} to raise it)") from None
    except UnidentifiedImageError:
        # A known signature that Pillow cannot parse is a broken image, not a stray file.
        category = CORRUPT if data.startswith(_MAGIC) else NOT_IMAGE
        raise ImageDecodeError(fpath, category, "unrecognised image data") from None
    except Exception as e:  # a header parser failing on malformed or missing fields
        raise ImageDecodeError(fpath, _load_failure(e), _short(e)) from None
    width, height = im.size
    if width * height > limit:
        raise ImageDecodeError(fpath, BOMB, f"{width} x {height} pixels exceeds the limit of "
                                            f"{limit} (set {MAX_PIXELS_ENV} to raise it)")
    if min(width, height) <= 0:
        raise ImageDecodeError(fpath, CORRUPT, f"size {width} x {height}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageDecodeError(fpath, ASPECT, f"{width} x {height} pixels")
    return im


def _load_failure(e: Exception) -> str:
    return TRUNCATED if "truncated" in str(e).lower() else CORRUPT


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block should not lose an otherwise good image
        log.debug("ignoring unreadable EXIF orientation: %s", e)
        return im


def _to_rgb(fpath: Path | str, im: Image.Image) -> Image.Image:
    try:
        if im.mode.startswith("I") or im.mode == "F":
            return Image.fromarray(_scale_to_uint8(im), "L").convert("RGB")
        if im.mode in ("P", "PA", "L", "RGB") and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
        return im.convert("RGB")
    except Exception as e:  # Pillow has no conversion for some modes (e.g. LAB)
        raise ImageDecodeError(fpath, MODE, f"{im.mode} ({_short(e)})") from None


def _scale_to_uint8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
    else:  # 16-bit integer samples (I;16*, or I holding a 16-bit PNG)
        arr = arr / 257.0
    return np.nan_to_num(arr).clip(0, 255).round().astype(np.uint8)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class ImageSource:
    """Items to extract, in a deterministic order."""

    items: pd.DataFrame
    """Columns ``id`` (int64, 0..N-1), ``path`` (absolute, str), ``label`` (str or None),
    then every metadata column of the manifest."""
    root: Path
    """The image folder, or the folder of the manifest."""
    source_sha256: str
    """Hash of the item list, labels and metadata (not of image bytes)."""

    @property
    def metadata_columns(self) -> list[str]:
        return [c for c in self.items.columns if c not in ("id", "path", "label")]


def load_image_source(path: Path | str, *, path_column: str = "path",
                      label_column: str | None = "label",
                      image_column: str | None = None) -> ImageSource:
    """Items from an image folder (sub-folders are labels), a .csv/.parquet manifest,
    WebDataset tar shards or Parquet files of image bytes (Hugging Face ``datasets``).

    Manifest paths are relative to the manifest's folder or absolute. The label
    column is optional when it has the default name ``label``; a label column
    named explicitly must exist. A missing path column or a duplicate path is an
    ``InputError``; a listed file that does not exist is skipped when decoding.

    Tar shards and Parquet files of image bytes come as one file, a folder of them
    (recursively; a folder that holds image files is an image folder), or a brace or
    glob pattern (``shards/{00000..00099}.tar``, ``data/train-*.parquet``). A .parquet
    file with ``path_column`` is a manifest; one with an image column (``image_column``,
    default: detected) holds the images. How such items are named and hashed:
    ``clipaudit.extraction.containers``.
    """
    from clipaudit.extraction import containers

    text = str(path)
    path = Path(path)
    if not path.exists() and containers.is_pattern(text):
        items = containers.scan_containers(containers.expand_pattern(text), text,
                                           label_column, image_column)
        root = path.parent
    elif path.is_dir():
        items, root = _scan_dir(path, label_column, image_column), path
    elif path.is_file() and path.suffix.lower() in containers.TAR_SUFFIXES:
        items, root = containers.scan_webdataset([path.resolve()], label_column), path.parent
    elif path.is_file() and path.suffix.lower() in (".parquet", ".pq") and (
            image_column is not None or containers.is_image_parquet(path, path_column)):
        items = containers.scan_image_parquet([path.resolve()], image_column, label_column)
        root = path.parent
    elif path.is_file() and path.suffix.lower() in (".csv", ".parquet", ".pq"):
        items, root = _read_manifest(path, path_column, label_column), path.parent
    elif not path.exists():
        raise InputError(f"{path}: not found (expected an image folder, a .csv/.parquet "
                         "manifest, .tar shards or Parquet files of images)")
    else:
        raise InputError(f"{path}: expected an image folder, a .csv/.parquet manifest, .tar "
                         "shards or Parquet files of images")
    items.insert(0, "id", np.arange(len(items), dtype=np.int64))
    return ImageSource(items=items, root=root.resolve(), source_sha256=_hash_items(items))


def image_extensions() -> tuple[str, ...]:
    """File extensions a folder scan picks up (those of ``DECODE_FORMATS``)."""
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in (*DECODE_FORMATS, "MPO")))


def _scan_dir(dpath: Path, label_column: str | None, image_column: str | None) -> pd.DataFrame:
    """An image folder, or a folder of tar shards or of Parquet files of images."""
    from clipaudit.extraction import containers

    exts = set(image_extensions())
    has_images = any(p.is_file() and p.suffix.lower() in exts
                     and not any(part.startswith(".") for part in p.relative_to(dpath).parts)
                     for p in dpath.rglob("*"))
    if not has_images:
        tars, parquets = containers.container_files(dpath)
        if tars or parquets:
            return containers.scan_containers(tars + parquets, str(dpath), label_column,
                                              image_column)
    return _scan_folder(dpath)


def _scan_folder(dpath: Path) -> pd.DataFrame:
    """Every image file under ``dpath`` (hidden names skipped), the first folder level as
    the label. Symlinked folders are followed, each real folder once, so a symlink loop
    ends the walk there; a symlink with an image extension that leads nowhere (broken,
    looping) is kept, and decoding records it as skipped."""
    exts = set(image_extensions())
    root = dpath.resolve()
    rows, n_ignored, bad_names = [], 0, []
    for rel in _walk(dpath):
        if rel.suffix.lower() not in exts:
            n_ignored += 1
            continue
        text = rel.as_posix()
        if not _is_utf8(text):
            bad_names.append(text)
            continue
        label = rel.parts[0] if len(rel.parts) > 1 else None
        rows.append((text, str(root / rel), label))
    if bad_names:
        shown = os.fsencode(bad_names[0]).decode("utf-8", "backslashreplace")
        raise InputError(f"{dpath}: {len(bad_names)} file name(s) are not valid UTF-8 (first: "
                         f"{shown}); clipaudit stores paths as text: rename them, or list "
                         "the images to use in a .csv manifest")
    if not rows:
        raise InputError(f"{dpath}: no image files found (extensions: {', '.join(sorted(exts))})")
    if n_ignored:
        log.info("%s: ignored %d files that are not images by extension", dpath, n_ignored)
    rows.sort()  # by path relative to the folder: independent of where the folder lives
    return pd.DataFrame({"path": [r[1] for r in rows], "label": [r[2] for r in rows]})


def _walk(dpath: Path) -> Iterator[Path]:
    """Relative paths of the non-folder entries under ``dpath``, following symlinked
    folders once per real folder (so a loop stops instead of recursing forever)."""
    seen: set[tuple[int, int]] = set()

    def on_error(e: OSError) -> None:
        log.warning("%s: skipping an unreadable folder (%s)", e.filename, e.strerror)

    for folder, dnames, fnames in os.walk(dpath, followlinks=True, onerror=on_error):
        try:
            st = os.stat(folder)
        except OSError:
            dnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("%s: a symlink leads back to a folder already scanned; not followed",
                        folder)
            dnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        rel_folder = Path(folder).relative_to(dpath)
        dnames[:] = sorted(d for d in dnames if not d.startswith("."))
        for name in fnames:
            if not name.startswith(".") and _may_be_image(Path(folder, name)):
                yield rel_folder / name


def _may_be_image(fpath: Path) -> bool:
    """Regular files, and symlinks that lead nowhere (decoding records why); never a
    pipe, socket or device, which reading would block on or stream from forever."""
    try:
        return stat.S_ISREG(os.stat(fpath).st_mode)
    except OSError:
        return os.path.islink(fpath)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name (surrogate escapes)
        return False
    return True


def _read_manifest(fpath: Path, path_column: str, label_column: str | None) -> pd.DataFrame:
    try:
        if fpath.suffix.lower() == ".csv":
            df = pd.read_csv(fpath, dtype={path_column: str}, keep_default_na=True)
        else:
            df = pd.read_parquet(fpath)
    except Exception as e:  # pandas/pyarrow raise many types for malformed files
        raise InputError(f"{fpath}: not a readable manifest ({_short(e)})") from None
    columns = [str(c) for c in df.columns]
    df.columns = columns
    if path_column not in columns:
        raise InputError(f"{fpath}: no path column {path_column!r} (columns: "
                         f"{', '.join(columns) or 'none'}); name it with --path-column")
    if label_column is not None and label_column not in columns and label_column != "label":
        raise InputError(f"{fpath}: no label column {label_column!r} (columns: "
                         f"{', '.join(columns)})")
    has_label = label_column is not None and label_column in columns
    meta = [c for c in columns if c not in (path_column, label_column if has_label else None)]
    clash = [c for c in meta if c in (*RESERVED_COLUMNS, "path", "label")]
    if clash:
        raise InputError(f"{fpath}: column(s) {', '.join(clash)} clash with names clipaudit "
                         "adds to the index; rename them")
    paths = _manifest_paths(fpath, df[path_column])
    labels = [None if pd.isna(v) else str(v) for v in df[label_column]] if has_label else None
    out = pd.DataFrame({"path": paths, "label": labels or [None] * len(df)})
    for col in meta:
        out[col] = df[col].to_numpy()
    return out


def _manifest_paths(fpath: Path, raw: pd.Series) -> list[str]:
    base = fpath.parent.resolve()
    paths = []
    for row, value in enumerate(raw.tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
            raise InputError(f"{fpath}: row {row + 1}: empty path")
        p = Path(str(value)).expanduser()
        paths.append(os.path.normpath(p if p.is_absolute() else base / p))
    first_row: dict[str, int] = {}
    for row, path in enumerate(paths):
        if path in first_row:
            raise InputError(f"{fpath}: duplicate path {path!r} in rows {first_row[path] + 1} and "
                             f"{row + 1}; each image must be listed once")
        first_row[path] = row
    if not paths:
        raise InputError(f"{fpath}: the manifest lists no images")
    return paths


def _hash_items(items: pd.DataFrame) -> str:
    h = hashlib.sha256(json.dumps([str(c) for c in items.columns]).encode())
    for row in items.itertuples(index=False, name=None):
        h.update(json.dumps(row, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- batches


@dataclass(frozen=True)
class DecodedBatch:
    """One batch of decoded items; skipped items are listed, not dropped silently."""

    ids: torch.Tensor
    """int64 [b]: ids of the decoded rows, in order."""
    images: torch.Tensor
    """float [b, 3, H, W]: the preprocessed images (``[0]`` when nothing decoded)."""
    skipped: list[tuple[int, str]]
    """(id, reason) of the items that could not be used."""
    sha256: dict[int, str]
    """Content hash of every item whose bytes could be read (decoded or not)."""


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, ids: Sequence[int], paths: Sequence[str],
                 preprocess: Callable[[Any], torch.Tensor], max_pixels: int):
        self.ids, self.paths = list(ids), list(paths)
        self.preprocess, self.max_pixels = preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        item_id, fpath, digest = self.ids[i], self.paths[i], None
        try:
            data = _read_bytes(fpath)
            digest = hashlib.sha256(data).hexdigest()
            image = self.preprocess(decode_image(fpath, max_pixels=self.max_pixels, data=data))
            return item_id, image, None, digest
        except ImageDecodeError as e:
            return item_id, None, e.reason, digest
        except Exception as e:  # one bad file (or a preprocess failure) must not stop the run
            return item_id, None, f"{FAILED}: {type(e).__name__}: {_short(e)}", digest


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None, str | None]]
             ) -> DecodedBatch:
    ok = [(i, img) for i, img, _, _ in samples if img is not None]
    return DecodedBatch(
        ids=torch.tensor([i for i, _ in ok], dtype=torch.int64),
        images=torch.stack([img for _, img in ok]) if ok else torch.empty(0),
        skipped=[(i, reason or FAILED) for i, img, reason, _ in samples if img is None],
        sha256={i: digest for i, _, _, digest in samples if digest is not None},
    )


def iter_decoded(items: pd.DataFrame, preprocess: Callable[[Any], torch.Tensor], *,
                 batch_size: int = 64, num_workers: int = 2,
                 batches: Sequence[Sequence[int]] | None = None,
                 max_pixels: int | None = None, pin_memory: bool = False
                 ) -> Iterator[DecodedBatch]:
    """Decode and preprocess ``items`` (columns ``id``, ``path``) in worker processes.

    Batches are consecutive runs of ``batch_size`` rows, or exactly ``batches`` (lists
    of row positions in ``items``) when given; they come back in order. Files that
    cannot be decoded are listed in ``DecodedBatch.skipped`` with a reason.
    """
    if batch_size <= 0 or num_workers < 0:
        raise InputError(f"batch size must be positive and workers >= 0 "
                         f"(got {batch_size}, {num_workers})")
    n = len(items)
    if batches is None:
        batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if not batches:
        return
    dataset = _DecodeDataset(items["id"].astype("int64").tolist(), items["path"].tolist(),
                             preprocess, max_image_pixels() if max_pixels is None else max_pixels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
        collate_fn=_collate, pin_memory=pin_memory,
    )
    yield from loader
