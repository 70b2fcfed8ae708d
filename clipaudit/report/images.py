"""Thumbnails inlined as ``data:`` URIs, so a report is one file that works offline.

Each report gets the encoding its reader handles best:

- the HTML report (browsers): lossy WebP at quality 80. On photos it matches the luma
  PSNR of the JPEG at quality 82 used before (38.6 against 38.2 dB; 20 crops of ten of
  scikit-image's colour sample photos at 128 px) in 0.74 of its bytes. An image of at
  most 256 colours (a drawing, a synthetic test image) is stored losslessly instead
  when that is smaller. Every current browser decodes WebP (Chrome and Edge, Firefox
  65+, Safari 14+); a Pillow built without WebP gets the PDF's encodings.
- the PDF (weasyprint): PNG or JPEG at quality 82, the smaller. weasyprint copies a
  JPEG into the PDF as it is, but would decode a WebP and store its pixels losslessly,
  which makes the PDF larger.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError, features

log = logging.getLogger(__name__)

WEBP_QUALITY = 80
JPEG_QUALITY = 82
_FEW_COLOURS = 256


def thumbnail_data_uri(audit_dpath: Path, rel_path: str, px: int, *,
                       for_print: bool = False) -> str | None:
    """The image at ``audit_dpath/rel_path`` downsized to ``px`` (longest side), encoded
    for a browser (WebP) or, with ``for_print``, for the PDF (PNG or JPEG).

    Returns None (the report shows a placeholder) when the file is missing,
    unreadable or outside the audit folder: a report must render even from a
    partly copied audit folder, and must never read files the audit did not write.
    """
    root = audit_dpath.resolve()
    fpath = (root / rel_path).resolve()
    if not fpath.is_relative_to(root):
        log.warning("thumbnail %s lies outside the audit folder %s; not shown", rel_path, root)
        return None
    try:
        with Image.open(fpath) as img:
            img.thumbnail((px, px))
            rgb = _flatten(img)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        log.warning("thumbnail %s unreadable (%s); not shown", fpath, e)
        return None
    return _print_encoding(rgb) if for_print else _web_encoding(rgb)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB on white: JPEG has no alpha, and a transparent thumbnail prints as black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _data_uri(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _web_encoding(img: Image.Image) -> str:
    if not features.check("webp"):  # a Pillow built without libwebp (PyPI's wheels have it)
        return _print_encoding(img)
    raw = _encode(img, "WEBP", quality=WEBP_QUALITY, method=6)
    # Lossless wins only on flat pictures; counting colours is cheaper than trying it on photos.
    if img.getcolors(_FEW_COLOURS) is not None:
        lossless = _encode(img, "WEBP", lossless=True)
        if len(lossless) <= len(raw):
            raw = lossless
    return _data_uri("image/webp", raw)


def _print_encoding(img: Image.Image) -> str:
    # Photos compress far better as JPEG; flat synthetic images as PNG. Keep the smaller.
    png = _encode(img, "PNG", optimize=True)
    jpeg = _encode(img, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return _data_uri("image/png", png) if len(png) <= len(jpeg) else _data_uri("image/jpeg", jpeg)
