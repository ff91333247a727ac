"""Phase partition: split a traced, costed graph into pipeline stages.

Layers, each a module: :mod:`~pipec.partitioner.problem` (the chain problem as
plain data), :mod:`~pipec.partitioner.chain` (the one stage-cost function),
:mod:`~pipec.partitioner.search` and :mod:`~pipec.partitioner.algorithm` (the
exact min-max split), :mod:`~pipec.partitioner.baselines`,
:mod:`~pipec.partitioner.graph` and :mod:`~pipec.partitioner.assemble`
(traced graph <-> chain <-> plan data), :mod:`~pipec.partitioner.single`
(one configuration), :mod:`~pipec.partitioner.auto` (the search over
configurations) and :mod:`~pipec.partitioner.api` (what :func:`pipec.partition` runs).
Names are imported lazily.
"""

from __future__ import annotations

from pipec._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "partition_model": "pipec.partitioner.api",
    "partition_traced": "pipec.partitioner.single",
    "plan_from_split": "pipec.partitioner.assemble",
    "ChainProblem": "pipec.partitioner.problem",
    "ChainTensor": "pipec.partitioner.problem",
    "ParamGroup": "pipec.partitioner.problem",
    "ChainSolution": "pipec.partitioner.problem",
    "stage_time": "pipec.partitioner.chain",
    "stage_memory": "pipec.partitioner.chain",
    "evaluate": "pipec.partitioner.chain",
    "solve": "pipec.partitioner.algorithm",
    "STRATEGIES": "pipec.partitioner.algorithm",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
