"""README's CLI reference names every `pipec` subcommand and every flag of each."""

from __future__ import annotations

from pathlib import Path

from pipec.cli import command_flags

README = Path(__file__).resolve().parents[2] / "README.md"


def _cli_reference() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## CLI reference")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_documents_every_subcommand_and_flag() -> None:
    reference = _cli_reference()
    commands = command_flags()
    missing = {f"pipec {flag}" for flag in commands.pop("") if flag not in reference}
    assert {"partition", "show", "run", "calibrate"} <= set(commands)  # the subcommands are there to check
    assert "--stages" in commands["partition"] and "--debug" not in commands["partition"]
    for name, flags in commands.items():
        if f"pipec {name}" not in reference:
            missing.add(f"pipec {name}")
        # the command's block: from its "pipec NAME" line to the next "pipec ..." line
        start = reference.find(f"\npipec {name}")
        end = reference.find("\npipec ", start + 1)
        section = reference[start:end] if start >= 0 else ""
        missing |= {f"pipec {name} {flag}" for flag in flags if flag not in section}
    assert not missing, f"README's CLI reference lacks {sorted(missing)}"
    assert "source .venv/bin/activate" in reference and ".venv/bin/pipec" in reference
