"""Server-rendered SVG charts: no JavaScript, no CDN, readable without colour.

The page's CSP refuses inline styles and scripts, so everything here is SVG attributes and classes of
app.css: a bucket's value shows on hover and on keyboard focus through CSS (``.bucket:hover .tip``), and
every bucket also has a ``<title>`` (the browser's tooltip and a screen reader's name). The page puts a
table of the same numbers next to each chart for those who cannot use it at all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

# User units of the viewBox. Narrow, so that text stays legible when a phone draws the chart ~330 px wide
# (a factor of 0.9); two charts side by side on a wide screen draw it about 1.2 times as large.
WIDTH, HEIGHT = 360, 190
PAD_L, PAD_R, PAD_T, PAD_B = 44, 8, 12, 26
FONT = 12


def human(n: float) -> str:
    """600 → "600", 200000 → "200k", 5000000 → "5M"."""
    for div, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= div:
            value = n / div
            return f"{value:.0f}{suffix}" if value == int(value) or value >= 100 else f"{value:.1f}{suffix}"
    return f"{n:.0f}" if n == int(n) else f"{n:.1f}"


def grouped(n: float) -> str:
    """12345 → "12,345": exact figures where a value is read one at a time (hover, tables)."""
    return f"{n:,.0f}"


def ticks(top: float, *, count: int = 4) -> list[int]:
    """Round, whole-number ticks from 0 to at least ``top``: 1, 2 or 5 times a power of ten apart, never
    less than 1 (a count has no 0.5)."""
    if top <= 0:
        return [0, 1]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    step = max(int(step), 1)
    last = math.ceil(top / step) * step
    return list(range(0, last + 1, step))


@dataclass(frozen=True, slots=True)
class Series:
    """One stacked layer of a chart: its name (in the legend and the values) and its CSS class."""

    name: str
    css: str
    values: Sequence[int]


# Where the x axis gets a label: every 15 minutes, 6 hours or 7 days (counted back from the newest bucket).
LABEL_EVERY = {"minute": 15, "hour": 6, "day": 7}


def _x_label(when: datetime, index: int, last: int, granularity: str) -> str | None:
    if granularity == "minute":
        return f"{when:%H:%M}" if when.minute % LABEL_EVERY["minute"] == 0 else None
    if granularity == "hour":
        if when.hour % LABEL_EVERY["hour"]:
            return None
        return f"{when:%b} {when.day}" if when.hour == 0 else f"{when:%H:%M}"
    # Every 7 days up to 35 days; over a longer range a multiple of 7, so that about 5 labels fit.
    every = LABEL_EVERY["day"] * max(1, math.ceil((last + 1) / 35))
    if (last - index) % every:
        return None
    return f"{when:%b} {when.day}"


def bucket_time(when: datetime, granularity: str) -> str:
    """A bucket's start as the charts and tables name it."""
    if granularity == "day":
        return f"{when:%Y-%m-%d}"
    return f"{when:%Y-%m-%d %H:%M}"


def _short_time(when: datetime, granularity: str) -> str:
    """A bucket in a few characters, for its hover box: "20:40", "Dec 7 20:00", "Dec 7"."""
    if granularity == "minute":
        return f"{when:%H:%M}"
    if granularity == "hour":
        return f"{when:%b} {when.day} {when:%H:%M}"
    return f"{when:%b} {when.day}"


