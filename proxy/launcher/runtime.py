"""Adapters that run vLLM: a docker/podman container, or a plain process.

Both speak through `asyncio.create_subprocess_exec` (never a shell: no quoting bugs, no
injection through a model name). A container runs detached (`run -d`) so that it outlives an
airgate that is killed: the next airgate finds it by name and adopts it if its configuration
label matches, which saves a model reload. A process runs in its own process group, so stopping
it reaches vLLM's worker processes too, and dies with airgate (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.launcher.command import CONFIG_LABEL, LaunchCommand

_NEWLINES = re.compile(rb"\r\n|\r|\n")  # tqdm redraws its bar with \r
_MAX_LINE = 16 * 1024


@dataclass(frozen=True)
class ExitInfo:
    code: int | None
    oom_killed: bool = False


@dataclass(frozen=True)
class Existing:
    """A container (or process) left from an earlier launch."""

    ident: str
    running: bool
    config_hash: str
    status: str


class StartFailed(Exception):
    """The runtime refused to start the child (e.g. `docker run` exited 125)."""

    def __init__(self, code: int | None, output: list[str]) -> None:
        super().__init__(f"start failed with status {code}")
        self.code = code
        self.output = output


async def read_lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Lines of a child's output, split on \\n and \\r, overlong lines cut."""
    buffer = b""
    while chunk := await stream.read(65536):
        parts = _NEWLINES.split(buffer + chunk)
        buffer = parts.pop()
        if len(buffer) > _MAX_LINE:
            parts.append(buffer[:_MAX_LINE])
            buffer = b""
        for part in parts:
            if part:
                yield part.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


async def run_quiet(*argv: str, limit: float = 30.0) -> tuple[int, str]:
    """Run a short command; (exit status, stdout+stderr). A hung command is killed."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
    except OSError as error:
        return 127, f"{argv[0]}: {error.strerror}"
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"{argv[0]} {argv[1] if len(argv) > 1 else ''} did not answer in {limit:g} s"
    except asyncio.CancelledError:  # e.g. a stop during a long `docker run`: leave no CLI behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return proc.returncode or 0, out.decode("utf-8", "replace")


class Child(ABC):
    """One running vLLM: its output, its end, and how to stop it."""

    ident: str

    @abstractmethod
    def lines(self) -> AsyncIterator[str]: ...

    @abstractmethod
    async def wait(self) -> ExitInfo: ...

    @abstractmethod
    async def stop(self, grace: float) -> None:
        """Ask it to stop, force it after `grace` seconds; returns once it has ended."""

    @abstractmethod
    async def remove(self) -> None:
        """Remove what is left (the exited container, stray worker processes)."""


class Runtime(ABC):
    name: str

    @abstractmethod
    async def find_existing(self, cmd: LaunchCommand) -> Existing | None: ...

    @abstractmethod
    async def remove_existing(self, existing: Existing, grace: float) -> None: ...

    @abstractmethod
    async def start(self, cmd: LaunchCommand) -> Child: ...

    @abstractmethod
    async def adopt(self, existing: Existing) -> Child: ...

    @abstractmethod
    async def discard(self) -> None:
        """Remove what an interrupted start may have left."""


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
        await run_quiet(self._runtime.binary, "stop", "-t", str(round(grace)),
                        self._runtime.container, limit=grace + 30)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._waiter.wait(), 10)

    async def remove(self) -> None:
        await run_quiet(self._runtime.binary, "rm", "-f", self._runtime.container)
        for helper in (self._logs, self._waiter):
            if helper.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    helper.kill()
                await helper.wait()


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
            await run_quiet(self.binary, "stop", "-t", str(round(grace)), self.container,
                            limit=grace + 30)
        await run_quiet(self.binary, "rm", "-f", self.container)

    async def discard(self) -> None:
        await run_quiet(self.binary, "rm", "-f", self.container)

    async def start(self, cmd: LaunchCommand) -> Child:
        env_file = None
        argv = cmd.argv
        if cmd.secret_env:
            self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.secrets_dir, 0o700)
            fd, env_file = tempfile.mkstemp(dir=self.secrets_dir, prefix="vllm-", suffix=".env")
            with os.fdopen(fd, "w", encoding="utf-8") as file:  # mkstemp: mode 0600
                file.write(cmd.env_file_content())
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


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function that makes the kernel SIGTERM the child when airgate dies, so that
    even a SIGKILLed airgate leaves no vLLM behind holding the GPUs and the port."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no imports in the child
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # airgate died between fork and prctl
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


async def _wait_foreign(pid: int, limit: float) -> None:
    """Wait up to `limit` seconds for a process that is not our child to end (a pidfd becomes
    readable when it does; there is no wait() for another parent's process)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # kernel before 5.3
        await asyncio.sleep(limit)
        return
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(fd, ended.set)
    try:
        await asyncio.wait_for(ended.wait(), limit)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class ProcessChild(Child):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.ident = str(proc.pid)
        self._proc = proc

    async def lines(self) -> AsyncIterator[str]:
        assert self._proc.stdout is not None
        async for line in read_lines(self._proc.stdout):
            yield line

    async def wait(self) -> ExitInfo:
        code = await self._proc.wait()
        # asyncio says -9 for "killed by SIGKILL"; report 137 as docker and shells do, so the
        # same status means the same thing whatever the runtime.
        return ExitInfo(128 - code if code < 0 else code)

    async def stop(self, grace: float) -> None:
        # The group id is the child's pid (start_new_session); signalling the group reaches
        # vLLM's engine and tensor-parallel workers as well.
        _signal_group(self._proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), grace)
        except TimeoutError:
            _signal_group(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()

    async def remove(self) -> None:
        _signal_group(self._proc.pid, signal.SIGKILL)  # workers that outlived the main process


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, previous_pid: int | None = None) -> None:
        self.previous_pid = previous_pid

    async def find_existing(self, cmd: LaunchCommand) -> Existing | None:
        # A process of an airgate that was killed (its pid is in the state file). It is only
        # treated as ours if its command line is the one we would run: pids get reused.
        pid = self.previous_pid
        if not pid or _cmdline(pid) != list(cmd.argv):
            return None
        # Its output cannot be re-attached, so it is never adopted: config_hash stays empty.
        return Existing(str(pid), True, "", "running")

    async def remove_existing(self, existing: Existing, grace: float) -> None:
        pid = int(existing.ident)
        _signal_group(pid, signal.SIGTERM)
        await _wait_foreign(pid, grace)
        _signal_group(pid, signal.SIGKILL)

    async def discard(self) -> None:
        pass  # a process start cannot be half done

    async def start(self, cmd: LaunchCommand) -> Child:
        env = {**os.environ, **cmd.env, **cmd.secret_env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent())
        except OSError as error:
            raise StartFailed(127, [f"{cmd.argv[0]}: {error.strerror}"]) from error
        return ProcessChild(proc)

    async def adopt(self, existing: Existing) -> Child:
        raise NotImplementedError("a process is never adopted")
