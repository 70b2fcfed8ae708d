"""Small vector charts as inline SVG strings (no plotting library, no fonts to embed).

Every piece of user text (class names, concept labels, method names) goes
through ``_esc`` before it is placed in the SVG; the result is marked safe only
once it is built from escaped parts.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup

_FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'
FINDING_COLOR = "#c62828"
OTHER_COLOR = "#78839a"
# Colour-blind-safe (Okabe-Ito) series colours, one per faithfulness method.
SERIES_COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")


@dataclass(frozen=True)
class ScatterPoint:
    component: int
    share: float
    alignment: float
    clarity: float
    concept: str
    is_finding: bool


@dataclass(frozen=True)
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]


@dataclass(frozen=True)
class _Frame:
    """Plot area in pixels and the data ranges it maps."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def x(self, v: float) -> float:
        span = self.width - self.left - self.right
        return self.left + (v - self.x_lo) / (self.x_hi - self.x_lo) * span

    def y(self, v: float) -> float:
        span = self.height - self.top - self.bottom
        return self.height - self.bottom - (v - self.y_lo) / (self.y_hi - self.y_lo) * span


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _n(v: float) -> str:
    """A coordinate with one decimal: enough for a screen or a printed page."""
    return f"{v:.1f}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _tick_label(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{v:.{min(decimals, 4)}f}"


def _padded_range(values: Sequence[float], include_zero: bool) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    lo = min(finite, default=0.0)
    hi = max(finite, default=1.0)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def _axes(f: _Frame, x_label: str, y_label: str) -> list[str]:
    """Grid, tick labels and axis titles."""
    parts = []
    x_ticks, y_ticks = nice_ticks(f.x_lo, f.x_hi), nice_ticks(f.y_lo, f.y_hi)
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    x0, x1, y0, y1 = f.left, f.width - f.right, f.height - f.bottom, f.top
    for t in x_ticks:
        x = _n(f.x(t))
        parts.append(f'<line x1="{x}" y1="{y0}" x2="{x}" y2="{y1}" stroke="#e3e6ec"/>')
        parts.append(f'<text x="{x}" y="{y0 + 13}" text-anchor="middle">'
                     f'{_tick_label(t, x_step)}</text>')
    for t in y_ticks:
        y = _n(f.y(t))
        parts.append(f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#e3e6ec"/>')
        parts.append(f'<text x="{x0 - 4}" y="{y}" dy="3" text-anchor="end">'
                     f'{_tick_label(t, y_step)}</text>')
    parts.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" '
                 'fill="none" stroke="#9aa3b2"/>')
    parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{f.height - 6}" text-anchor="middle" '
                 f'font-size="11">{_esc(x_label)}</text>')
    parts.append(f'<text x="12" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 12 {(y0 + y1) / 2:.1f})">{_esc(y_label)}</text>')
    return parts


def _svg(width: int, height: int, label: str, parts: list[str]) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{_esc(label)}" '
        f'{_FONT} font-size="9" fill="#333">{body}</svg>'
    )


def _radius(clarity: float) -> float:
    """2 to 8 px by clarity, in half pixels (13 sizes: more than an eye tells apart)."""
    c = min(max(clarity, 0.0), 1.0) if math.isfinite(clarity) else 0.0
    return round(2 * (2.0 + 6.0 * c)) / 2


def _finite_point(p: ScatterPoint) -> bool:
    return math.isfinite(p.share) and math.isfinite(p.alignment)


def _point(f: _Frame, p: ScatterPoint) -> str:
    """A point with a hover tooltip."""
    if not _finite_point(p):
        return ""
    return (f'<circle cx="{_n(f.x(p.alignment))}" cy="{_n(f.y(p.share))}" r="{_radius(p.clarity):g}">'
            f'<title>#{p.component} {_esc(p.concept)}: share {p.share:.3f}, '
            f'alignment {p.alignment:+.3f}, clarity {p.clarity:.2f}</title></circle>')


def _crowd(f: _Frame, points: Sequence[ScatterPoint]) -> list[str]:
    """Points without a tooltip as a few ``<path>`` elements rather than one ``<circle>``
    each (a third of the bytes): a zero-length segment with round caps draws a dot of
    the stroke's width, so each path holds the dots of one size.

    Centres are snapped to whole pixels (at most half a pixel off). Within one path
    overlapping dots would be painted once, where separate translucent circles darken
    each other; so dots that overlap go to different paths, and a dense crowd reads as
    dense as before.
    """
    layers: dict[float, list[list[tuple[int, int]]]] = {}
    for p in points:
        if not _finite_point(p):
            continue
        r = _radius(p.clarity)
        x, y = round(f.x(p.alignment)), round(f.y(p.share))
        paths = layers.setdefault(r, [])
        free = next((dots for dots in paths
                     if all((x - u) ** 2 + (y - v) ** 2 >= (2 * r) ** 2 for u, v in dots)), None)
        if free is None:
            paths.append(free := [])
        free.append((x, y))
    return [f'<path stroke-width="{2 * r:g}" d="{"".join(f"M{x} {y}h0" for x, y in dots)}"/>'
            for r, paths in sorted(layers.items()) for dots in paths]


