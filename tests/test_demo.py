"""`airgate demo` (what `make run` runs), tried as a new user would: paste its commands."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--port", "0"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # printed once listening; "Press Ctrl-C to stop." comes last
        lines.append(line)
        if line.startswith("Press Ctrl-C to stop."):
            break
    yield "".join(lines)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0


def _command(output: str, after: str) -> str:
    """The shell command printed under the heading `after` (backslash continuations joined)."""
    block = output.split(after, 1)[1].split("\n\n", 1)[0]
    return block.strip().replace("\\\n", " ")


def test_demo_prints_commands_that_work(demo: str) -> None:
    assert "token (shown once): ag-" in demo
    plain = subprocess.run(shlex.split(_command(demo, "connector test request:")),
                           capture_output=True, text=True, timeout=30, check=True)
    assert '"usage"' in plain.stdout and '"role":"assistant"' in plain.stdout
    streamed = subprocess.run(shlex.split(_command(demo, "(tokens arrive as they are generated):")),
                              capture_output=True, text=True, timeout=30, check=True)
    assert streamed.stdout.count("data: ") > 10 and streamed.stdout.rstrip().endswith("[DONE]")
    python = subprocess.run(shlex.split(_command(demo, "Python (openai SDK):")),
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert python.returncode == 0, python.stderr
    assert "simulated model" in python.stdout  # the stand-in vLLM's answer
    metrics_url = re.search(r"curl (http://127\.0\.0\.1:\d+/metrics)", demo)
    assert metrics_url is not None
    scraped = subprocess.run(["curl", "-sS", metrics_url.group(1)], capture_output=True,
                             text=True, timeout=30, check=True)
    assert "airgate_" in scraped.stdout


def test_press_ctrl_c_is_the_last_line(demo: str) -> None:
    lines = [line for line in demo.splitlines() if line.strip()]
    assert lines[-1] == "Press Ctrl-C to stop."
    assert lines[-3].startswith("Metrics (Prometheus): curl http://127.0.0.1:")
    assert lines[-2].startswith("Access log: below")
