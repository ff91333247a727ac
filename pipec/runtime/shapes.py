"""Saying which node of a stage failed on a batch shaped unlike the plan's example.

Phase: stage runtime (pure; no communication). A step may have another batch
size or sequence length than the example the plan was traced on. Code traced
with concrete sizes (torch.export without dynamic shapes specialises every
``view``/``reshape`` to the example's sizes) then fails inside the stage; the
error torch raises names neither the stage nor the node. The stage modules are
generated code whose every line assigns one graph node, so the failing line of
the stage's ``forward`` names the node.
"""

from __future__ import annotations

import linecache
import re
from types import TracebackType

from torch import nn

_ASSIGNED = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)")


def failing_line(module: nn.Module, error: BaseException) -> tuple[str | None, str | None]:
    """``(node name, source line)`` of the deepest line of ``module``'s ``forward`` in
    ``error``'s traceback; Nones when it cannot be told (the module is not generated code)."""
    code = getattr(type(module).forward, "__code__", None)
    tb: TracebackType | None = error.__traceback__
    line: str | None = None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            text = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_globals).strip()
            line = text or line
        tb = tb.tb_next
    if line is None:
        return None, None
    match = _ASSIGNED.match(line)
    return (match.group(1) if match else None), line


def baked_shape_message(stage: int, module: nn.Module, error: BaseException, note: str) -> str:
    """The message of a stage that failed on a batch shaped unlike the plan's example."""
    node, line = failing_line(module, error)
    where = f"stage {stage}"
    if node is not None:
        where += f", node {node!r}"
    if line is not None:
        where += f" (`{line if len(line) <= 160 else line[:157] + '...'}`)"
    return (
        f"{where} failed: {type(error).__name__}: {error}. {note}; the stage code was traced on the "
        "example and may have its sizes baked in (torch.export specialises views and reshapes to the "
        "example's shape): pass batches shaped like the plan's, or re-plan with example inputs shaped "
        "like this batch (one plan per shape)"
    )
