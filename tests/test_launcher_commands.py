"""`airgate launch` (with --print) and `airgate status`, as an operator runs them."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime.harness import API_KEY, HF_TOKEN, free_port, seed_hf_cache

from proxy.launcher.commands import launch_main, status_main
from proxy.launcher.status import read_state_file

SIMULATOR = [sys.executable, "-m", "proxy.simulator"]


def write_config(tmp_path: Path, **launcher: Any) -> Path:
    (tmp_path / "api_key").write_text(API_KEY + "\n")
    (tmp_path / "hf_token").write_text(HF_TOKEN + "\n")
    (tmp_path / "cache").mkdir(exist_ok=True)
    seed_hf_cache(tmp_path / "cache", launcher.get("model", "mistralai/Test"))
    values: dict[str, Any] = {
        "runtime": "process", "vllm_command": SIMULATOR, "model": "mistralai/Test",
        "port": free_port(), "hf_cache": "cache", "api_key_file": "api_key",
        "hf_token_file": "hf_token", "state_file": "run/launcher.json",
        "extra_args": ["--load-seconds", "0.2"], "health_interval": 0.05, "stop_timeout": 5,
    }
    values.update(launcher)
    lines = ["[launcher]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars and lists are TOML too
    path = tmp_path / "airgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def args(config: Path, print_only: bool = False) -> argparse.Namespace:
    return argparse.Namespace(config=config, print_only=print_only)


def test_print_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, runtime="docker", runtime_command="", preset="mistral",
                          extra_args=["--max-model-len", "32768"])
    assert launch_main(args(config, print_only=True)) == 0
    out = capsys.readouterr().out
    assert API_KEY not in out and HF_TOKEN not in out
    assert " run -d \\\n    --name airgate-vllm \\\n" in out
    assert f"    -v {tmp_path / 'cache'}:/root/.cache/huggingface \\\n" in out
    assert "    --tool-call-parser mistral \\\n" in out
    assert "    --max-model-len 32768\n" in out
    assert "env file (mode 0600, deleted once read): VLLM_API_KEY=*** HF_TOKEN=*** " \
           "HUGGING_FACE_HUB_TOKEN=***" in out


def test_print_without_readable_secrets(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, api_key_file="missing")
    assert launch_main(args(config, print_only=True)) == 0
    captured = capsys.readouterr()
    assert "environment (secret): VLLM_API_KEY=***" in captured.out
    assert "launcher.api_key_file" in captured.err


def test_bad_config_and_missing_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch_main(args(tmp_path / "nope.toml")) == 2
    assert "not found" in capsys.readouterr().err
    config = write_config(tmp_path, preset="qwen")
    assert launch_main(args(config, print_only=True)) == 2
    assert "launcher.preset 'qwen' is unknown" in capsys.readouterr().err
    assert status_main(args(config)) == 3
    assert "no state in" in capsys.readouterr().out


class Launcher:
    """`airgate launch` in its own process, its log read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, notify: NotifySocket) -> None:
        self.proc = proc
        self.notify = notify
        self.log: list[str] = []

    async def until_logged(self, text: str, limit: float = 20.0) -> None:
        assert self.proc.stderr is not None
        async with asyncio.timeout(limit):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, f"launcher exited before logging {text!r}: {self.log}"
                self.log.append(line)
                if text in line:
                    return


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: the datagrams sd_notify sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self._arrived = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.sock, self._read)

    def _read(self) -> None:
        self.messages.append(self.sock.recv(4096).decode())
        self._arrived.set()

    async def until(self, text: str, limit: float = 10.0) -> None:
        async with asyncio.timeout(limit):
            while not any(text in message for message in self.messages):
                self._arrived.clear()
                await self._arrived.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock)
        self.sock.close()


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[tuple[Launcher, Path]]:
    config = write_config(tmp_path)
    notify = NotifySocket(tmp_path / "notify")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "launch", "--config", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    launcher = Launcher(proc, notify)
    try:
        yield launcher, config
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notify.close()


async def status_of(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "status", "--config", str(config),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def wait_gone(pid: int, limit: float = 10.0) -> None:
    """A process that is not our child has ended (its pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        await asyncio.wait_for(gone.wait(), limit)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_launch_status_and_sigterm(launcher: tuple[Launcher, Path]) -> None:
    proc, config = launcher
    await proc.until_logged("launcher ready: ready")
    code, text = await status_of(config)
    assert code == 0, text
    assert text.startswith("state:    ready since")
    assert "model:    mistralai/Test (process, " in text and "restarts: 0" in text
    assert any("Loading safetensors checkpoint shards" in line and "airgate.vllm" in line
               for line in proc.log)
    state = read_state_file(str(config.parent / "run" / "launcher.json"))
    assert state is not None
    child = state["child_pid"]
    await proc.notify.until("STATUS=vLLM ready: ready")
    assert proc.notify.messages[0] == "READY=1"
    assert any(m.startswith("STATUS=vLLM loading: loading model (") for m in proc.notify.messages)
    proc.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.proc.wait(), 15) == 0
    assert "STOPPING=1" in proc.notify.messages
    assert proc.notify.messages[-1] == "STATUS=vLLM stopped: stopped"
    await wait_gone(child)
    code, text = await status_of(config)
    assert code == 3 and text.startswith("state:    stopped")


async def test_reload_and_log_signals_do_not_stop_the_launcher(
    launcher: tuple[Launcher, Path]
) -> None:
    # `systemctl reload`/logrotate aimed at the wrong unit must not take the model down.
    proc, config = launcher
    await proc.until_logged("launcher ready: ready")
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        proc.proc.send_signal(signum)
        await proc.until_logged(f"{signal.Signals(signum).name}: the launcher has nothing")
    assert proc.proc.returncode is None
    code, text = await status_of(config)
    assert code == 0 and text.startswith("state:    ready since"), text


async def test_a_killed_launcher_leaves_no_vllm_behind(launcher: tuple[Launcher, Path]) -> None:
    proc, config = launcher
    await proc.until_logged("launcher ready: ready")
    state = read_state_file(str(config.parent / "run" / "launcher.json"))
    assert state is not None
    proc.proc.kill()  # no chance to clean up: the kernel's PR_SET_PDEATHSIG does it
    await proc.proc.wait()
    await wait_gone(state["child_pid"])
    code, text = await status_of(config)
    assert code == 3 and "launcher: not running" in text


async def test_launch_exits_non_zero_when_it_gives_up(tmp_path: Path) -> None:
    config = write_config(tmp_path, vllm_command=[sys.executable, "-c", "raise SystemExit(3)"],
                          max_quick_failures=1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "launch", "--config", str(config),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"launcher fatal: gave up after 1 failures in a row" in err
