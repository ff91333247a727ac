"""The demo behind `make demo`: GPT-2 -> 2-stage 1F1B plan -> 2 Gloo ranks -> report.

Each step is the CLI command a user would type, echoed before it runs:

    pipec partition examples/gpt2.py:make --stages 2 --microbatches 4 --schedule 1f1b -o demo_out/gpt2
    pipec run demo_out/gpt2 --nproc 2 --steps 5
    pipec show demo_out/gpt2
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo_out" / "gpt2"


def pipec(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipec", *args]
    print(f"\n$ pipec {shlex.join(args)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"demo: `pipec {args[0]}` failed with exit code {result.returncode}")


def main() -> None:
    start = time.perf_counter()
    pipec("partition", "examples/gpt2.py:make", "--stages", "2", "--microbatches", "4",
          "--schedule", "1f1b", "--cost-model", "profile", "-o", str(OUT.relative_to(ROOT)), "--force")
    pipec("run", str(OUT.relative_to(ROOT)), "--nproc", "2", "--steps", "5")
    pipec("show", str(OUT.relative_to(ROOT)))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    print(f"report: {OUT / 'report.html'}")


if __name__ == "__main__":
    main()
