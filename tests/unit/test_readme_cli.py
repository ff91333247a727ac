"""README's CLI reference names every `pipec` subcommand and every flag of each."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipec.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _cli_reference() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## CLI reference")
    return text[start:text.index("\n## ", start + 1)]


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")}


def test_readme_documents_every_subcommand_and_flag() -> None:
    reference = _cli_reference()
    parser = build_parser()
    missing = {f"pipec {flag}" for flag in _flags(parser) if flag not in reference}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices  # the subcommands are there to check
    for name, subparser in sub.choices.items():
        if f"pipec {name}" not in reference:
            missing.add(f"pipec {name}")
        # the command's block: from its "pipec NAME" line to the next "pipec ..." line
        start = reference.find(f"\npipec {name}")
        end = reference.find("\npipec ", start + 1)
        section = reference[start:end] if start >= 0 else ""
        missing |= {f"pipec {name} {flag}" for flag in _flags(subparser) if flag not in section}
    assert not missing, f"README's CLI reference lacks {sorted(missing)}"
    assert "source .venv/bin/activate" in reference and ".venv/bin/pipec" in reference
