"""pipec's module import graph, from the source text (nothing is imported).

Used by ``tests/unit/test_layers.py``; run it as a script to print the graph's
cycles, the layer of each module and the edges that point up a layer::

    python tests/import_graph.py

Every import counts: top-level, inside functions, under ``TYPE_CHECKING``,
relative (``from . import x``), and string references -- a string constant
that is exactly a pipec module's name (a lazy-export table such as
``pipec/__init__.py``'s ``_EXPORTS``, ``importlib.import_module("pipec.x")``,
``python -m pipec.x``). ``torch.distributed`` is recorded when a module imports
it in any form or reaches it as the attribute ``torch.distributed``.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipec"

# Layers, bottom to top (ARCHITECTURE.md, "the layers"). A module belongs to the
# first layer with a pattern that matches its dotted name (fnmatch-like: a
# trailing ``.*`` covers a sub-package, its ``__init__`` included). A module may
# import only from its own layer or below; within a layer, the graph must still
# have no cycle.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "basic values",
        (
            "pipec.errors",
            "pipec.units",
            "pipec.types",
            "pipec._lazy",
            "pipec._imports",
            "pipec._files",
            "pipec._version",
            "pipec._preserve",
            "pipec.loss",
        ),
    ),
    (
        "saved data: schedule IR, plan data, timeline format",
        ("pipec.schedule.ir", "pipec.plan", "pipec.timeline_format", "pipec.manifest"),
    ),
    ("schedule library", ("pipec.schedule.*",)),
    (
        "tracing, costs",
        (
            "pipec.tracing.*",
            "pipec.inlining",
            "pipec.mode_ops",
            "pipec.profiling",
            "pipec.microbatch",
            "pipec.costs.*",
        ),
    ),
    ("partitioner", ("pipec.partitioner.*",)),
    (
        "split, codegen",
        (
            "pipec.split.*",
            "pipec.codegen",
            "pipec.templates",
            "pipec.templates.stage",
            "pipec.plan_check",
            "pipec.factory",
        ),
    ),
    ("viz", ("pipec.viz.*", "pipec.summary")),
    ("facade", ("pipec.facade",)),
    ("runtime", ("pipec.runtime.*",)),
    ("namespace", ("pipec",)),
    ("cli", ("pipec.cli", "pipec.__main__", "pipec.templates.run")),
)

# the only modules that may import torch.distributed
DISTRIBUTED_OK = ("pipec.runtime.*",)


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return name == base or name.startswith(base + ".")
    return name == pattern


def layer_of(name: str) -> int | None:
    """The index in :data:`LAYERS` of module ``name``, or None when no layer claims it."""
    for index, (_, patterns) in enumerate(LAYERS):
        if any(_matches(name, p) for p in patterns):
            return index
    return None


def may_use_distributed(name: str) -> bool:
    return any(_matches(name, p) for p in DISTRIBUTED_OK)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    how: str  # "import", "from", "string"


@dataclass
class ImportGraph:
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)
    distributed: dict[str, list[int]] = field(default_factory=dict)  # module -> lines

    def targets(self, source: str) -> set[str]:
        return {e.target for e in self.edges if e.source == source and e.target != source}

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module, each sorted."""
        return [sorted(c) for c in _tarjan(self.modules, self.targets) if len(c) > 1]

    def upward_edges(self) -> list[Edge]:
        """Edges from a module to one in a higher layer (each source/target once)."""
        seen: set[tuple[str, str]] = set()
        out = []
        for e in self.edges:
            a, b = layer_of(e.source), layer_of(e.target)
            if a is None or b is None or b <= a or (e.source, e.target) in seen:
                continue
            seen.add((e.source, e.target))
            out.append(e)
        return out

    def unlayered(self) -> list[str]:
        return sorted(m for m in self.modules if layer_of(m) is None)

    def distributed_outside_runtime(self) -> dict[str, list[int]]:
        return {m: ls for m, ls in self.distributed.items() if not may_use_distributed(m)}


def _tarjan(nodes: Iterable[str], succ: object) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    successors = {n: sorted(succ(n)) for n in nodes}  # type: ignore[operator]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in successors:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(successors[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next((s for s in it if s in successors), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(successors[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                out.append(component)
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a pipec module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_distributed(name: str) -> bool:
    return name == "torch.distributed" or name.startswith("torch.distributed.")


_MODULE_STRING = re.compile(r"pipec(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _module_edges(name: str, path: Path, modules: dict[str, Path]) -> tuple[list[Edge], list[int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []
    distributed: list[int] = []

    def add(target: str, line: int, how: str) -> None:
        resolved = _resolve(target, modules)
        if resolved is not None:
            edges.append(Edge(name, resolved, line, how))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, "import")
                if _is_distributed(alias.name):
                    distributed.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # `from pkg import sub` imports the submodule; `from mod import x` the module
                add(full if full in modules else base, node.lineno, "from")
                if _is_distributed(base) or _is_distributed(full):
                    distributed.append(node.lineno)
        elif isinstance(node, ast.Attribute):
            if (
                isinstance(node.value, ast.Name)
                and node.value.id == "torch"
                and node.attr == "distributed"
            ):
                distributed.append(node.lineno)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.fullmatch(node.value)
            and node.value in modules
        ):
            add(node.value, node.lineno, "string")
    return edges, sorted(set(distributed))


def build(package: Path = PACKAGE) -> ImportGraph:
    """The import graph of every ``.py`` file under ``package``."""
    root = package.parent
    modules = {module_name(p, root): p for p in sorted(package.rglob("*.py"))}
    graph = ImportGraph(modules)
    for name, path in modules.items():
        edges, distributed = _module_edges(name, path, modules)
        graph.edges.extend(edges)
        if distributed:
            graph.distributed[name] = distributed
    return graph


def report(graph: ImportGraph) -> str:
    lines = [f"{len(graph.modules)} modules, {len({(e.source, e.target) for e in graph.edges})} edges"]
    lines.append("layers, top to bottom (a module imports only from its layer or below):")
    for index in reversed(range(len(LAYERS))):
        members = sorted(m.removeprefix("pipec.") or "pipec" for m in graph.modules if layer_of(m) == index)
        lines.append(f"  {index:2d} {LAYERS[index][0]}: {', '.join(members)}")
    cycles = graph.cycles()
    lines.append(f"cycles (strongly connected components > 1 module): {len(cycles)}")
    for c in cycles:
        lines.append(f"  {len(c)}: {' '.join(c)}")
    up = graph.upward_edges()
    lines.append(f"upward edges: {len(up)}")
    for e in up:
        lines.append(
            f"  {e.source} ({LAYERS[layer_of(e.source) or 0][0]}) -> {e.target} "
            f"({LAYERS[layer_of(e.target) or 0][0]})  line {e.line} [{e.how}]"
        )
    lines.append(f"modules in no layer: {graph.unlayered()}")
    lines.append(f"torch.distributed outside pipec/runtime/: {graph.distributed_outside_runtime()}")
    sizes = sorted(
        ((len(p.read_text(encoding="utf-8").splitlines()), m) for m, p in graph.modules.items()),
        reverse=True,
    )
    lines.append(f"largest modules (lines): {', '.join(f'{m} {n}' for n, m in sizes[:3])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(report(build()) + "\n")
