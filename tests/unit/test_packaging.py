"""What a user installs: the declared dependencies are exactly what ``pipec/``
imports, the shipped data is package data, and ``import pipec`` is typed.

These run against whatever ``pipec`` is importable -- the editable checkout in
``make test``, the built wheel in ``make wheel-check`` (.ci/wheel_check.sh).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipec
from pipec.costs.hardware import cost_models_dir, list_cost_models

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(pipec.__file__).resolve().parent  # the pipec under test: source or installed


def _declared() -> dict[str, str]:
    """Distribution name (normalised) -> requirement, from pyproject.toml (or, on Python
    3.10 without tomllib, the installed distribution's metadata)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        requirements = [r for r in importlib.metadata.requires("pipec") or [] if "extra ==" not in r]
    else:
        requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-"): r for r in requirements}


def _imported_top_levels() -> dict[str, str]:
    """Top-level module -> first file that imports it, over every import in ``pipec/``
    (in functions and under TYPE_CHECKING too), the standard library and pipec left out."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "pipec" and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(PACKAGE)))
    return found


def test_every_third_party_import_is_a_declared_dependency_and_back() -> None:
    declared = _declared()
    providers = importlib.metadata.packages_distributions()
    imported = _imported_top_levels()
    assert imported, "the scan found no third-party import at all"
    undeclared = {}
    used: set[str] = set()
    for module, where in imported.items():
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if dists & set(declared):
            used |= dists & set(declared)
        else:
            undeclared[module] = where
    assert undeclared == {}, f"imported by pipec/ but not in [project] dependencies: {undeclared}"
    unused = sorted(set(declared) - used)
    assert unused == [], f"declared in [project] dependencies but never imported by pipec/: {unused}"


def test_every_declared_dependency_has_a_lower_bound() -> None:
    assert [r for r in _declared().values() if ">=" not in r] == []


def test_the_shipped_cost_models_live_in_the_package() -> None:
    assert cost_models_dir().resolve().parent == PACKAGE
    assert {"h100-sxm", "a100-sxm-80gb", "cpu"} <= set(list_cost_models())
    assert pipec.load_cost_model("h100-sxm").spec.name


def test_the_type_checking_imports_are_the_lazy_table() -> None:
    # pipec/__init__ names each public name twice: in _EXPORTS (run time, lazily) and
    # under TYPE_CHECKING (for type checkers); the two must not drift apart
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    table = next(n.value for n in tree.body if isinstance(n, ast.AnnAssign)
                 and isinstance(n.target, ast.Name) and n.target.id == "_EXPORTS")
    exports = {ast.literal_eval(k): ast.literal_eval(v) for k, v in zip(table.keys, table.values)}  # type: ignore[attr-defined,arg-type]
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    imports = {a.name: s.module for s in guarded.body if isinstance(s, ast.ImportFrom) for a in s.names
               if a.asname == a.name}
    assert imports == exports
    assert sorted(exports) == pipec.__all__


USER_SCRIPT = """\
import torch
from torch import nn

import pipec

model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
plan = pipec.partition(model, (torch.randn(8, 4),), num_stages="two")
step: int = plan.simulate().step_time
pipec.partiton(model, (torch.randn(8, 4),), num_stages=2)
ok: pipec.Plan = pipec.load("out")
"""


@pytest.mark.timeout(240)
def test_a_type_checker_sees_the_real_signatures(tmp_path: Path) -> None:
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))  # the pipec under test
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull, "--ignore-missing-imports",
         "--no-error-summary", "--hide-error-context", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=230,
    )
    errors = sorted(re.findall(r"^user\.py:(\d+): error: (.*?)\s+\[([a-z-]+)\]$", result.stdout, re.MULTILINE))
    assert [(int(line), code) for line, _, code in errors] == [(7, "arg-type"), (8, "assignment"), (9, "attr-defined")], (
        result.stdout + result.stderr)
    assert '"num_stages" to "partition" has incompatible type "str"; expected "int | None"' in errors[0][1]
