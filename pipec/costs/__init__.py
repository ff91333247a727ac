"""Cost models: what a node costs and what a transfer between ranks costs.

Phase: cost model. :class:`ProfiledCostModel` uses a measured
:class:`pipec.profiling.Profile`; :class:`AnalyticCostModel` is a roofline
over a hardware description from ``cost_models/*.json``
(:func:`load_cost_model`, :func:`load_hardware`, :func:`list_cost_models`);
:func:`calibrate` writes such a file for this machine.

Names are imported lazily, so reading a hardware file does not import the
profiler.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AnalyticCostModel": "pipec.costs.analytic",
    "ProfiledCostModel": "pipec.costs.profiled",
    "HardwareSpec": "pipec.costs.hardware",
    "load_cost_model": "pipec.costs.hardware",
    "load_hardware": "pipec.costs.hardware",
    "list_cost_models": "pipec.costs.hardware",
    "calibrate": "pipec.costs.calibrate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipec.costs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