def scatter_svg(points: Sequence[ScatterPoint], class_name: str, *,
                tooltips: int = 100) -> Markup:
    """Relevance share (y) against class alignment (x); size = clarity; findings in red.

    Findings and the ``tooltips`` points of largest |share| get a hover tooltip (a
    ``<circle>`` with a ``<title>``); the crowd near zero gets none and is drawn as dots
    (``_crowd``) in a third of the bytes of a bare circle each.
    """
    width, height = 440, 300
    label = f"Relevance share vs alignment for class {class_name}"
    if not points:
        return _svg(width, 40, label, ['<text x="8" y="24">no components recorded</text>'])
    x_lo, x_hi = _padded_range([p.alignment for p in points], include_zero=True)
    y_lo, y_hi = _padded_range([p.share for p in points], include_zero=True)
    f = _Frame(width, height, 48, 12, 10, 36, x_lo, x_hi, y_lo, y_hi)
    parts = _axes(f, "alignment with the class", "relevance share")
    zero_x, zero_y = _n(f.x(0.0)), _n(f.y(0.0))
    parts.append(f'<line x1="{zero_x}" y1="{f.top}" x2="{zero_x}" y2="{height - f.bottom}" '
                 'stroke="#9aa3b2" stroke-dasharray="3 3"/>')
    parts.append(f'<line x1="{f.left}" y1="{zero_y}" x2="{width - f.right}" y2="{zero_y}" '
                 'stroke="#9aa3b2" stroke-dasharray="3 3"/>')
    # Styles live on two groups (not on each of hundreds of points); findings come
    # last, so they are drawn on top of the crowd.
    others = [p for p in points if not p.is_finding]
    findings = [p for p in points if p.is_finding]
    by_share = sorted(others, key=lambda p: -abs(p.share) if _finite_point(p) else 0.0)
    explained = {id(p) for p in by_share[:tooltips]}
    parts.append(f'<g fill="none" stroke="{OTHER_COLOR}" stroke-opacity="0.45" stroke-linecap="round">')
    parts += _crowd(f, [p for p in others if id(p) not in explained])
    parts.append(f'</g><g fill="{OTHER_COLOR}" fill-opacity="0.45">')
    parts += [_point(f, p) for p in others if id(p) in explained]
    parts.append(f'</g><g fill="{FINDING_COLOR}" fill-opacity="0.85" stroke="#7f0000">')
    parts += [_point(f, p) for p in findings]
    parts.append(f'</g><g fill="{FINDING_COLOR}">')
    parts += [f'<text x="{_n(f.x(p.alignment) + _radius(p.clarity) + 2)}" y="{_n(f.y(p.share))}" '
              f'dy="3">#{p.component} {_esc(p.concept)}</text>'
              for p in findings if _finite_point(p)]
    parts.append("</g>")
    return _svg(width, height, label, parts)


def line_chart_svg(series: Sequence[Series], *, x_label: str, y_label: str,
                   title: str) -> Markup:
    """One polyline per series with a legend (used for faithfulness deletion curves)."""
    width, height, legend_w = 480, 280, 130
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    x_lo, x_hi = _padded_range(xs, include_zero=False)
    y_lo, y_hi = _padded_range(ys, include_zero=False)
    f = _Frame(width, height, 48, legend_w, 10, 36, x_lo, x_hi, y_lo, y_hi)
    parts = _axes(f, x_label, y_label)
    for i, s in enumerate(series):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        pts = [(x, y) for x, y in zip(s.xs, s.ys) if math.isfinite(x) and math.isfinite(y)]
        coords = " ".join(f"{_n(f.x(x))},{_n(f.y(y))}" for x, y in pts)
        dash = ' stroke-dasharray="4 3"' if s.name == "random" else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                     f'stroke-width="1.8"{dash}><title>{_esc(s.name)}</title></polyline>')
        ly = f.top + 8 + 15 * i
        lx = width - legend_w + 10
        parts.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 23}" y="{ly}" dy="3">{_esc(s.name)}</text>')
    return _svg(width, height, title, parts)
