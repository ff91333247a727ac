"""The schedule library (ir, generators, lowering, validator, simulator, torch's CSV).

``pipec.schedule.from_torch_csv`` / ``to_torch_csv`` are imported lazily from
:mod:`pipec.schedule.torch_csv`, so importing ``pipec.schedule.ir`` (plan data)
does not load the rest of the library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipec._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "from_torch_csv": "pipec.schedule.torch_csv",
    "parse_torch_csv": "pipec.schedule.torch_csv",
    "to_torch_csv": "pipec.schedule.torch_csv",
}

if TYPE_CHECKING:
    from pipec.schedule.torch_csv import from_torch_csv as from_torch_csv
    from pipec.schedule.torch_csv import parse_torch_csv as parse_torch_csv
    from pipec.schedule.torch_csv import to_torch_csv as to_torch_csv

__all__ = sorted(_EXPORTS)

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
