"""The stage files of a plan directory, read without running them.

Phase: split / codegen (used by :mod:`pipec.codegen` to check a directory
before importing it, and by :func:`pipec.split.merge_state_dicts` for the
tied-tensor names of a loaded plan). Input: a plan directory and a stage
index. Output: the names of its files, and the literal tables
(``PARAMETERS``, ``BUFFERS``, ``ALIASES``) ``stage_<k>.py`` declares, read
with :mod:`ast` -- nothing is imported or evaluated.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from pipec.errors import PlanError
from pipec.plan_check import RERUN as _RERUN


def stage_file(index: int) -> str:
    return f"stage_{index}.py"


def weights_file(index: int) -> str:
    return f"stage_{index}.safetensors"


def stage_tensor_shapes(directory: Path, index: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``stage_<index>.py`` declares, read without running it."""
    declared = stage_literals(directory, index)
    return {name: tuple(spec[0]) for table in ("PARAMETERS", "BUFFERS")
            for name, spec in declared.get(table, {}).items()}


def read_stage_aliases(directory: Path, index: int) -> dict[str, tuple[str, ...]]:
    """The other state-dict names of stage ``index``'s tied tensors."""
    return {k: tuple(v) for k, v in stage_literals(directory, index).get("ALIASES", {}).items()}


def stage_literals(directory: Path, index: int) -> dict[str, Any]:
    file = directory / stage_file(index)
    if not file.is_file():
        raise PlanError(f"{directory} lacks {stage_file(index)} for stage {index}; {_RERUN}")
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"{file} is not valid Python ({exc}); {_RERUN}") from None
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("PARAMETERS", "BUFFERS", "ALIASES"):
                try:
                    out[name] = ast.literal_eval(node.value)
                except ValueError:
                    raise PlanError(f"{file}: {name} must be a literal dict; {_RERUN}") from None
    if "PARAMETERS" not in out or "BUFFERS" not in out:
        raise PlanError(f"{file} declares no PARAMETERS/BUFFERS tables, so it is not a pipec stage file; {_RERUN}")
    return out


__all__ = ["read_stage_aliases", "stage_file", "stage_literals", "stage_tensor_shapes", "weights_file"]
