"""Phase split: stage modules chained reproduce the model; parameters keep their FQNs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import ZOO, TiedLM, example
from torch import nn

import pipec
from pipec.errors import ConfigError, PlanError
from pipec.facade import Plan
from pipec.plan import Boundary, InputSpec, PlanData, StageInfo, TiedGroup
from pipec.schedule.ir import Action, ActionKind, Schedule
from pipec.split import StageModule, merge_state_dicts, split_state_dict
from pipec.types import NodeCost, TensorMeta, TracedGraph

# -- helpers shared with test_codegen_*.py ---------------------------------------------


def manual_plan(traced: TracedGraph, num_stages: int, cuts: list[int] | None = None) -> Plan:
    """A plan cutting the compute nodes into contiguous chunks at ``cuts`` (node
    positions; equal chunks by default), with boundaries worked out here
    independently of pipec's partitioner."""
    compute = [n for n in traced.nodes if n.op not in ("placeholder", "get_attr", "output")]
    if cuts is None:
        cuts = [round(len(compute) * k / num_stages) for k in range(1, num_stages)]
    edges = [0, *cuts, len(compute)]
    stage_of = {n.name: s for s in range(num_stages) for n in compute[edges[s]:edges[s + 1]]}
    consumers: dict[str, set[int]] = {}
    sizes = {n.name for n in traced.nodes if n.is_size}  # sizes of the inputs' shapes: each stage makes its own
    for n in traced.nodes:
        me = num_stages - 1 if n.op == "output" else stage_of.get(n.name)
        for i in n.inputs if me is not None and n.name not in sizes else ():
            if i in stage_of and stage_of[i] != me and i not in sizes:
                consumers.setdefault(i, set()).add(me)
    order = [n.name for n in traced.nodes]
    boundaries = []
    for name in sorted(consumers, key=order.index):
        meta = traced.node(name).outputs[0]
        boundaries.append(Boundary(name=name, producer_stage=stage_of[name],
                                   consumer_stages=tuple(sorted(consumers[name])),
                                   shape=meta.shape, dtype=meta.dtype, num_bytes=meta.num_bytes))
    tied = []
    for fqn, info in traced.params.items():
        users = sorted({stage_of[u] for u in info.users if u in stage_of})
        if len(users) > 1:
            tied.append(TiedGroup(fqn=fqn, aliases=info.aliases, stages=tuple(users), num_bytes=info.num_bytes))
    zero = NodeCost(forward_time=0.0, input_grad_time=0.0, weight_grad_time=0.0)
    data = PlanData(
        model_name=traced.model_name, trace_method=traced.method, num_stages=num_stages,
        num_ranks=num_stages, stages_per_rank=1, num_microbatches=1, strategy="manual",
        cost_model="none",
        schedule=Schedule(name="gpipe", num_stages=num_stages, num_microbatches=1,
                          actions=tuple((Action(s, ActionKind.F, 0), Action(s, ActionKind.B, 0))
                                        for s in range(num_stages))),
        stages=tuple(
            StageInfo(index=s, rank=s, nodes=tuple(n.name for n in compute[edges[s]:edges[s + 1]]),
                      num_params=0, param_bytes=0, forward_time=0.0, backward_time=0.0,
                      comm_time=0.0, memory_bytes=0)
            for s in range(num_stages)),
        boundaries=tuple(boundaries), node_costs={n.name: zero for n in traced.nodes},
        tied_groups=tuple(tied),
        inputs=tuple(InputSpec(name=n, meta=TensorMeta.of(v) if isinstance(v, torch.Tensor) else None)
                     for n, v in zip(traced.input_names, traced.example_inputs)),
        bottleneck=0.0, lower_bound=0.0)
    return Plan(data, traced=traced)


def run_chain(plan: Plan, flat_inputs: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
    """Run every stage in order, feeding boundary tensors by name; (output, all values)."""
    values: dict[str, Any] = dict(zip((i.name for i in plan.data.inputs), flat_inputs))
    out: Any = None
    for k in range(plan.num_stages):
        stage = plan.stage_module(k)
        result = stage(*[values[n] for n in stage.input_names])
        assert isinstance(result, tuple)
        assert len(result) == len(stage.output_names) + (1 if stage.is_last else 0)
        values.update(zip(stage.output_names, result))
        if stage.is_last:
            out = result[-1]
    return out, values


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "keys"):
        return [t for k in value.keys() for t in tensors_of(value[k])]  # noqa: SIM118
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def assert_same_output(got: Any, expected: Any) -> None:
    exp, out = tensors_of(expected), tensors_of(got)
    assert len(exp) == len(out) > 0
    for e, g in zip(exp, out):
        torch.testing.assert_close(g, e)


