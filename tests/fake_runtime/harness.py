"""Test helpers for the launcher: the stand-in docker/podman, settings, and waiting on states."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.launcher.status import LauncherStatus
from proxy.launcher.supervisor import Supervisor
from proxy.settings import LauncherSettings

HERE = Path(__file__).resolve().parent
API_KEY = "sk-test-api-key-0123456789"
HF_TOKEN = "hf_test_token_abcdefghijkl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FakeRuntime:
    """One test's stand-in container engine: its recorded calls and container state."""

    root: Path
    bin_dir: Path = field(init=False)
    state: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.bin_dir = self.root / "bin"
        self.state = self.root / "state"
        self.log = self.root / "calls.jsonl"
        self.bin_dir.mkdir(parents=True)
        self.state.mkdir()

    def binary(self, name: str = "docker") -> str:
        return str(HERE / name)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()]

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def verbs(self) -> list[str]:
        return [call[0] for call in self.calls()]

    def plan(self, runs: list[dict[str, Any]]) -> None:
        (self.state / "plan.json").write_text(json.dumps(runs))

    def container(self, name: str) -> dict[str, Any] | None:
        path = self.state / "containers" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def fake_tool(self, name: str, script: str) -> None:
        """A stand-in command on PATH (e.g. nvidia-smi): a shell script."""
        path = self.bin_dir / name
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(0o755)

    def kill_all(self) -> None:
        """Teardown safety net: no simulator outlives a test, whatever it asserted."""
        for path in (self.state / "containers").glob("*.json") if self.state.exists() else []:
            with contextlib.suppress(ValueError, OSError):
                pid = json.loads(path.read_text()).get("pid")
                if pid and pid > 0:
                    os.kill(pid, signal.SIGKILL)


def install_fake_runtime(tmp_path: Path, monkeypatch: Any) -> FakeRuntime:
    fake = FakeRuntime(tmp_path / "fake")
    monkeypatch.setenv("FAKE_RUNTIME_STATE", str(fake.state))
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_RUNTIME_PYTHON", sys.executable)
    # The fake's `#!/usr/bin/env python3` must find this interpreter; fake tools come first.
    path = os.pathsep.join([str(fake.bin_dir), str(Path(sys.executable).parent),
                            os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    for name in ("FAKE_RUNTIME_BROKEN", "FAKE_RUNTIME_MISSING_IMAGES", "FAKE_RUNTIME_EXIT_CODE",
                 "FAKE_RUNTIME_EXIT_AFTER", "FAKE_RUNTIME_EXIT_LOG", "FAKE_RUNTIME_LOAD_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    return fake


def seed_hf_cache(cache: Path, model: str) -> None:
    """Lay `model` out in the Hugging Face cache as a download would (blob, snapshot link,
    refs/main), so the launcher's offline pre-start check finds it."""
    if "/" not in model or Path(model).is_absolute():
        return
    repo = cache / "hub" / ("models--" + model.replace("/", "--"))
    content = b'{"architectures": ["LlamaForCausalLM"]}'
    blob = hashlib.sha256(content).hexdigest()
    revision = hashlib.sha1(model.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / blob).write_bytes(content)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    link = snapshot / "config.json"
    if not link.is_symlink():
        link.symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def make_settings(tmp_path: Path, fake: FakeRuntime | None = None, *,
                  seed_cache: bool = True, **overrides: Any) -> LauncherSettings:
    """Launcher settings for a test: fast intervals, a free port, secrets in files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "api_key").write_text(API_KEY + "\n")
    (secrets / "hf_token").write_text(HF_TOKEN + "\n")
    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    if seed_cache:  # as if the model had been downloaded (or unbundled) already
        seed_hf_cache(cache, overrides.get("model", "mistralai/Test-Model"))
    runtime = overrides.get("runtime", "docker")
    values: dict[str, Any] = {
        "runtime": runtime,
        "runtime_command": fake.binary(runtime) if fake and runtime != "process" else "",
        "model": "mistralai/Test-Model",
        "preset": "mistral",
        "port": free_port(),
        "hf_cache": str(cache),
        "api_key_file": str(secrets / "api_key"),
        "hf_token_file": str(secrets / "hf_token"),
        "container_name": f"airgate-test-{uuid.uuid4().hex[:8]}",
        "state_file": str(tmp_path / "run" / "launcher.json"),
        "start_timeout": 20.0,
        "stop_timeout": 3.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "stable_after": 60.0,
        "max_quick_failures": 3,
        "health_interval": 0.05,
    }
    values.update(overrides)
    return LauncherSettings(**values)


class Watch:
    """Every status a supervisor publishes, and a way to await the next one of a state."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.history: list[LauncherStatus] = []
        self._cursor = 0
        self._changed = asyncio.Event()
        supervisor.add_listener(self._on_change)

    def _on_change(self, status: LauncherStatus) -> None:
        self.history.append(status)
        self._changed.set()

    async def until(self, state: str | Callable[[LauncherStatus], bool],
                    limit: float = 20.0) -> LauncherStatus:
        """The next published status (after the last one returned) that matches."""
        def match(status: LauncherStatus) -> bool:
            return status.state == state if isinstance(state, str) else state(status)

        async with asyncio.timeout(limit):
            while True:
                while self._cursor < len(self.history):
                    status = self.history[self._cursor]
                    self._cursor += 1
                    if match(status):
                        return status
                self._changed.clear()
                await self._changed.wait()

    def states(self) -> list[str]:
        """The sequence of states, each change once."""
        seen: list[str] = []
        for status in self.history:
            if not seen or seen[-1] != status.state:
                seen.append(status.state)
        return seen


@dataclass
class Running:
    supervisor: Supervisor
    watch: Watch
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def finish(self, limit: float = 20.0) -> None:
        self.stop.set()
        async with asyncio.timeout(limit):
            await self.task


@contextlib.asynccontextmanager
async def supervise(settings: LauncherSettings, **options: Any) -> AsyncIterator[Running]:
    supervisor = Supervisor(settings, **options)
    watch = Watch(supervisor)
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(stop))
    running = Running(supervisor, watch, stop, task)
    try:
        yield running
    finally:
        if not task.done():
            await running.finish()
