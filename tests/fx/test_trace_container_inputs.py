"""A model whose input is a dict of tensors (``forward(self, batch)`` with
``batch["x"]``, ``batch["y"]``).

Regression: fx took the dict for a constant argument and baked the example's
tensors into the graph, so the graph ignored its inputs: with the default
profile cost model partition failed with a misleading "failed on cpu with its
example inputs", with an analytic one it built a plan computing on the
example batch. fx now refuses such an input and ``method="auto"`` uses
torch.export, which takes the dict apart into one graph input per tensor.
"""

from __future__ import annotations

import pytest
import torch
from models import DictInput, dict_batch
from torch.nn import functional as F

import pipec
from pipec.errors import TraceError


def test_fx_refuses_tensors_inside_a_dict_input_and_names_the_fix() -> None:
    with pytest.raises(TraceError, match=r"'batch' is a dict holding tensors.*method='export'"):
        pipec.trace(DictInput(), (dict_batch(0),), method="fx")


def test_auto_traces_a_dict_input_with_export_and_the_graph_reads_it() -> None:
    torch.manual_seed(0)
    model = DictInput()
    traced = pipec.trace(model, (dict_batch(0),))
    assert traced.method == "export"
    other = dict_batch(1)
    (got,) = traced.graph_module(*traced.flatten_inputs((other,)))
    torch.testing.assert_close(got, model(other))


def test_partition_of_a_dict_input_model_computes_on_the_batch_it_is_given() -> None:
    torch.manual_seed(0)
    model = DictInput()
    target = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))
    plan = pipec.partition(model, (dict_batch(0),), num_stages=2, num_microbatches=2,
                           loss_fn=F.cross_entropy, target=target)  # default cost model: profile
    other = dict_batch(1)
    ref = pipec.reference_step(plan, other, target=target)
    want = F.cross_entropy(model(other), target)
    want.backward()
    torch.testing.assert_close(ref.loss, want.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ref.grads[name], p.grad, msg=name)
