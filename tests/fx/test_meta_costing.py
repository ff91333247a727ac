"""A model built on the meta device (no memory for its weights) is traced and costed
by the analytic cost model as it would be on the CPU: the same kernels (flash
attention, not meta's S x S reference math), the same node costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipec.costs.analytic import load_cost_model
from pipec.tracing import trace

pytestmark = pytest.mark.timeout(120)


class Attention(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


def costs_on(device: str) -> dict[str, tuple[float, float, float, int]]:
    torch.manual_seed(0)
    with torch.device(device):
        model = Attention()
        x = torch.zeros(2, 256, 64)
    traced = trace(model, (x,), method="export")
    got = load_cost_model("h100-sxm").node_costs(traced)
    return {n: (c.forward_time, c.input_grad_time, c.weight_grad_time, c.saved_bytes) for n, c in got.items()}


def test_meta_model_costs_as_on_cpu() -> None:
    meta, cpu = costs_on("meta"), costs_on("cpu")
    assert meta == cpu
    attention = [v for n, v in meta.items() if "scaled_dot_product" in n]
    assert attention
    scores = 2 * 4 * 256 * 256 * 4  # the S x S scores of one batch, fp32: what the math path would save
    assert all(saved < scores for *_, saved in attention)
