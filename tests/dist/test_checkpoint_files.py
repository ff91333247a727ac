"""Checkpoint files in one process: atomic saves, and every bad checkpoint refused with advice.

A one-rank plan (two stages of a tied chain on rank 0) needs no process
group, so these run in the test process: a save that crashes part-way leaves
the previous checkpoint loadable; a missing, incomplete, corrupt or
other-model checkpoint is a ``CheckpointError`` that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _handmade import Chain, chain_plan

import pipec.runtime.checkpoint as checkpoint
from pipec.errors import CheckpointError
from pipec.runtime.checkpoint import plan_fingerprint, read_manifest
from pipec.runtime.runtime import PipelineRuntime
from pipec.schedule.generators import make_schedule


def _pipe(num_blocks: int = 3, dim: int = 8) -> PipelineRuntime:
    torch.manual_seed(0)
    model = Chain(num_blocks, dim=dim, tied=True)
    schedule = make_schedule("interleaved-1f1b", 2, 2, 2)
    return PipelineRuntime(chain_plan(model, schedule, batch=4, bounds=[0, 1, num_blocks], tied=True))


def _train(pipe: PipelineRuntime, optimizer: torch.optim.Optimizer) -> None:
    dim = pipe.plan.data.inputs[0].meta.shape[1]  # type: ignore[union-attr]
    pipe.step(torch.randn(4, dim), target=torch.randn(4, dim))
    optimizer.step()
    optimizer.zero_grad()


def _params(pipe: PipelineRuntime) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.named_parameters()}


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _pipe()
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    _train(pipe, optimizer)
    first = pipe.save_checkpoint(tmp_path, optimizer=optimizer, step=1)
    saved = _params(pipe)
    manifest = read_manifest(first)
    assert (manifest.step, manifest.num_ranks, manifest.plan_fingerprint) == (1, 1, plan_fingerprint(pipe.plan))
    assert set(manifest.ranks[0].files) == {"model.safetensors", "optimizer.safetensors", "optimizer.json",
                                           "rng.safetensors", "rng.json"}
    _train(pipe, optimizer)

    # 1. a rank dies while writing its files (the second safetensors file)
    calls = {"n": 0}
    real_save_file = checkpoint.save_file

    def failing_save_file(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(CheckpointError, match="free space"):
        pipe.save_checkpoint(tmp_path, optimizer=optimizer, step=2)
    monkeypatch.undo()
    assert list((tmp_path / "step_00000002").iterdir()) == []  # its temporary directory is gone
    # 2. rank 0 dies before the manifest (written last); one process: the runtime goes on
    def failing_write(path: Path, text: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "write_atomically", failing_write)
    with pytest.raises(CheckpointError, match="could not commit"):
        pipe.save_checkpoint(tmp_path, optimizer=optimizer, step=3)
    monkeypatch.undo()
    assert (tmp_path / "step_00000003" / "rank0").is_dir()
    with pytest.raises(CheckpointError, match="incomplete"):
        pipe.load_checkpoint(tmp_path / "step_00000003")

    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert pipe.load_checkpoint(tmp_path, optimizer=optimizer) == 1
    for name, value in _params(pipe).items():
        assert torch.equal(value, saved[name]), name
    # a good save with keep=1 clears the incomplete ones and the older one
    pipe.save_checkpoint(tmp_path, optimizer=optimizer, step=4, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004"]


def test_a_bad_checkpoint_is_refused_with_advice(tmp_path: Path) -> None:
    pipe = _pipe()
    with pytest.raises(CheckpointError, match="no checkpoint in .*save one first"):
        pipe.load_checkpoint(tmp_path / "nothing")
    path = pipe.save_checkpoint(tmp_path, step=5)
    assert pipe.load_checkpoint(tmp_path) == 5
    manifest_file = path / "manifest.json"
    good = manifest_file.read_text()

    manifest_file.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        pipe.load_checkpoint(tmp_path)
    manifest_file.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        pipe.load_checkpoint(tmp_path)
    manifest_file.write_text(good)

    model_file = path / "rank0" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum.*load an older checkpoint"):
        pipe.load_checkpoint(tmp_path)

    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        pipe.load_checkpoint(tmp_path)


def test_a_checkpoint_of_another_model_or_optimizer_is_refused(tmp_path: Path) -> None:
    pipe = _pipe(num_blocks=2)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    pipe.save_checkpoint(tmp_path / "small", step=1)
    pipe.save_checkpoint(tmp_path / "with_optimizer", optimizer=optimizer, step=1)
    with pytest.raises(CheckpointError, match=r"lacks 2 tensor\(s\).*another model"):
        _pipe(num_blocks=3).load_checkpoint(tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"shape \(8, 8\) in the checkpoint .* but \(4, 4\) here"):
        _pipe(num_blocks=2, dim=4).load_checkpoint(tmp_path / "small")
    with pytest.raises(CheckpointError, match="no optimizer state"):
        pipe.load_checkpoint(tmp_path / "small", optimizer=optimizer)
    params = list(pipe.parameters())
    two_groups = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    with pytest.raises(CheckpointError, match="param group"):
        pipe.load_checkpoint(tmp_path / "with_optimizer", optimizer=two_groups)
    foreign = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(CheckpointError, match="not one of this pipeline's"):
        pipe.save_checkpoint(tmp_path / "foreign", optimizer=foreign, step=1)
