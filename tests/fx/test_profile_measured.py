"""pipec.profile on small models: every node costed, I/W split measured, memory counted."""

from __future__ import annotations

import models
import pytest
import torch
from torch import nn

import pipec
from pipec.costs.profiled import ProfiledCostModel
from pipec.errors import CostModelError, ProfileError
from pipec.profiling import Profile, split_backward

FREE = ("placeholder", "get_attr", "output")


@pytest.fixture(scope="module")
def mlp() -> tuple[pipec.TracedGraph, Profile]:
    # wide enough that each matmul takes ~1 ms: timer noise cannot fake a fused I/W
    torch.manual_seed(0)
    model, inputs = models.MLP((256, 512, 512, 512, 512, 256)), (torch.randn(256, 256),)
    traced = pipec.trace(model, inputs, method="fx")
    return traced, pipec.profile(traced, repeats=3, warmup=1, progress=False)


def test_every_node_has_a_non_negative_cost(mlp: tuple[pipec.TracedGraph, Profile]) -> None:
    traced, prof = mlp
    assert list(prof.nodes) == [n.name for n in traced.nodes]
    for info in traced.nodes:
        cost = prof.nodes[info.name]
        assert min(cost.forward_time, cost.input_grad_time, cost.weight_grad_time) >= 0
        assert cost.output_bytes == info.output_bytes and cost.param_bytes == info.param_bytes
        if info.op in FREE:
            assert cost.total_time == 0.0
    compute = [n for n in traced.nodes if n.op not in FREE]
    assert all(prof.nodes[n.name].forward_time > 0 for n in compute if "layers" in n.target)
    assert prof.forward_time > 0 and prof.forward_backward_time > prof.forward_time
    assert prof.device == "cpu" and prof.repeats == 3 and prof.torch_version == torch.__version__


def test_linear_has_measured_input_and_weight_grads(mlp: tuple[pipec.TracedGraph, Profile]) -> None:
    traced, prof = mlp
    linears = [n for n in traced.nodes if n.op == "call_module" and n.param_bytes > 0]
    assert len(linears) == 5
    first, rest = linears[0], linears[1:]
    # the first layer's input is the micro-batch: no gradient is needed for it
    assert prof.nodes[first.name].input_grad_time == 0.0 and prof.nodes[first.name].weight_grad_time > 0
    for info in rest:
        cost = prof.nodes[info.name]
        assert cost.input_grad_time > 0 and cost.weight_grad_time > 0
    # a Linear computes I and W in two matmuls, so asked for apart they add up to its
    # backward: measured, not derived (split_backward's rule, checked on exact times in
    # test_fused_backward_rule). A loaded machine can slow one sample enough to look
    # fused, so a derived split is measured again, with more repeats, before it fails.
    derived = [n.name for n in rest if prof.nodes[n.name].derived]
    for _ in range(2):
        if not derived:
            break
        prof = pipec.profile(traced, repeats=7, warmup=1, progress=False)
        derived = [n.name for n in rest if prof.nodes[n.name].derived]
    assert not derived, f"Linear I/W split looks fused in three profiles: {derived}"


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # separate kernels: I + W = B, kept as measured
        ((0.6e-3, 0.4e-3, 1.0e-3), (0.6e-3, 0.4e-3, False)),
        # I + W up to 1.3 B is noise, not fusion
        ((0.7e-3, 0.6e-3, 1.0e-3), (0.7e-3, 0.6e-3, False)),
        # one fused kernel: each half paid for it all; scaled to B in the measured 3:1 proportion
        ((0.9e-3, 0.3e-3, 0.6e-3), (0.45e-3, 0.15e-3, True)),
        # past 1.3 B but within the timer's noise: tiny ops stay as measured
        ((3e-6, 3e-6, 2e-6), (3e-6, 3e-6, False)),
    ],
)
def test_fused_backward_rule(times: tuple[float, float, float], expected: tuple[float, float, bool]) -> None:
    input_grad, weight_grad, derived = split_backward(*times, noise=1e-5)
    assert (input_grad, weight_grad) == pytest.approx(expected[:2]) and derived is expected[2]


