"""The command line a new operator meets first: every argument explained, and the first
install step failing with a fix instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import COMMANDS, build_parser


def airgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, check=False, timeout=60)


def test_token_new_into_a_missing_directory_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "etc-airgate" / "tokens"
    result = airgate("token", "new", "kibana", "--file", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "install -d" in result.stderr
    assert result.stdout == "" and not path.exists()  # no token printed that was not stored


def _actions(parser: object) -> list[object]:
    return list(getattr(parser, "_actions", []))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_argument_has_help(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in _actions(parser) if getattr(a, "choices", None))
    parsers = [getattr(sub, "choices")[command]]  # noqa: B009 - argparse has no public API
    while parsers:
        current = parsers.pop()
        for action in _actions(current):
            if getattr(action, "dest", "") == "help":
                continue
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # nested sub-commands (token new)
                parsers.extend(choices.values())
                continue
            name = getattr(action, "option_strings", None) or getattr(action, "dest", "")
            assert getattr(action, "help", None), f"airgate {command}: {name} has no help text"
