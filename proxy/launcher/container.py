"""docker and podman: run vLLM as a detached container, follow it, stop it, adopt it.

The container runs detached (`run -d`) so that it outlives an airgate that is killed: the next
airgate finds it by name and adopts it if its configuration label matches, which saves a model
reload. Its output comes from `logs -f`, its exit status from `wait`, its OOM flag from `inspect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from proxy.launcher.command import CONFIG_LABEL, LaunchCommand, LaunchError
from proxy.launcher.runtime import (
    Child,
    Existing,
    ExitInfo,
    Runtime,
    StartFailed,
    read_lines,
    run_quiet,
)


class ContainerChild(Child):
    def __init__(self, runtime: ContainerRuntime, logs: asyncio.subprocess.Process,
                 waiter: asyncio.subprocess.Process) -> None:
        self.ident = runtime.container
        self._runtime = runtime
        self._logs = logs
        self._waiter = waiter
        self._exit: ExitInfo | None = None

    async def lines(self) -> AsyncIterator[str]:
        assert self._logs.stdout is not None
        async for line in read_lines(self._logs.stdout):
            yield line

    async def wait(self) -> ExitInfo:
        if self._exit is None:
            assert self._waiter.stdout is not None
            out = (await self._waiter.stdout.read()).decode().strip()
            await self._waiter.wait()
            code = int(out) if out.lstrip("-").isdigit() else None
            state = await self._runtime.inspect()
            oom = bool(state and state.get("State", {}).get("OOMKilled"))
            if code is None and state:  # `wait` itself failed (daemon restarted?)
                code = state.get("State", {}).get("ExitCode")
            self._exit = ExitInfo(code, oom)
        return self._exit

    async def stop(self, grace: float) -> None:
        await run_quiet(self._runtime.binary, "stop", "-t", str(math.ceil(grace)),
                        self._runtime.container, limit=grace + 30)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._waiter.wait(), 10)

    async def remove(self) -> None:
        await run_quiet(self._runtime.binary, "rm", "-f", self._runtime.container)
        await self.detach()

    async def detach(self) -> bool:
        for helper in (self._logs, self._waiter):
            if helper.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    helper.kill()
                await helper.wait()
        return True


class ContainerRuntime(Runtime):
    """docker or podman: the same verbs, flags differ only in how GPUs are named."""

    def __init__(self, name: str, binary: str, container: str, secrets_dir: Path,
                 run_timeout: float = 600.0) -> None:
        self.name = name
        self.binary = binary
        self.container = container
        self.secrets_dir = secrets_dir
        self.run_timeout = run_timeout  # `run` may pull the image when not offline

    async def inspect(self) -> dict[str, Any] | None:
        status, out = await run_quiet(self.binary, "inspect", "--type", "container",
                                      self.container)
        if status != 0:
            return None
        try:
            data = json.loads(out)
        except ValueError:
            return None
        return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None

    async def find_existing(self, cmd: LaunchCommand) -> Existing | None:
        data = await self.inspect()
        if data is None:
            return None
        state = data.get("State")
        config = data.get("Config")
        state = state if isinstance(state, dict) else {}
        labels = config.get("Labels") if isinstance(config, dict) else None
        label = labels.get(CONFIG_LABEL, "") if isinstance(labels, dict) else ""
        return Existing(self.container, bool(state.get("Running")), str(label or ""),
                        str(state.get("Status", "")))

    async def remove_existing(self, existing: Existing, grace: float) -> None:
        if existing.running:
            await run_quiet(self.binary, "stop", "-t", str(math.ceil(grace)), self.container,
                            limit=grace + 30)
        await run_quiet(self.binary, "rm", "-f", self.container)

    async def discard(self) -> None:
        await run_quiet(self.binary, "rm", "-f", self.container)

    async def start(self, cmd: LaunchCommand) -> Child:
        env_file = None
        argv = cmd.argv
        if cmd.secret_env:
            env_file = self._write_env_file(cmd)
            argv = cmd.argv_with_env_file(env_file)
        try:
            status, out = await run_quiet(*argv, limit=self.run_timeout)
        finally:
            # The CLI copies the variables into the container's configuration when it creates
            # the container, so the file is not needed one moment longer.
            if env_file:
                with contextlib.suppress(OSError):
                    os.unlink(env_file)
        if status != 0:
            raise StartFailed(status, out.splitlines())
        return await self._follow(tail=None)

    def _write_env_file(self, cmd: LaunchCommand) -> str:
        try:
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.secrets_dir, 0o700)  # an existing directory may have been wider
            fd, path = tempfile.mkstemp(dir=self.secrets_dir, prefix="vllm-", suffix=".env")
            with os.fdopen(fd, "w", encoding="utf-8") as file:  # mkstemp: mode 0600
                file.write(cmd.env_file_content())
        except OSError as error:
            raise LaunchError(f"cannot write the env file in {self.secrets_dir}: "
                              f"{error.strerror}: make the directory of launcher.state_file "
                              f"writable for the user airgate runs as") from error
        return path

    async def adopt(self, existing: Existing) -> Child:
        # Enough of the past output to read the load progress of a container still loading.
        return await self._follow(tail=200)

    async def _follow(self, tail: int | None) -> ContainerChild:
        tail_args = ["--tail", str(tail)] if tail is not None else []
        logs = await asyncio.create_subprocess_exec(
            self.binary, "logs", "-f", *tail_args, self.container,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        waiter = await asyncio.create_subprocess_exec(
            self.binary, "wait", self.container, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        return ContainerChild(self, logs, waiter)
