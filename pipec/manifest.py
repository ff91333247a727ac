"""The plan directory's manifest: the sha256 of every file ``plan.save`` wrote.

Phase: codegen (used by :func:`pipec.codegen.save_plan` and
:func:`pipec.codegen.load_plan_data`). A plan directory is code -- ``stage_<k>.py`` is
imported when a stage is built -- and its files must agree with each other,
so ``load`` compares every file against ``manifest.json`` before it trusts
any of them, and before any stage file is imported::

    {"format_version": 1,
     "checked":  {"plan.json": "<sha256>", "stage_0.py": ..., "stage_0.safetensors": ...,
                  "schedule.txt": ...},
     "recorded": {"run.py": ..., "report.html": ..., "schedule.svg": ...}}

``checked`` files are what the plan *is*: a changed or missing one is
refused. ``recorded`` files are written with the plan but are not part of
what pipec loads: ``run.py`` is the user's training loop to edit (its
docstring says so), ``report.html`` is redrawn by ``pipec show`` and after
``pipec run``, ``schedule.svg`` is a picture. Their digests are kept so a
reader can tell whether they were edited. A file the manifest does not list
is refused when it looks like part of a plan (``stage_<k>.py``, any
``.safetensors``): a stray stage file means two plans were mixed. Everything
else -- measured timelines, ``checkpoint/``, notes -- is left alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from pipec._files import sha256_file
from pipec.types import FrozenModel

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1

# names that belong to a plan: a file like this that the manifest lacks is refused
_PLAN_LIKE = re.compile(r"^(stage_\d+\.py|.*\.safetensors)$")


class PlanManifest(FrozenModel):
    """What ``manifest.json`` holds: file name -> sha256 (hex)."""

    format_version: int = MANIFEST_VERSION
    checked: dict[str, str]
    recorded: dict[str, str] = {}


def write_manifest(directory: Path, checked: Iterable[str], recorded: Iterable[str]) -> PlanManifest:
    """Hash the named files of ``directory`` (already written) and write ``manifest.json``."""
    manifest = PlanManifest(
        checked={name: sha256_file(directory / name) for name in checked},
        recorded={name: sha256_file(directory / name) for name in recorded if (directory / name).is_file()},
    )
    (directory / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: Path) -> PlanManifest | str:
    """The manifest of ``directory``, or a sentence saying why there is none to trust."""
    file = directory / MANIFEST_FILE
    if not file.is_file():
        return (f"it has no {MANIFEST_FILE} (the plan was saved by a pipec older than the manifest, "
                "or the file was deleted), so its files cannot be checked against what pipec wrote")
    try:
        return PlanManifest.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        return f"its {MANIFEST_FILE} is damaged ({first}), so its files cannot be checked"


def manifest_problems(directory: Path) -> list[str]:
    """Every way ``directory`` differs from its manifest, one phrase each (empty: it matches).

    Reads and hashes files; imports nothing.
    """
    manifest = read_manifest(directory)
    if isinstance(manifest, str):
        return [manifest]
    if manifest.format_version != MANIFEST_VERSION:
        return [f"its {MANIFEST_FILE} has format_version {manifest.format_version!r}, this pipec reads "
                f"format_version {MANIFEST_VERSION}"]
    changed, missing = [], []
    for name, digest in manifest.checked.items():
        # a name is a plain file name: never follow a path out of the plan directory
        file = directory / name
        if Path(name).name != name or not file.is_file():
            missing.append(name)
        elif sha256_file(file) != digest:
            changed.append(name)
    listed = set(manifest.checked) | set(manifest.recorded) | {MANIFEST_FILE}
    extra = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and p.name not in listed and _PLAN_LIKE.match(p.name))
    problems = []
    if changed:
        problems.append(f"changed since pipec wrote it: {', '.join(changed)}")
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if extra:
        problems.append(f"not written by pipec with this plan (remove it): {', '.join(extra)}")
    return problems


__all__ = ["MANIFEST_FILE", "PlanManifest", "manifest_problems", "read_manifest", "write_manifest"]
