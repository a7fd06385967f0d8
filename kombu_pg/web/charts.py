"""Small server-rendered SVG charts (no JavaScript, no build step)."""
from __future__ import annotations

from markupsafe import Markup, escape

#: Line colours per event.
COLOURS = {"published": "#1f77b4", "acked": "#2ca02c", "retried": "#ff7f0e", "dead_lettered": "#d62728"}


def sparkline(history: dict[str, list[int]], width: int = 240, height: int = 48) -> Markup:
    """One polyline per event over the minutes of ``history`` (oldest first), on a shared scale."""
    peak = max((max(values) for values in history.values() if values), default=0) or 1
    points = max((len(values) for values in history.values()), default=0)
    step = width / max(points - 1, 1)
    lines = []
    for event, values in reversed(history.items()):  # the first event drawn last, on top
        coords = " ".join(f"{i * step:.1f},{height - 2 - (v / peak) * (height - 4):.1f}"
                          for i, v in enumerate(values))
        lines.append(f'<polyline fill="none" stroke="{COLOURS.get(event, "#555")}" stroke-width="1.5" '
                     f'points="{coords}"><title>{escape(event)}</title></polyline>')
    label = f"per minute, last {points} minutes; peak {peak}"
    return Markup(f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
                  f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>{"".join(lines)}</svg>')