def traced_plan(name: str, num_stages: int, method: str = "auto") -> tuple[nn.Module, tuple[Any, ...], Plan]:
    model, inputs = example(name)
    return model, inputs, manual_plan(pipec.trace(model, inputs, method=method), num_stages)


# -- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_stages", [2, 3])
@pytest.mark.parametrize("name", ZOO)
def test_chained_stages_reproduce_the_model(name: str, num_stages: int) -> None:
    model, inputs, plan = traced_plan(name, num_stages)
    assert plan.traced is not None
    got, _ = run_chain(plan, plan.traced.flatten_inputs(inputs))
    with torch.no_grad():
        assert_same_output(got, model(*inputs))
    model_keys = set(model.state_dict())
    for k in range(num_stages):
        stage = plan.stage_module(k)
        assert isinstance(stage, StageModule) and stage.index == k
        keys = set(stage.state_dict())
        assert keys <= model_keys, keys - model_keys
        assert stage.input_names[: len(stage.graph_input_names)] == stage.graph_input_names
        assert set(stage.graph_input_names) <= set(plan.traced.input_names)
        for n in stage.boundary_input_names + stage.output_names:
            meta = plan.traced.node(n).outputs[0]
            assert not stage.requires_grad[n] or meta.is_floating
    merged = merge_state_dicts((plan.stage_module(k).state_dict() for k in range(num_stages)), plan=plan)
    assert set(merged) == model_keys  # every tensor of the model lives on some stage


@pytest.mark.parametrize("method", ["fx", "export"])
def test_tied_head_stage_holds_the_canonical_name(method: str) -> None:
    model, inputs, plan = traced_plan("tied", 2, method=method)
    first, last = plan.stage_module(0), plan.stage_module(1)
    for stage in (first, last):
        names = [n for n, _ in stage.named_parameters()]
        assert "embed.weight" in names and "head.weight" not in names
        assert "head.weight" not in stage.state_dict()
    assert last.aliases == {"embed.weight": ("head.weight",)}
    assert first.embed.weight.data_ptr() != last.embed.weight.data_ptr()  # own copies


@pytest.mark.parametrize("name", ["tied", "gpt2", "unet", "two_input"])
def test_merged_state_dict_loads_into_the_original_model(name: str) -> None:
    model, inputs, plan = traced_plan(name, 3)
    merged = merge_state_dicts((plan.stage_module(k).state_dict() for k in range(3)), plan=plan)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(merged, strict=True)
    with torch.no_grad():
        assert_same_output(fresh(*inputs), model(*inputs))


def test_merge_refuses_conflicting_copies() -> None:
    _, _, plan = traced_plan("tied", 2)
    a, b = plan.stage_module(0).state_dict(), dict(plan.stage_module(1).state_dict())
    b["embed.weight"] = b["embed.weight"] + 1
    with pytest.raises(PlanError, match="embed.weight"):
        merge_state_dicts([a, b])


def test_split_state_dict_is_the_inverse_of_merge() -> None:
    model, _, plan = traced_plan("tied", 3)
    full = model.state_dict()
    for k in range(3):
        part = split_state_dict(full, plan, k)
        assert part.keys() == plan.stage_module(k).state_dict().keys()
        plan.stage_module(k).load_state_dict(part, strict=True)
    only_alias = {("head.weight" if k == "embed.weight" else k): v for k, v in full.items()}
    assert "embed.weight" in split_state_dict(only_alias, plan, 0)
    with pytest.raises(PlanError, match="lacks"):
        split_state_dict({}, plan, 0)


def test_unet_skip_goes_straight_to_its_consumer() -> None:
    model, inputs, plan = traced_plan("unet", 4, method="fx")
    skips = [b for b in plan.boundaries if b.producer_stage == 0 and 3 in b.consumer_stages]
    assert skips, "expected an encoder output of stage 0 read by the last decoder block"
    for b in skips:
        assert b.name in plan.stage_module(3).input_names
        assert b.name in plan.stage_module(0).output_names
        for k in (1, 2):
            if k not in b.consumer_stages:
                assert b.name not in plan.stage_module(k).input_names
    got, _ = run_chain(plan, (inputs[0],))
    with torch.no_grad():
        torch.testing.assert_close(got, model(*inputs))


