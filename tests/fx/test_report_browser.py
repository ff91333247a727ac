"""report.html in a real browser: headless Chromium renders it with no console
error, its script runs to the end, and a screenshot shows the pictures.

Skipped when Chromium is not installed (``.ci/run`` installs Debian's
``chromium``). The screenshot is decoded here (zlib + PNG filters) so the test
needs no imaging library.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from test_report_model import unet_plan

from pipec.plan import Candidate
from pipec.viz.report import write_report
from pipec.viz.report_style import stage_color

CHROMIUM_TIMEOUT_S = 60
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
CONSOLE_RE = re.compile(r":CONSOLE[:(]")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    pytest.skip("headless Chromium is not installed (apt-get install chromium); .ci/run installs it")


def run_chromium(args: list[str], profile: Path) -> tuple[str, str]:
    """Run Chromium in its own process group; kill the whole group on timeout."""
    cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {' '.join(cmd)}")
    return out, err


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the raw rows (RGB or RGBA, 8 bits) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line if bpp == 3 else b"".join(line[i : i + 3] for i in range(0, stride, 4))))
        prev = line
    return width, height, rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chromium()
    candidates = (
        Candidate(schedule="1f1b", num_microbatches=4, stages_per_rank=1, step_time=1e-3,
                  bubble_fraction=0.3, peak_memory=(1, 2, 3, 4), fits=True, note="chosen"),
        Candidate(schedule="gpipe", num_microbatches=8, stages_per_rank=1, step_time=0.9e-3,
                  bubble_fraction=0.2, peak_memory=(10**12, 2, 3, 4), fits=False, note="too big"),
    )
    directory = tmp_path_factory.mktemp("report")
    plan = unet_plan(candidates=candidates)
    return write_report(plan.data, directory, traced=plan.traced)


def test_page_runs_its_script_without_console_errors(report: Path, tmp_path: Path) -> None:
    dom, log = run_chromium(["--dump-dom", report.as_uri()], tmp_path / "profile")
    errors = [line for line in log.splitlines() if CONSOLE_RE.search(line)]
    assert not errors, "console output from the page:\n" + "\n".join(errors)
    assert 'data-report-ok="1"' in dom, "the page's script did not run to its end"


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    _, log = run_chromium([f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri()], tmp_path / "profile")
    assert shot.is_file(), f"no screenshot written; chromium said:\n{log[-2000:]}"
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    colors: set[bytes] = set()
    for row in rows[::4]:
        colors.update(row[i : i + 3] for i in range(0, len(row), 3 * 4))
    assert len(colors) >= 16, f"only {len(colors)} distinct colours: the page looks blank"
    # the stage colours of the memory bars, the stage table and the module picture are on screen
    for stage in (0, 1, 2):
        rgb = bytes.fromhex(stage_color(stage).lstrip("#"))
        assert rgb in colors, f"stage {stage}'s colour {stage_color(stage)} is not on screen"
