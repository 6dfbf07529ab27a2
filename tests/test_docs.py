"""The commands the README and the user guide show still exist: every `dlpipe ...` line parses
with the CLI's own parser, and every `make <target>` names a target of the Makefile."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dlpipe.cli import parse_args

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(tool: str) -> list[tuple[str, str]]:
    """(page, command line) for each line of a code block that runs `tool`."""
    found = []
    for page in PAGES:
        blocks = re.findall(r"```(?:bash)?\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
        for block in blocks:
            for line in block.splitlines():
                command = line.split(" #")[0].strip()
                if command.startswith(f"{tool} "):
                    found.append((page.name, command))
    return found


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))


def test_the_pages_show_commands_at_all() -> None:
    assert len(shown_commands("dlpipe")) >= 5 and len(shown_commands("make")) >= 5


@pytest.mark.parametrize(("page", "command"), shown_commands("dlpipe"))
def test_every_dlpipe_command_shown_parses(page: str, command: str) -> None:
    args = parse_args(shlex.split(command)[1:])
    assert args.handler is not None, f"{page}: {command}"


@pytest.mark.parametrize(("page", "command"), shown_commands("make"))
def test_every_make_target_shown_exists(page: str, command: str) -> None:
    target = shlex.split(command)[1]
    assert target in make_targets(), f"{page}: `{command}`: no such Makefile target"
