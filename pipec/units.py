"""Units: seconds (float) and bytes (int) everywhere; parsing and printing them."""

from __future__ import annotations

import math
import re

from pipec.errors import ConfigError

_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, *, what: str = "memory_limit") -> int:
    """Parse ``80GiB``, ``80GB``, ``1.5e9`` or a number of bytes into an int.

    Raises :class:`ConfigError` naming ``what`` when the value is not a size of
    at least one byte.
    """
    fix = "pass e.g. 80e9 or '80GiB'"
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as 80GiB or a number of bytes, found {value!r}; {fix}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            raise ConfigError(f"{what}: expected a positive size in bytes (at least 1), found {value!r}; {fix}")
        return int(value)
    if isinstance(value, str):
        m = _BYTES_RE.match(value)
        if m is not None:
            unit = m.group(2).lower()
            if unit in _BYTE_UNITS:
                number = float(m.group(1)) * _BYTE_UNITS[unit]
                if math.isfinite(number) and number >= 1:
                    return int(number)
                raise ConfigError(
                    f"{what}: expected a size of at least one byte, found {value!r}; {fix}"
                )
        sign = "a size cannot be negative; " if value.strip().startswith("-") else ""
        units = ", ".join(u for u in _BYTE_UNITS if u)
        raise ConfigError(
            f"{what}: cannot read {value!r} as a size; {sign}expected a number with a unit "
            f"({units}; case does not matter). Write e.g. '80GiB', '80GB', '512MiB' "
            "or a plain number of bytes"
        )
    raise ConfigError(
        f"{what}: expected a size such as '80GiB' or a number of bytes, "
        f"found {type(value).__name__}; {fix}"
    )


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float) -> str:
    """Human time with a unit that keeps three significant digits."""
    s = float(seconds)
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e9:.3g} ns"
