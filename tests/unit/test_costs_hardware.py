"""Hardware files: the shipped ones load, broken ones say which field is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipec.costs.analytic import load_cost_model
from pipec.costs.hardware import HardwareSpec, cost_models_dir, list_cost_models, load_hardware
from pipec.errors import CostModelError

SHIPPED = ("h100-sxm", "a100-sxm-80gb", "cpu")


def _valid() -> dict[str, Any]:
    return json.loads((cost_models_dir() / "h100-sxm.json").read_text())


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    return path


def test_shipped_files_are_listed() -> None:
    assert set(SHIPPED) <= set(list_cost_models())


@pytest.mark.parametrize("name", list_cost_models())
def test_every_shipped_file_loads_and_cites_its_figures(name: str) -> None:
    spec = load_hardware(name)
    assert spec.name == name
    assert spec.memory_capacity > 0 and spec.memory_bandwidth > 0
    numeric = [f for f, info in HardwareSpec.model_fields.items()
               if info.annotation in (float, int)]
    assert len(numeric) >= 8
    for field in numeric:
        assert field in spec.source, f"{name}: no source for {field}"
    assert load_cost_model(name).memory_capacity == spec.memory_capacity


def test_gpu_files_follow_the_datasheets_ordering() -> None:
    h100, a100 = load_hardware("h100-sxm"), load_hardware("a100-sxm-80gb")
    for spec in (h100, a100):
        assert spec.peak_flops["bf16"] == spec.peak_flops["fp16"] > spec.peak_flops["tf32"] > spec.peak_flops["fp32"]
        assert spec.intra_node_bandwidth > spec.inter_node_bandwidth
        assert spec.gpus_per_node == 8
    assert h100.peak_flops["bf16"] > 3 * a100.peak_flops["bf16"]
    assert "fp8" in h100.peak_flops and "fp8" not in a100.peak_flops


def test_a_path_loads_like_a_name(tmp_path: Path) -> None:
    data = _valid()
    data["name"] = "mine"
    spec = load_hardware(_write(tmp_path, data))
    assert spec.name == "mine" and spec.peak_flops == _valid()["peak_flops"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_bandwidth", -1.0),
        ("gpus_per_node", 0),
        ("intra_node_latency", "fast"),
        ("peak_flops", {"fp33": 1e12}),
        ("peak_flops", {"bf16": 0}),
        ("compute_efficiency", 1.5),
    ],
)
def test_a_broken_field_is_named(tmp_path: Path, field: str, value: Any) -> None:
    data = _valid()
    data[field] = value
    with pytest.raises(CostModelError, match=field):
        load_hardware(_write(tmp_path, data))


def test_missing_and_unknown_fields_are_named(tmp_path: Path) -> None:
    data = _valid()
    del data["inter_node_bandwidth"]
    data["nvlink_gen"] = 4
    with pytest.raises(CostModelError) as info:
        load_hardware(_write(tmp_path, data))
    assert "inter_node_bandwidth" in str(info.value) and "nvlink_gen" in str(info.value)


def test_uncited_figures_are_rejected(tmp_path: Path) -> None:
    data = _valid()
    del data["source"]["memory_bandwidth"]
    with pytest.raises(CostModelError, match="source"):
        load_hardware(_write(tmp_path, data))


def test_bad_json_gives_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hw.json"
    path.write_text('{"name": "x",\n "peak_flops": }')
    with pytest.raises(CostModelError, match="line 2"):
        load_hardware(path)
    path.write_text("[1, 2]")
    with pytest.raises(CostModelError, match="JSON object"):
        load_hardware(path)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(CostModelError) as info:
        load_cost_model("h200-imaginary")
    for name in SHIPPED:
        assert name in str(info.value)
    with pytest.raises(CostModelError, match="does not exist"):
        load_hardware("/nonexistent/dir/hw.json")


def test_overrides_replace_fields_and_are_checked() -> None:
    model = load_cost_model("h100-sxm", memory_capacity="40GiB", gpus_per_node=4, dtype="bf16")
    assert model.memory_capacity == 40 * 2**30
    assert model.spec.gpus_per_node == 4 and model.dtype == "bf16"
    assert model.name == "analytic:h100-sxm:bf16"
    with pytest.raises(CostModelError, match="gpu_count"):
        load_cost_model("h100-sxm", gpu_count=4)
    with pytest.raises(CostModelError, match="gpus_per_node"):
        load_cost_model("h100-sxm", gpus_per_node=-1)
    with pytest.raises(CostModelError, match="fp8"):
        load_cost_model("a100-sxm-80gb", dtype="fp8")


def test_peak_applies_efficiency_and_rejects_unknown_dtypes() -> None:
    spec = load_hardware("h100-sxm")
    assert spec.peak("bf16") == pytest.approx(spec.peak_flops["bf16"] * spec.compute_efficiency)
    with pytest.raises(CostModelError, match="int4"):
        spec.peak("int4")