def test_relu_has_no_weight_grad_and_saves_its_output(mlp: tuple[pipec.TracedGraph, Profile]) -> None:
    traced, prof = mlp
    relus = [n for n in traced.nodes if n.op == "call_module" and n.param_bytes == 0]
    assert relus
    for info in relus:
        cost = prof.nodes[info.name]
        assert cost.weight_grad_time == 0.0 and cost.input_grad_time > 0
        # ReLU saves its output (and the next Linear its input: the same storage, counted once)
        assert cost.saved_bytes == info.output_bytes
    # Linear layers save only their input (owned by the producer) and the weight (a parameter)
    linears = [n for n in traced.nodes if n.op == "call_module" and n.param_bytes > 0]
    assert all(prof.nodes[n.name].saved_bytes == 0 for n in linears[:-1])
    assert prof.nodes["x"].saved_bytes == 0  # the micro-batch is held anyway


def test_function_nodes_reading_params_get_weight_grads() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 16))
            self.weight = nn.Parameter(torch.randn(32, 16))
            self.scale = nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.linear(torch.sin(x), self.w1)
            return torch.tanh(nn.functional.linear(h, self.weight)) * self.scale

    traced = pipec.trace(Functional(), (torch.randn(8, 16),), method="fx")
    prof = pipec.profile(traced, repeats=2, warmup=1, progress=False)
    first, second = (n for n in traced.nodes if "linear" in n.name)
    assert first.params and second.params
    assert prof.nodes[first.name].weight_grad_time > 0
    assert prof.nodes[first.name].input_grad_time == 0.0  # sin(x) needs no grad
    assert prof.nodes[second.name].weight_grad_time > 0 and prof.nodes[second.name].input_grad_time > 0
    sin = next(n for n in traced.nodes if "sin" in n.name)
    assert prof.nodes[sin.name].total_time == pytest.approx(prof.nodes[sin.name].forward_time)
    tanh = next(n for n in traced.nodes if "tanh" in n.name)
    assert prof.nodes[tanh.name].weight_grad_time == 0.0
    assert prof.nodes[tanh.name].saved_bytes == 8 * 32 * 4  # tanh saves its output


def test_inplace_ops_are_profiled_without_corrupting_the_graph() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
    traced = pipec.trace(model, (torch.randn(4, 8),), method="fx")
    prof = pipec.profile(traced, repeats=2, warmup=1, progress=False)
    relu = next(n for n in traced.nodes if n.op == "call_module" and n.target == "1")
    assert prof.nodes[relu.name].input_grad_time > 0 and prof.nodes[relu.name].weight_grad_time == 0.0
    assert prof.nodes[relu.name].saved_bytes == relu.output_bytes
    # the graph still computes the model: profiling ran the in-place op on copies
    assert torch.allclose(traced.graph_module(*traced.example_inputs), model(*traced.example_inputs))


def test_export_traced_gpt2_profiles() -> None:
    model, inputs = models.example("gpt2", batch=2)
    traced = pipec.trace(model, inputs, method="export")
    prof = pipec.profile(traced, repeats=2, warmup=1, progress=False)
    mms = [n.name for n in traced.nodes if n.target.endswith(("addmm.default", "mm.default")) and n.params]
    assert mms and all(prof.nodes[m].weight_grad_time > 0 for m in mms)
    assert sum(c.saved_bytes for c in prof.nodes.values()) > 0


def test_profiled_cost_model_checks_node_names(mlp: tuple[pipec.TracedGraph, Profile]) -> None:
    traced, prof = mlp
    model = ProfiledCostModel(prof)
    assert isinstance(model, pipec.CostModel)
    assert dict(ProfiledCostModel(prof, whole_model_correction=False).node_costs(traced)) == prof.nodes
    # corrected: the nodes add up to the whole model, forward and backward
    costs = model.node_costs(traced)
    assert sum(c.forward_time for c in costs.values()) == pytest.approx(prof.forward_time, rel=1e-9)
    assert sum(c.total_time for c in costs.values()) == pytest.approx(prof.forward_backward_time, rel=1e-9)
    other, inputs = models.example("two_input")
    with pytest.raises(CostModelError, match="re-run pipec.profile"):
        model.node_costs(pipec.trace(other, inputs, method="fx"))


