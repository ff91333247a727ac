"""pipec calibrate --quick: measures this machine (two Gloo processes) and writes a loadable file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipec
from pipec.errors import ConfigError, ProfileError
from pipec.runtime.calibrate import calibrate
from pipec.runtime.p2p_bench import measure_p2p


@pytest.mark.timeout(240)
def test_quick_calibration_writes_a_loadable_file(tmp_path: Path) -> None:
    out = tmp_path / "this-box.json"
    spec = calibrate(out, quick=True)
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))  # renamed into place
    model = pipec.load_cost_model(str(out))
    assert model.spec == spec and spec.name == "this-box"
    assert spec.peak_flops["fp32"] > 1e8  # any machine multiplies 100 MFLOP/s
    assert spec.memory_bandwidth > 1e8 and spec.intra_node_bandwidth > 1e6
    assert 0 < spec.intra_node_latency < 0.1 and 0 < spec.kernel_launch_overhead < 1e-3
    data = json.loads(out.read_text())
    assert "calibrate" in data["source"]["peak_flops"]
    assert spec.allreduce_bandwidth is not None and spec.allreduce_bandwidth > 0
    assert "all-reduce" in data["source"]["allreduce_bandwidth"]
    # the runtime's own cost per action kind and step, which plans carry and the simulator adds
    o = spec.runtime_overhead
    assert o is not None and "PipelineRuntime" in data["source"]["runtime_overhead"]
    assert all(0 < t < 0.1 for t in (o.forward, o.backward, o.input_grad, o.send, o.step))
    assert 0 <= o.weight_grad < 0.1 and 0 <= o.recv < 0.1 and 0 <= o.split_per_param_node < 0.1
    # overwrite in place, with another name
    calibrate(out, name="renamed", quick=True)
    assert pipec.load_cost_model(str(out)).spec.name == "renamed"


@pytest.mark.timeout(60)
def test_p2p_bandwidth_grows_with_message_size() -> None:
    big = 16 << 20
    result = measure_p2p(backend="gloo", sizes=(4, big), iters=5, timeout=45)
    assert result.one_way_time[big] > result.one_way_time[4] > 0
    assert result.latency == result.one_way_time[4]
    # the all-reduce of the largest buffer (float32), and its bus bandwidth
    assert result.allreduce_bytes == big and result.allreduce_time is not None and result.allreduce_time > 0
    assert result.allreduce_bandwidth == pytest.approx(
        big / max(result.allreduce_time - 2 * result.latency, result.allreduce_time * 1e-3))


def test_calibrate_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=".json"):
        calibrate(tmp_path / "x.txt", quick=True)
    with pytest.raises(ConfigError, match="does not exist"):
        calibrate(tmp_path / "missing" / "x.json", quick=True)
    with pytest.raises(ProfileError, match="nccl"):
        measure_p2p(backend="nccl" if not _two_gpus() else "mpi")


def _two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2
