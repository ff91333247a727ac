"""The one-way architecture (ARCHITECTURE.md, "the layers"), checked on the source.

``tests/import_graph.py`` parses every module under ``pipec/`` and counts every
import -- top-level, in functions, under ``TYPE_CHECKING``, relative, and
string references such as lazy-export tables and ``importlib.import_module``.
Its ``LAYERS`` table is the layer of each module, bottom to top:

  0 basic values        errors, units, types, loss, _lazy, _imports, _files, _version,
                        _preserve
  1 saved data          schedule.ir, plan (data only), timeline_format, manifest
  2 schedule library    schedule.*: stage_graph < dry_run < grid < validator <
                        lowering < simulator; generators, in_flight
  3 tracing, costs      tracing/, inlining, mode_ops, profiling, microbatch, costs.*
  4 partitioner         partitioner.*
  5 split, codegen      split.*, codegen, templates.stage, plan_check, factory
  6 viz                 viz.*, summary
  7 facade              facade (Plan, partition, load)
  8 runtime             runtime.* (the only users of torch.distributed)
  9 namespace           pipec/__init__ (the lazy table of every public name)
 10 cli                 cli, __main__, templates/run.py (the plan directory's script)

Where this differs from the first drawing in ARCHITECTURE.md, and why:
the schedule IR sits with the plan data because ``plan.json`` holds a
``Schedule``; the rest of the schedule library sits below the partitioner,
which sizes memory by the schedule. The runtime sits above the façade: its
input is the user's :class:`pipec.Plan`, or a plan directory it opens with
``pipec.load`` into the same Plan (a loaded and an in-memory plan are one
class); viz imports nothing of the runtime (the timeline format it reads is
``pipec.timeline_format``), so it sits below the façade that draws with it.
"""

from __future__ import annotations

import re
from pathlib import Path

import import_graph

GRAPH = import_graph.build()


def test_every_module_has_a_layer() -> None:
    assert GRAPH.unlayered() == []


def test_the_graph_sees_every_kind_of_import(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pkg = tmp_path / "pipec"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('_EXPORTS = {"thing": "pipec.sub.d"}\n')
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipec.b import x\n"
        "def f():\n    from .sub import c\n"
        "import importlib\nimportlib.import_module('pipec.sub.d')\n"
        "import torch\ntorch.distributed.barrier()\n"
    )
    (pkg / "b.py").write_text("from pipec import a\n")
    (pkg / "sub" / "c.py").write_text("from .. import b\nfrom . import d\n")
    (pkg / "sub" / "d.py").write_text("import torch.distributed as dist\n")
    graph = import_graph.build(pkg)
    assert graph.targets("pipec.a") == {"pipec.b", "pipec.sub.c", "pipec.sub.d"}
    assert graph.targets("pipec.b") == {"pipec.a"}
    assert graph.targets("pipec.sub.c") == {"pipec.b", "pipec.sub.d"}
    assert graph.targets("pipec") == {"pipec.sub.d"}
    assert graph.cycles() == [["pipec.a", "pipec.b", "pipec.sub.c"]]
    assert set(graph.distributed) == {"pipec.a", "pipec.sub.d"}


def test_no_import_cycles() -> None:
    assert GRAPH.cycles() == []


def test_no_module_imports_a_higher_layer() -> None:
    up = [f"{e.source} -> {e.target} (line {e.line})" for e in GRAPH.upward_edges()]
    assert up == []


def test_only_the_runtime_imports_torch_distributed() -> None:
    assert GRAPH.distributed_outside_runtime() == {}


def _readme_layers() -> dict[int, str]:
    """README's architecture drawing: layer number -> its row (continuation lines joined)."""
    text = (Path(import_graph.ROOT) / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Architecture"):]
    drawing = section[section.index("```\nlayer"):].split("```")[1]
    rows: dict[int, str] = {}
    last = -1
    for line in drawing.splitlines():
        match = re.match(r"\s*(\d+)\s+(.*)", line)
        if match:
            last = int(match.group(1))
            rows[last] = match.group(2)
        elif line.strip() and last >= 0:  # a continuation line (the header has no number)
            rows[last] += " " + line.strip()
    return rows


def _token(pattern: str) -> str:
    """How README names a module pattern: ``pipec.costs.*`` is ``costs/``, ``pipec.schedule.ir``
    is ``schedule/ir``, ``pipec`` is ``__init__``."""
    if pattern == "pipec":
        return "__init__"
    name = pattern.removeprefix("pipec.")
    return name[:-2].replace(".", "/") + "/" if name.endswith(".*") else name.replace(".", "/")


def test_readme_draws_the_layers_of_the_code() -> None:
    rows = _readme_layers()
    assert sorted(rows) == list(range(len(import_graph.LAYERS))), rows
    for index, (name, patterns) in enumerate(import_graph.LAYERS):
        row = rows[index]
        assert row.startswith(name.split(":")[0]), (index, name, row)
        missing = [p for p in patterns if _token(p) not in row]
        assert missing == [], f"README's layer {index} ({row!r}) does not name {missing}"
