"""Cost models: what a node costs and what a transfer between ranks costs.

Phase: cost model. :class:`ProfiledCostModel` uses a measured
:class:`pipec.profiling.Profile`; :class:`AnalyticCostModel` is a roofline
over a hardware description from ``cost_models/*.json``
(:func:`load_cost_model`, :func:`load_hardware`, :func:`list_cost_models`);
:func:`pipec.runtime.calibrate.calibrate` (``pipec calibrate``) writes such a
file for this machine.

Names are imported lazily, so reading a hardware file does not import the
profiler.
"""

from __future__ import annotations

from pipec._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AnalyticCostModel": "pipec.costs.analytic",
    "ProfiledCostModel": "pipec.costs.profiled",
    "HardwareSpec": "pipec.costs.hardware",
    "load_cost_model": "pipec.costs.analytic",
    "load_hardware": "pipec.costs.hardware",
    "list_cost_models": "pipec.costs.hardware",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