def bar_chart(times: Sequence[datetime], layers: Sequence[Series], *, title: str, unit: str,
              granularity: str) -> str:
    """Bars over time as an SVG string: one bar per bucket, ``layers`` stacked (prompt below completion),
    whole-number y ticks, the time on the x axis every few buckets, each bucket's values on hover/focus."""
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    totals = [sum(layer.values[i] for layer in layers) for i in range(len(times))]
    marks = ticks(max(totals, default=0))
    top = marks[-1]
    n = max(len(times), 1)
    slot = inner_w / n
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="group" aria-label="{escape(title)}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for mark in marks:
        y = PAD_T + inner_h * (1 - mark / top)
        parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{PAD_L - 6}" y="{y + FONT / 3:.1f}" text-anchor="end" class="axis">'
                     f'{human(mark)}</text>')
    base = PAD_T + inner_h
    parts.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{base}" y2="{base}" class="baseline"/>')
    tips = []
    for i, when in enumerate(times):
        x = PAD_L + i * slot
        label = _x_label(when, i, len(times) - 1, granularity)
        if label:
            parts.append(f'<line x1="{x + slot / 2:.1f}" x2="{x + slot / 2:.1f}" y1="{base}" y2="{base + 4}" '
                         f'class="tick"/><text x="{x + slot / 2:.1f}" y="{base + 5 + FONT:.1f}" '
                         f'text-anchor="middle" class="axis">{label}</text>')
        value_text = _values_text(layers, i, unit)
        name = f"{bucket_time(when, granularity)} UTC: {value_text}"
        focus = ' tabindex="0"' if totals[i] else ""
        group = [f'<g class="bucket"{focus} aria-label="{escape(name)}"><title>{escape(name)}</title>'
                 f'<rect class="hit" x="{x:.1f}" y="{PAD_T}" width="{slot:.1f}" height="{inner_h}"/>']
        y = base
        for layer in layers:
            h = inner_h * layer.values[i] / top
            if h > 0:
                y -= h
                group.append(f'<rect class="bar {layer.css}" x="{x + slot * 0.12:.1f}" y="{y:.1f}" '
                             f'width="{max(slot * 0.76, 1):.1f}" height="{h:.1f}"/>')
        group.append(_tip(x + slot / 2, f"{_short_time(when, granularity)}: {value_text}", inner_w))
        group.append("</g>")
        tips.append("".join(group))
    # Buckets last, so that a tip is drawn over the axis labels and its neighbours' bars.
    parts.extend(tips)
    parts.append("</svg>")
    return "".join(parts)


def _values_text(layers: Sequence[Series], i: int, unit: str) -> str:
    """"3 requests", "1 request"; "120 prompt + 80 completion tokens"."""
    total = sum(layer.values[i] for layer in layers)
    units = unit if total != 1 else unit.removesuffix("s")
    if len(layers) == 1:
        return f"{grouped(total)} {units}"
    return " + ".join(f"{grouped(layer.values[i])} {layer.name}" for layer in layers) + f" {unit}"


def _tip(center: float, text: str, inner_w: float) -> str:
    """The value box a bucket shows while hovered or focused, kept inside the chart."""
    width = min(len(text) * FONT * 0.58 + 12, inner_w)
    left = min(max(center - width / 2, PAD_L), WIDTH - PAD_R - width)
    return (f'<g class="tip"><rect x="{left:.1f}" y="0" width="{width:.1f}" height="{FONT + 8}" rx="3"/>'
            f'<text x="{left + width / 2:.1f}" y="{FONT + 2}" text-anchor="middle">{escape(text)}</text></g>')


def meter_bar(used: int, limit: int, *, label: str) -> str:
    """A horizontal gauge of ``used`` against ``limit``."""
    frac = min(used / limit, 1.0) if limit else 0.0
    cls = "meter-fill warn" if frac >= 0.9 else "meter-fill"
    # An SVG rectangle's width attribute, not an inline style: the console's CSP refuses inline styles.
    return (f'<svg class="meter" role="meter" aria-label="{escape(label)}" aria-valuemin="0" '
            f'aria-valuemax="{limit}" aria-valuenow="{used}" viewBox="0 0 100 10" preserveAspectRatio="none">'
            f'<rect class="meter-track" width="100" height="10"></rect>'
            f'<rect class="{cls}" width="{frac * 100:.1f}" height="10"></rect></svg>'
            f'<div class="meter-text">{human(used)} of {human(limit)} tokens ({percent(used, limit)})</div>')


def percent(used: int, limit: int) -> str:
    """"12.5%"; a little use is "<0.1%", not "0.0%" (which reads as none)."""
    share = used / limit * 100 if limit else 0.0
    return "<0.1%" if 0 < share < 0.1 else f"{share:.1f}%"
