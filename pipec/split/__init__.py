"""Phase split: one ``nn.Module`` per pipeline stage, parameters under their original FQNs.

Input: a traced graph, the plan data and a stage index
(:func:`build_stage_module`; a plan loaded from a directory reads its stage
files instead, :mod:`pipec.codegen`). Output: a :class:`StageModule`.

Stage-module contract (what the runtime relies on; names are exact)
-------------------------------------------------------------------
``index: int``
    The stage index.
``input_names: tuple[str, ...]``
    ``graph_input_names`` -- the model inputs (placeholder names) the stage
    reads, in graph order -- followed by ``boundary_input_names`` -- the
    boundary tensors it receives, ordered by their producer's position in the
    traced graph. A skip tensor comes straight from its producer stage.
``output_names: tuple[str, ...]``
    The boundary tensors it produces, in the same order.
``graph_input_names`` / ``boundary_input_names``
    The two parts of ``input_names``.
``is_last: bool``
    Whether it is the last stage (the one holding the model's output node).
``requires_grad: Mapping[str, bool]``
    For every boundary name in ``input_names`` and ``output_names``: whether a
    gradient flows back through it (a floating-point tensor computed from a
    trainable parameter). Integer and boolean tensors (masks, positions) never
    carry one; the runtime sends no gradient for a name mapped to False.
``forward(*inputs) -> tuple``
    Takes one value per ``input_names``; returns the values of
    ``output_names`` in order and, on the last stage only, one more element:
    the model's output in its original structure (a HF ``ModelOutput`` comes
    back as a plain dict with the same keys when its type cannot be rebuilt).
``output_spec: str | None``
    The output's pytree spec (``treespec_dumps``), last stage only.
``aliases: Mapping[str, tuple[str, ...]]``
    Other state-dict names of the stage's tied tensors (``head.weight`` for
    ``embed.weight``), used by :func:`merge_state_dicts`.
``traced_training: bool`` / ``follows_mode: bool``
    The model's mode when it was traced (the stage starts in it), and whether
    ``forward`` reads ``self.training`` (it has dropout or batch norm).
``mode_blind_random: Mapping[str, str]``
    Traced in training mode: the random nodes with no mode argument
    (``torch.rand``, ``bernoulli``), node name -> module path. They draw in
    eval too; ``stage.eval()`` warns (stochastic depth skipped by Python in
    eval was baked in by the trace).

Both kinds of stage module -- :class:`GraphStage` (built in memory) and the
``Stage<k>`` classes of generated ``stage_<k>.py`` files -- subclass
:class:`StageModule`. ``device=`` constants the trace baked in (``torch.export``
creates ``arange(..., device=cpu)``) read the device of the stage's first
tensor instead, so ``stage.to(device)`` is all a rank needs. Sizes of the
model inputs' shapes that a dynamic ``torch.export`` graph reads
(``sym_size``, ``NodeInfo.is_size``) are recomputed in each stage from a
tensor it holds with that dim -- its own, a boundary it receives, else a
model input it then reads --, so a stage runs at any batch size and sequence
length the trace left symbolic.

``state_dict()`` keys are the original model's FQNs; a tied parameter appears
once, under its canonical FQN (the first name ``model.named_parameters()``
yields), on every stage that uses it. Each stage module owns copies of its
tensors: stages never share storage with the model or with each other.

The graph of a stage holds only placeholders, ``get_attr`` of its tensors,
``call_function``/``call_method`` and the output: ``call_module`` nodes of fx
graphs are inlined (traced through with fx, or with ``torch.export`` when fx
cannot). The trace bakes the model's train/eval mode in as constants; the
stage graph reads ``self.training`` instead (:mod:`pipec.split.modes`), so
``stage.train()`` / ``stage.eval()`` switch dropout and batch norm as on the
original model, and its random nodes are seeded per node, step and
micro-batch (:mod:`pipec.split.randomness`).

Modules: :mod:`pipec.split.stage` (the stage-module classes), :mod:`pipec.split.graph`
(splitting a traced graph), :mod:`pipec.split.modes` (train/eval),
:mod:`pipec.split.randomness` (seeded random nodes), :mod:`pipec.split.state`
(state dicts), :mod:`pipec.split.torch_stage` and :mod:`pipec.split.torch_export`
(the stages as torch.distributed.pipelining runs them).
"""

from pipec.split.graph import build_stage_module, check_stage_index
from pipec.split.stage import GraphStage, StageModule, place_tensor, rebuild_output
from pipec.split.state import merge_state_dicts, split_state_dict

__all__ = [
    "GraphStage",
    "StageModule",
    "build_stage_module",
    "check_stage_index",
    "merge_state_dicts",
    "place_tensor",
    "rebuild_output",
    "split_state_dict",
]