def test_profile_errors_say_what_to_do() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ x

    traced = pipec.trace(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), method="fx")
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="CUDA is not available"):
            pipec.profile(traced, device="cuda")
    with pytest.raises(pipec.ConfigError, match="repeats"):
        pipec.profile(traced, repeats=0)
    # change the graph's input after tracing so the op fails while profiling
    broken = pipec.trace(Broken(), (torch.randn(3, 3),), method="fx")
    object.__setattr__(broken, "example_inputs", (torch.randn(3, 5),))
    with pytest.raises(ProfileError, match="failed on cpu"):
        pipec.profile(broken, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_cuda_and_back() -> None:
    # wide enough that each matmul takes ~1 ms: timer noise cannot fake a fused I/W
    torch.manual_seed(0)
    model, inputs = models.MLP((256, 512, 512, 512, 512, 256)), (torch.randn(256, 256),)
    traced = pipec.trace(model, inputs, method="fx")
    prof = pipec.profile(traced, device="cuda", repeats=3, progress=False)
    assert prof.device.startswith("cuda") and prof.memory_capacity
    linears = [n for n in traced.nodes if n.op == "call_module" and n.param_bytes > 0]
    assert all(prof.nodes[n.name].weight_grad_time > 0 for n in linears)
    assert next(traced.graph_module.parameters()).device.type == "cpu"  # moved back
    assert ProfiledCostModel(prof).comm_time(10**6, 0, 1) > 0
    # an export graph bakes its capture device into factory calls; profiling retargets them
    gpt2, inputs = models.example("gpt2", batch=2)
    traced = pipec.trace(gpt2, inputs, method="export")
    code = traced.graph_module.code
    prof = pipec.profile(traced, device="cuda", repeats=2, progress=False)
    assert prof.node_time > 0 and traced.graph_module.code == code


class _Classifier(nn.Module):
    """A small body and a wide head: the loss over 4096 classes is not free."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, 4096)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.body(x))}


def _ce(out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out["logits"], target)


def test_the_loss_is_profiled_and_counted_on_the_last_node() -> None:
    torch.manual_seed(0)
    model, x, y = _Classifier(), torch.randn(64, 64), torch.randint(0, 4096, (64,))
    traced = pipec.trace(model, (x,), method="fx")
    prof = pipec.profile(traced, repeats=3, warmup=1, progress=False, loss_fn=_ce, target=y)
    assert prof.loss is not None
    assert prof.loss.forward_time > 0 and prof.loss.input_grad_time > 0 and prof.loss.weight_grad_time == 0
    assert prof.loss.saved_bytes >= 64 * 4096 * 4  # cross-entropy keeps its softmax for backward
    assert Profile.model_validate_json(prof.model_dump_json()).loss == prof.loss
    plain = ProfiledCostModel(prof.model_copy(update={"loss": None})).node_costs(traced)
    with_loss = ProfiledCostModel(prof).node_costs(traced)
    compute = [n.name for n in traced.nodes if n.op not in FREE]
    for name in compute[:-1]:
        assert with_loss[name] == plain[name]
    last, before = with_loss[compute[-1]], plain[compute[-1]]
    assert last.forward_time == pytest.approx(before.forward_time + prof.loss.forward_time)
    assert last.input_grad_time == pytest.approx(before.input_grad_time + prof.loss.input_grad_time)
    assert last.saved_bytes == before.saved_bytes + prof.loss.saved_bytes


def test_partition_profiles_the_loss_with_the_target() -> None:
    torch.manual_seed(0)
    model, x, y = _Classifier(), torch.randn(64, 64), torch.randint(0, 4096, (64,))
    with_loss = pipec.partition(model, (x,), num_stages=2, num_microbatches=2, loss_fn=_ce, target=y)
    without = pipec.partition(model, (x,), num_stages=2, num_microbatches=2)
    # the last stage carries the loss; its time is compared with the profile's in the test
    # above (two profiles differ by timer noise), its memory -- the softmax the loss keeps -- here
    last = with_loss.stages[-1]
    assert last.forward_time + last.backward_time > 0
    assert last.memory_bytes > without.stages[-1].memory_bytes


def test_a_loss_that_fails_on_the_example_output_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    model, x = _Classifier(), torch.randn(8, 64)
    traced = pipec.trace(model, (x,), method="fx")
    with caplog.at_level("WARNING", logger="pipec.profiling"):
        prof = pipec.profile(traced, repeats=1, warmup=0, progress=False, loss_fn=_ce)  # needs a target
    assert prof.loss is None
    assert "the loss is not costed" in caplog.text and "target" in caplog.text


def test_whole_model_forward_and_backward_are_sampled_in_alternation() -> None:
    """A slow spell of the machine must fall on both figures alike, not on the forward
    alone (their difference is the backward): samples alternate, some before and some
    after the nodes are timed."""
    from pipec import profiling

    log: list[str] = []

    class FakeTimer:
        def calls_per_sample(self, make: object) -> int:
            return 1

        def sample(self, make: object, calls: int) -> float:
            for f in make(calls):  # type: ignore[operator]
                f()
            return {"F": 1.0, "FB": 3.0}[log[-1]] + len(log) * 1e-3

    samples = profiling._Alternating((lambda: log.append("F"), lambda: log.append("FB")), FakeTimer())  # type: ignore[arg-type]
    samples.take(2)
    samples.take(1)
    assert log == ["F", "FB"] * 3
    forward, forward_backward = samples.medians()
    assert forward == pytest.approx(1.003) and forward_backward == pytest.approx(3.004)

    order: list[str] = []
    real_take, real_walk = profiling._Alternating.take, profiling.walk

    def take(self: object, rounds: int) -> None:
        order.append(f"whole x{rounds}")
        real_take(self, rounds)  # type: ignore[arg-type]

    def walk(*args: object, **kwargs: object) -> object:
        order.append("nodes")
        return real_walk(*args, **kwargs)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(profiling._Alternating, "take", take)
        m.setattr(profiling, "walk", walk)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        prof = pipec.profile(pipec.trace(model, (torch.randn(4, 8),)), repeats=5, progress=False)
    assert order == ["whole x2", "nodes", "whole x3"]
    assert prof.forward_backward_time >= 0 and prof.forward_time >= 0


def test_the_whole_model_backward_accumulates_into_grad_as_a_stage_does() -> None:
    """The runtime's micro-batches after a step's first add into .grad already allocated;
    a backward returning fresh gradients pays the page faults of the model's whole
    gradient size on every call (on a CPU) and over-predicted large stages' backward
    by ~25%. Two calls of the whole-model thunk give twice the gradient of one."""
    from pipec import profiling

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    traced = pipec.trace(model, (x,), method="fx")
    params = list(traced.graph_module.parameters())
    _, forward_backward = profiling._whole_model(traced, (x,))
    forward_backward()
    once = [p.grad.clone() for p in params]
    forward_backward()
    for p, g in zip(params, once, strict=True):
        assert torch.allclose(p.grad, 2 * g)
    ref = torch.autograd.grad(traced.graph_module(x).sum(), params)
    for g, r in zip(once, ref, strict=True):
        assert torch.allclose(g, r)


def test_a_users_grad_survives_a_profile_that_moves_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moving the model to the profiled device swaps each .grad's data in place
    (``Module._apply``): the user's gradients are set aside before the move, the
    profiler's dropped before the move back. The stand-in move does to every .grad what
    a CPU -> CUDA move does (here: to float64 and back), without a GPU."""
    import contextlib

    from pipec import profiling

    @contextlib.contextmanager
    def moved(gm: torch.fx.GraphModule, home: object, dev: object) -> object:
        for p in gm.parameters():
            if p.grad is not None:
                p.grad.data = p.grad.data.double()
        try:
            yield
        finally:
            for p in gm.parameters():
                if p.grad is not None:
                    p.grad.data = p.grad.data.float()

    monkeypatch.setattr(profiling, "_moved", moved)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    traced = pipec.trace(model, (torch.randn(4, 8),), method="fx")
    params = list(traced.graph_module.parameters())
    users = [torch.full_like(p, float(i + 1)) for i, p in enumerate(params)]
    for p, g in zip(params, users, strict=True):
        p.grad = g
    rng = torch.get_rng_state()
    pipec.profile(traced, repeats=1, warmup=0, progress=False)
    for p, g, i in zip(params, users, range(len(users)), strict=True):
        assert p.grad is g and p.grad.dtype == torch.float32 and torch.all(g == i + 1)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_post_accumulate_grad_hook_never_runs_while_profiling() -> None:
    """An optimizer stepping inside the backward (a post-accumulate-grad hook) must not
    step on the profiler's timing runs: those parameters get gradients returned, not
    accumulated."""
    from pipec import profiling

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    traced = pipec.trace(model, (x,), method="fx")
    calls: list[int] = []
    for p in traced.graph_module.parameters():
        p.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    _, forward_backward = profiling._whole_model(traced, (x,))
    forward_backward()
    assert not calls


def test_a_cpu_profile_settles_the_host_allocator_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process's glibc returns large freed blocks to the system, so every large
    temporary is faulted in again on each timed call (the LM head's whole-model backward:
    8.9-10.4 ms fresh, 6.4-7.2 ms settled, the runtime 6.2-6.8 ms). The profile settles
    it before timing on a CPU."""
    from pipec import profiling

    calls: list[str] = []
    real = profiling.settle_host_allocator
    monkeypatch.setattr(profiling, "settle_host_allocator", lambda: calls.append("settled") or real())
    model = nn.Sequential(nn.Linear(4, 4))
    pipec.profile(pipec.trace(model, (torch.randn(2, 4),), method="fx"), repeats=1, warmup=0, progress=False)
    assert calls == ["settled"]