def test_stage_creates_its_tensors_on_its_own_device() -> None:
    # torch.export bakes device=cpu into arange/to; a stage moved elsewhere must follow
    _, inputs, plan = traced_plan("gpt2", 2)
    stage = copy.deepcopy(plan.stage_module(0)).to("meta")
    outs = stage(inputs[0].to("meta"))
    assert outs and all(o.device.type == "meta" for o in outs)


def test_deepcopy_keeps_the_contract() -> None:
    _, _, plan = traced_plan("tied", 2)
    stage = plan.stage_module(1)
    twin = copy.deepcopy(stage)
    assert isinstance(twin, StageModule) and type(twin).__name__ == "Stage1"
    assert (twin.index, twin.input_names, twin.is_last, twin.aliases) == (1, stage.input_names, True, stage.aliases)
    assert twin.state_dict().keys() == stage.state_dict().keys()


def test_masks_carry_no_gradient() -> None:
    _, _, plan = traced_plan("gpt2", 2)
    flags = {n: plan.stage_module(1).requires_grad[n] for n in plan.stage_module(1).boundary_input_names}
    dtypes = {b.name: b.dtype for b in plan.boundaries}
    assert any(not TensorMeta(shape=(), dtype=dtypes[n], num_bytes=0).is_floating for n in flags)
    for n, flag in flags.items():
        assert flag == TensorMeta(shape=(), dtype=dtypes[n], num_bytes=0).is_floating


@pytest.mark.parametrize("method", ["fx", "export"])
def test_gradients_through_the_chain_match_the_model(method: str) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 64, (3, 5))
    plan = manual_plan(pipec.trace(model, (tokens,), method=method), 3)
    model(tokens).square().mean().backward()
    out, _ = run_chain(plan, (tokens,))
    out.square().mean().backward()
    grads: dict[str, torch.Tensor] = {}
    for k in range(3):
        for n, p in plan.stage_module(k).named_parameters():
            assert p.grad is not None, n
            grads[n] = grads[n] + p.grad if n in grads else p.grad  # tied: sum over stages
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(grads[n], p.grad)


def test_untraceable_leaf_module_is_traced_with_export() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    plan = manual_plan(pipec.trace(model, (x,), method="fx"), 2)
    assert not any(n.op == "call_module" for k in range(2) for n in plan.stage_module(k).graph.nodes)
    got, _ = run_chain(plan, (x,))
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))
    merged = merge_state_dicts([plan.stage_module(k).state_dict() for k in range(2)], plan=plan)
    assert merged.keys() == model.state_dict().keys()


class _Buffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("shift", torch.arange(4.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale + self.shift


def test_non_persistent_buffers_stay_out_of_the_state_dict() -> None:
    model = _Buffers()
    x = torch.randn(3, 4)
    plan = manual_plan(pipec.trace(model, (x,), method="export"), 2)
    names = {n for k in range(2) for n, _ in plan.stage_module(k).named_buffers()}
    assert {"scale", "shift"} <= names
    merged = merge_state_dicts([plan.stage_module(k).state_dict() for k in range(2)], plan=plan)
    assert "shift" not in merged
    model.load_state_dict(merged, strict=True)
    got, _ = run_chain(plan, (x,))
    torch.testing.assert_close(got, model(x))


def test_bad_index_and_inconsistent_plans_are_refused() -> None:
    _, _, plan = traced_plan("mlp", 2)
    with pytest.raises(ConfigError, match="0..1"):
        plan.stage_module(2)
    broken = Plan(plan.data.model_copy(update={"boundaries": ()}), traced=plan.traced)
    with pytest.raises(PlanError, match="boundaries"):
        broken.stage_module(1)
    no_source = Plan(plan.data)
    with pytest.raises(PlanError, match="pipec.load"):
        no_source.stage_module(0)


def test_output_falls_back_to_plain_containers_when_its_type_is_unknown() -> None:
    from pipec.split import rebuild_output

    unknown = '[1, {"type": "nowhere.Missing", "context": "[\\"logits\\"]", "children_spec": [{"type": null, "context": null, "children_spec": []}]}]'
    plain = '[1, {"type": "builtins.dict", "context": "[\\"logits\\"]", "children_spec": [{"type": null, "context": null, "children_spec": []}]}]'
    x = torch.ones(2)
    assert rebuild_output(unknown, plain, [x]) == {"logits": x}
    assert rebuild_output("not json", None, [x]) == (x,)
