#!/usr/bin/env bash
# The wheel as a user gets it: build it from the checkout's files, install it
# (not editable, --no-deps) into a fresh venv whose dependencies come from
# .venv, then, from a folder outside the source tree, run README's tutorial
# (default cost model, summary, save, load), the CLI, and tests against the
# installed package: the whole suite, or the test paths given as arguments.
# `make test` is this script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# test paths given as arguments, relative to the checkout (the tests run elsewhere)
TESTS=()
for t in "$@"; do case $t in /*) TESTS+=("$t") ;; *) TESTS+=("$ROOT/$t") ;; esac; done
[ ${#TESTS[@]} -gt 0 ] || TESTS=("$ROOT/tests")
VENV=${VENV:-.venv}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
PY=$VENV/bin/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pipec-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# the files a fresh clone has (tracked, plus new ones not ignored), so a stale
# build/ or an untracked stray never reaches the wheel
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .)
WHEEL=$(ls "$WORK"/dist/pipec-*.whl)
echo "wheel-check: built $(basename "$WHEEL")"

"$PY" -m venv --without-pip "$WORK/env"
ENVPY=$WORK/env/bin/python
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# torch & co. from .venv: a plain path line, so .venv's own .pth files (the
# editable install of this checkout among them) are not run
purelib "$PY" > "$(purelib "$ENVPY")/pipec_deps.pth"
"$PY" -m pip --python "$ENVPY" install -q --no-deps --no-index "$WHEEL"

mkdir -p "$WORK/run"
cd "$WORK/run"
export OMP_NUM_THREADS=1 PIPEC_TEST_INSTALLED=1
"$ENVPY" "$ROOT/.ci/wheel_tutorial.py" "$ROOT"

# the CLI, installed as a console script
PIPEC=$WORK/env/bin/pipec
"$PIPEC" --help >/dev/null
cat > factory.py <<'PY'
import torch
from torch import nn
from torch.nn import functional as F


def make():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    return {"model": model, "example_inputs": (torch.randn(8, 16),),
            "loss_fn": F.cross_entropy, "target": torch.randint(0, 4, (8,))}
PY
"$PIPEC" partition factory.py:make --stages 2 -o plan >/dev/null
test -f plan/plan.json -a -f plan/stage_1.py -a -f plan/report.html
"$PIPEC" show plan > shown.txt
grep -q "^rank 1: " shown.txt
set +e
"$PIPEC" show nowhere 2>err.txt
code=$?
set -e
test "$code" = 2 && grep -q "^pipec: error: " err.txt
echo "wheel-check: the CLI works from the wheel"

# the tests, importing the installed pipec (tests/conftest.py checks it is not the checkout)
"$ENVPY" -m pytest -q -p no:cacheprovider --timeout="${PYTEST_TIMEOUT:-300}" --rootdir "$ROOT" \
    "${TESTS[@]}"
echo "wheel-check: passed"
