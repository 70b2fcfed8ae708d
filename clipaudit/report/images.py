"""Thumbnails inlined as ``data:`` URIs, so a report is one file that works offline."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


def thumbnail_data_uri(audit_dpath: Path, rel_path: str, px: int) -> str | None:
    """The image at ``audit_dpath/rel_path`` downsized to ``px`` (longest side).

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
    return _smallest_encoding(rgb)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB on white: JPEG has no alpha, and a transparent thumbnail prints as black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _smallest_encoding(img: Image.Image) -> str:
    # Photos compress far better as JPEG; flat synthetic images as PNG. Keep the smaller.
    candidates = []
    for fmt, mime, options in (("PNG", "image/png", {"optimize": True}),
                               ("JPEG", "image/jpeg", {"quality": 82, "optimize": True})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **options)
        candidates.append((len(buf.getvalue()), mime, buf.getvalue()))
    _, mime, raw = min(candidates)
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"
