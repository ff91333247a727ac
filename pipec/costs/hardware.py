"""Hardware descriptions: the JSON files in ``cost_models/`` and how to load them.

Phase: cost model (planner side; runs on a laptop with no GPU).

Input: a name of a shipped file (``"h100-sxm"``, ``"a100-sxm-80gb"``, ``"cpu"``)
or a path to a JSON file written by hand or by ``pipec calibrate``.
Output: a validated :class:`HardwareSpec`, or an
:class:`~pipec.costs.analytic.AnalyticCostModel` built on one
(:func:`pipec.costs.analytic.load_cost_model`).

Every figure in a file is in base units -- FLOP/s, bytes/s, bytes, seconds --
and the file's ``source`` maps each field to where its figure comes from
(a datasheet, a paper, or a calibration run), so a reader can check it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from pipec.costs.ring import ring_allreduce_time
from pipec.errors import CostModelError
from pipec.types import FrozenModel, RuntimeOverhead
from pipec.units import parse_bytes

#: dtype names a ``peak_flops`` table may use, and the torch dtypes they stand for.
DTYPE_NAMES: dict[str, str] = {
    "fp64": "float64",
    "fp32": "float32",
    "tf32": "float32",  # fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32)
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp8": "float8_e4m3fn",
    "int8": "int8",
}


class HardwareSpec(FrozenModel):
    """One device model (per GPU, or per CPU process) and its links.

    ``peak_flops`` holds dense (no structured sparsity) peak FLOP/s per dtype
    name (keys from :data:`DTYPE_NAMES`). Link figures are per direction, per
    device. ``gpus_per_node`` decides which link a transfer uses: ranks ``r``
    and ``s`` share a node when ``r // gpus_per_node == s // gpus_per_node``.
    The efficiency factors scale the peaks to what kernels reach in practice.
    """

    name: str = Field(min_length=1)
    description: str = ""
    peak_flops: dict[str, float]
    memory_bandwidth: float = Field(gt=0)  # bytes/s
    memory_capacity: int = Field(gt=0)  # bytes
    gpus_per_node: int = Field(ge=1)
    intra_node_bandwidth: float = Field(gt=0)  # bytes/s per direction
    intra_node_latency: float = Field(ge=0)  # seconds
    inter_node_bandwidth: float = Field(gt=0)  # bytes/s per direction
    inter_node_latency: float = Field(ge=0)  # seconds
    kernel_launch_overhead: float = Field(ge=0)  # seconds per kernel
    # bytes/s: bus bandwidth of an all-reduce within a node (nccl-tests' busbw,
    # 2 (n - 1) / n * bytes / time); None = intra_node_bandwidth (an ideal ring)
    allreduce_bandwidth: float | None = Field(default=None, gt=0)
    compute_efficiency: float = Field(default=1.0, gt=0, le=1)
    memory_efficiency: float = Field(default=1.0, gt=0, le=1)
    device_match: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name()
    # per action and per step, what the stage runtime adds to compute and transfers
    # (pipec calibrate measures it; None: nothing added, as before it was measured)
    runtime_overhead: RuntimeOverhead | None = None
    source: dict[str, str]

    @field_validator("peak_flops")
    @classmethod
    def _check_peak_flops(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("needs at least one dtype, e.g. {\"fp32\": 6.7e13}")
        for key, flops in value.items():
            if key not in DTYPE_NAMES:
                raise ValueError(f"unknown dtype {key!r}; use one of {sorted(DTYPE_NAMES)}")
            if not flops > 0:
                raise ValueError(f"peak for {key!r} must be a positive FLOP/s, found {flops!r}")
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> HardwareSpec:
        cited = {"peak_flops", "memory_bandwidth", "memory_capacity"}
        missing = sorted(cited - set(self.source))
        if missing:
            raise ValueError(
                f"source must cite where each figure comes from; missing {missing}"
            )
        return self

    def peak(self, dtype: str) -> float:
        """Achievable FLOP/s for ``dtype`` (a key of ``peak_flops``) after efficiency."""
        if dtype not in self.peak_flops:
            raise CostModelError(
                f"hardware {self.name!r} has no peak FLOP/s for {dtype!r} "
                f"(it lists {sorted(self.peak_flops)}); pick one of those or add it to the file"
            )
        return self.peak_flops[dtype] * self.compute_efficiency

    @property
    def devices_per_node(self) -> int:
        """Ranks per node (the file's ``gpus_per_node``; CPU processes count as devices)."""
        return self.gpus_per_node

    @property
    def effective_memory_bandwidth(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    def link(self, src_rank: int, dst_rank: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of the link between two ranks."""
        if src_rank // self.gpus_per_node == dst_rank // self.gpus_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency

    def link_time(
        self,
        num_bytes: int,
        src_rank: int,
        dst_rank: int,
        *,
        link_bandwidth: float | None = None,
        link_latency: float | None = None,
        efficiency: float = 1.0,
    ) -> float:
        """Seconds to move ``num_bytes`` from ``src_rank`` to ``dst_rank``: ``latency +
        num_bytes / (bandwidth * efficiency)`` over their link (the alpha-beta model),
        0 on the same rank. The one formula of a transfer: every cost model's
        ``comm_time`` and every step of :meth:`allreduce_time` are this.
        ``link_bandwidth`` / ``link_latency`` replace the link's figures (a profiled
        cost model's overrides)."""
        if src_rank == dst_rank:
            return 0.0
        bandwidth, latency = self.link(src_rank, dst_rank)
        if link_bandwidth is not None:
            bandwidth = link_bandwidth
        if link_latency is not None:
            latency = link_latency
        return latency + num_bytes / (bandwidth * efficiency)

    @property
    def allreduce_efficiency(self) -> float:
        """What an all-reduce's bus bandwidth reaches of a point-to-point link's
        (``allreduce_bandwidth / intra_node_bandwidth``, at most 1; 1 when not given)."""
        if self.allreduce_bandwidth is None:
            return 1.0
        return min(1.0, self.allreduce_bandwidth / self.intra_node_bandwidth)

    def allreduce_time(
        self,
        num_bytes: int,
        ranks: Sequence[int],
        *,
        link_bandwidth: float | None = None,
        link_latency: float | None = None,
    ) -> float:
        """Seconds for a ring all-reduce of ``num_bytes`` among ``ranks``
        (:func:`pipec.costs.ring.ring_allreduce_time`), each link at
        :attr:`allreduce_efficiency` of its bandwidth: ``2 (n - 1) * (latency +
        num_bytes / n / bus_bandwidth)`` on the ring's slowest link.
        ``link_bandwidth`` / ``link_latency`` replace every link's figures (a
        profiled cost model's overrides). 0 for fewer than two ranks.
        """
        if num_bytes < 0 or any(r < 0 for r in ranks):
            raise CostModelError(
                f"allreduce_time: expected num_bytes >= 0 and ranks >= 0, found num_bytes={num_bytes}, "
                f"ranks={list(ranks)}"
            )
        efficiency = self.allreduce_efficiency

        def step(chunk: int, src: int, dst: int) -> float:
            return self.link_time(chunk, src, dst, link_bandwidth=link_bandwidth, link_latency=link_latency,
                                  efficiency=efficiency)

        return ring_allreduce_time(step, num_bytes, ranks)


def cost_models_dir() -> Path:
    """The shipped hardware files: ``pipec/cost_models/``, package data in the wheel
    (the repository's top-level ``cost_models/`` is a link to it)."""
    return Path(__file__).resolve().parents[1] / "cost_models"


def list_cost_models() -> list[str]:
    """Names of the hardware files shipped in ``cost_models/``, sorted."""
    folder = cost_models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def _resolve(name_or_path: str | Path) -> Path:
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise CostModelError(
            f"cost model: expected a shipped name such as 'h100-sxm' or a path to a JSON file, "
            f"found {name_or_path!r}; pass one of {list_cost_models()} or a path"
        )
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".json") or "/" in text
    if looks_like_path or path.is_file():
        if path.is_dir():
            raise CostModelError(
                f"hardware file {text!r} is a directory; pass the path of a JSON file in it "
                f"or one of the shipped names {list_cost_models()}"
            )
        if not path.is_file():
            raise CostModelError(
                f"hardware file {text!r} does not exist; pass a path to a JSON file "
                f"or one of the shipped names {list_cost_models()}"
            )
        return path
    candidate = cost_models_dir() / f"{text}.json"
    if not candidate.is_file():
        raise CostModelError(
            f"unknown cost model {text!r}; known ones are {list_cost_models()} "
            "(files in cost_models/), or pass a path to a JSON file, "
            "or write one for this machine with `pipec calibrate -o cost_models/NAME.json`"
        )
    return candidate


def _validation_message(where: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(file)"
        found = item.get("input")
        shown = repr(found) if not isinstance(found, dict) else "{...}"
        lines.append(f"  field {loc!r}: {item['msg']} (found {shown})")
    return (
        f"invalid hardware description {where}:\n" + "\n".join(lines) + "\n"
        "Fix these fields; see cost_models/h100-sxm.json for a complete example."
    )


def spec_from_dict(data: dict[str, Any], *, where: str = "(in memory)") -> HardwareSpec:
    """Validate a mapping as a :class:`HardwareSpec`; CostModelError names bad fields."""
    data = dict(data)
    if isinstance(data.get("memory_capacity"), str):
        data["memory_capacity"] = parse_bytes(data["memory_capacity"], what="memory_capacity")
    try:
        return HardwareSpec.model_validate(data)
    except ValidationError as err:
        raise CostModelError(_validation_message(where, err)) from None


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """Read a hardware file by shipped name or by path."""
    path = _resolve(name_or_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CostModelError(f"cannot read hardware file {str(path)!r}: {err}") from None
    except json.JSONDecodeError as err:
        raise CostModelError(
            f"hardware file {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno} "
            f"column {err.colno}; fix the syntax there"
        ) from None
    if not isinstance(data, dict):
        raise CostModelError(
            f"hardware file {str(path)!r} must hold a JSON object, found {type(data).__name__}"
        )
    return spec_from_dict(data, where=repr(str(path)))


__all__ = [
    "DTYPE_NAMES",
    "HardwareSpec",
    "cost_models_dir",
    "list_cost_models",
    "load_hardware",
    "spec_from_dict",
]
