"""The runtime's non-finite flag (``pipec.runtime.nonfinite._bad``): one min/max pass per
tensor, the same answer as ``isfinite`` for every float dtype and layout."""

from __future__ import annotations

import pytest
import torch

from pipec.runtime.nonfinite import _bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_the_flag_is_isfinite_for_every_dtype_and_place(dtype: torch.dtype, bad: float | None, where: int) -> None:
    t = torch.randn(33, 40).to(dtype)
    if bad is not None:
        t.view(-1)[where] = bad
    for view in (t, t.t(), t[:, ::3]):  # contiguous, transposed, strided
        flag = _bad([view])
        assert flag is not None
        assert bool(flag) == (not bool(torch.isfinite(view).all()))


def test_large_finite_values_and_masks_are_not_flagged() -> None:
    mask = torch.full((4, 4), torch.finfo(torch.float32).min)  # an HF attention mask: finite
    big = torch.full((1000,), 3e38)  # a sum would overflow; min/max do not
    assert not bool(_bad([mask, big]))


def test_only_non_empty_float_tensors_are_read() -> None:
    assert _bad([torch.arange(4), torch.empty(0), None, 3.0]) is None
    assert bool(_bad([torch.arange(4), torch.tensor([1.0, float("nan")])]))


def test_a_forward_is_flagged_for_any_bad_value_where_a_gradient_flows_and_nan_elsewhere() -> None:
    """An infinity in a forward output that carries no gradient can be meant (a
    float("-inf") attention mask crossing stages): only NaN flags those. Outputs that carry
    a gradient (an overflow there may be clamped away before the loss) and the loss flag
    on NaN and infinity alike."""
    from pipec.runtime.nonfinite import NonfiniteWatch

    mask = torch.full((4, 4), float("-inf")).triu(1)
    inf, nan = torch.tensor([1.0, float("inf")]), torch.tensor([1.0, float("nan")])
    cases = [  # (outputs carrying a gradient, constants, loss, flagged)
        ([torch.ones(3)], [mask], None, False),
        ([torch.ones(3)], [mask, nan], None, True),
        ([inf], [], None, True),
        ([nan], [mask], None, True),
        ([], [mask], torch.tensor(2.0), False),
        ([], [mask], torch.tensor(float("inf")), True),
        ([torch.ones(2)], [], torch.tensor(float("nan")), True),
    ]
    for i, (outputs, constants, loss, expected) in enumerate(cases):
        watch = NonfiniteWatch()
        watch.forward(0, i, [], outputs, loss, constants=constants)
        assert bool(watch.forward_flags[(0, i)]) == expected, i


def test_the_locator_names_an_overflow_but_not_a_mask() -> None:
    """Re-running a stage, the first op with a NaN or with an infinity in a tensor that
    requires grad is named; an infinite mask built inside (no grad) is passed over."""
    from pipec.runtime.nonfinite import locate_node

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.full((4, 4), float("-inf")).triu(1)
            big = self.lin(x) * 1e38
            wide = big * 1e10
            return torch.clamp(wide, -1, 1) + mask.softmax(-1)

    found = locate_node(Stage(), [torch.ones(4, 4, requires_grad=True)], seed=0, step=0, microbatch=0)
    assert found is not None and found.startswith("wide"), found


def test_one_byte_floats_are_read_too() -> None:
    for dtype in (torch.float8_e5m2, torch.float8_e4m3fn):
        t = torch.tensor([1.0, float("nan")]).to(dtype)
        assert bool(_bad([t])) and not bool(_bad([torch.ones(3).to(dtype)]))
