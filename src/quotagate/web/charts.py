"""Server-rendered SVG charts: no JavaScript, no CDN, readable without colour."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape


def human(n: float) -> str:
    """600 → "600", 200000 → "200k", 5000000 → "5M"."""
    for div, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.0f}{suffix}" if value == int(value) or value >= 100 else f"{value:.1f}{suffix}"
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def bar_chart(points: Sequence[tuple[datetime, float]], *, title: str, unit: str, width: int = 640,
              height: int = 180) -> str:
    """A bar chart of ``points`` (time, value) as an SVG string with an accessible title."""
    pad_l, pad_b, pad_t = 48, 22, 10
    inner_w, inner_h = width - pad_l - 8, height - pad_b - pad_t
    top = max((v for _, v in points), default=0) or 1
    n = max(len(points), 1)
    bar_w = inner_w / n
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for frac in (0, 0.5, 1):
        y = pad_t + inner_h * (1 - frac)
        parts.append(f'<line x1="{pad_l}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{pad_l - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{human(top * frac)}</text>')
    for i, (when, value) in enumerate(points):
        h = inner_h * value / top
        x = pad_l + i * bar_w
        parts.append(f'<rect x="{x + bar_w * 0.1:.1f}" y="{pad_t + inner_h - h:.1f}" width="{max(bar_w * 0.8, 1):.1f}" '
                     f'height="{h:.1f}" class="bar"><title>{when:%Y-%m-%d %H:%M} UTC: {human(value)} {unit}'
                     f'</title></rect>')
    if points:
        parts.append(f'<text x="{pad_l}" y="{height - 4}" class="axis">{points[0][0]:%b %d %H:%M}</text>'
                     f'<text x="{width - 8}" y="{height - 4}" text-anchor="end" class="axis">'
                     f'{points[-1][0]:%b %d %H:%M} UTC</text>')
    else:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no traffic</text>')
    parts.append("</svg>")
    return "".join(parts)


def meter_bar(used: int, limit: int, *, label: str) -> str:
    """A horizontal gauge of ``used`` against ``limit``."""
    frac = min(used / limit, 1.0) if limit else 0.0
    cls = "meter-fill warn" if frac >= 0.9 else "meter-fill"
    # An SVG rectangle's width attribute, not an inline style: the console's CSP refuses inline styles.
    return (f'<svg class="meter" role="meter" aria-label="{escape(label)}" aria-valuemin="0" '
            f'aria-valuemax="{limit}" aria-valuenow="{used}" viewBox="0 0 100 10" preserveAspectRatio="none">'
            f'<rect class="meter-track" width="100" height="10"></rect>'
            f'<rect class="{cls}" width="{frac * 100:.1f}" height="10"></rect></svg>'
            f'<div class="meter-text">{human(used)} of {human(limit)} tokens ({frac * 100:.1f}%)</div>')
