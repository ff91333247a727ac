"""Small text helpers shared by the report's HTML and SVG pieces.

Every string that comes from a plan (model name, module paths, node names,
notes) is user data: it goes through :func:`esc` before it reaches the page.
"""

from __future__ import annotations

import html

from pipec.units import format_bytes, format_seconds

# Average advance of a 11-12px sans-serif glyph; good enough to decide whether
# a label fits inside a box (it is truncated otherwise, full text in a tooltip).
CHAR_WIDTH = 6.6


def esc(value: object) -> str:
    """``value`` as text safe inside HTML and SVG, attributes included."""
    return html.escape(str(value), quote=True)


def fmt_count(n: float) -> str:
    """``124_439_808`` -> ``'124.4M'``."""
    value = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + "\u00d7".join(str(d) for d in shape) + "]" if shape else "scalar"


def module_span(first: str, last: str) -> str:
    """``'layers.0 … layers.3'``; one name when they agree or one is unknown."""
    names = [n for n in (first, last) if n]
    if len(names) == 2 and names[0] != names[1]:
        return f"{names[0]} \u2026 {names[1]}"
    return names[0] if names else ""


def fmt_ms(seconds: float) -> str:
    """Milliseconds with three significant digits: the unit of the stage table."""
    return f"{seconds * 1e3:.3g}"


def fmt_time(seconds: float) -> str:
    return format_seconds(seconds)


def fmt_bytes(num_bytes: float) -> str:
    return format_bytes(num_bytes)


def fmt_pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def text_width(text: str, char_width: float = CHAR_WIDTH) -> float:
    return len(text) * char_width


def fit_text(text: str, width: float, char_width: float = CHAR_WIDTH) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels ('' if nothing fits)."""
    max_chars = int(width // char_width)
    if len(text) <= max_chars:
        return text
    if max_chars < 3:
        return ""
    return text[: max_chars - 1] + "\u2026"


def ratio_class(ratio: float) -> str:
    """CSS class of a measured/predicted ratio: how far the prediction was off."""
    off = max(ratio, 1 / ratio) if ratio > 0 else float("inf")
    if off <= 1.15:
        return "ratio-good"
    if off <= 1.5:
        return "ratio-warn"
    return "ratio-bad"
