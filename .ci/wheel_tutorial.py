"""README's tutorial (parts 1 and 2, as the README has them) against the installed pipec.

Run by .ci/wheel_check.sh from a folder outside the source tree with the wheel's
venv: partition with the default cost model, the summary, save, load. Fails when
the pipec imported is the checkout's, or when pipec logs a warning (a shipped
cost model not found, say).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def _python_blocks(readme: str, heading: str) -> list[str]:
    start = readme.index(heading)
    section = readme[start:readme.index("\n### ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def main(root: Path) -> None:
    import pipec

    where = Path(pipec.__file__).resolve()
    if root.resolve() in where.parents:
        raise SystemExit(f"wheel-check: imported the checkout's pipec ({where}), not the wheel's")
    if Path.cwd().resolve() == root.resolve() or root.resolve() in Path.cwd().resolve().parents:
        raise SystemExit("wheel-check: run this outside the source tree")

    readme = (root / "README.md").read_text(encoding="utf-8")
    partition = _python_blocks(readme, "### 1. Partition a model in Python")[0]
    save = _python_blocks(readme, "### 2. Save it, open the report")[0]
    assert "pipec.partition(" in partition and "cost_model=" not in partition  # the default one
    assert 'plan.save("out/mlp")' in save

    warned = _Warnings()
    logging.getLogger("pipec").addHandler(warned)
    namespace: dict[str, object] = {}
    exec(compile(partition + save, "README.md", "exec"), namespace)
    plan = namespace["plan"]
    assert isinstance(plan, pipec.Plan)
    loaded = pipec.load("out/mlp")
    assert loaded.summary() == plan.summary(), (loaded.summary(), plan.summary())
    assert loaded.simulate().step_time == plan.simulate().step_time
    assert warned.records == [], warned.records
    print(f"wheel-check: README tutorial ran with pipec {pipec.__version__} from {where.parent}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
