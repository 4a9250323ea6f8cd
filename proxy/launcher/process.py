"""A plain `vllm serve` process: no container, the secrets in its environment.

It runs in its own process group, so that stopping it reaches vLLM's engine and tensor-parallel
worker processes too, and the kernel sends it SIGTERM if airgate dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from proxy.launcher.command import LaunchCommand
from proxy.launcher.runtime import Child, Existing, ExitInfo, Runtime, StartFailed, read_lines
from proxy.lifeline import die_with_parent


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


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies do not count: they hold no
    memory, and reaping them is their new parent's business)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ")".
                fields = file.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


async def _group_gone(pgid: int, limit: float = 5.0) -> None:
    """Wait until no process of the group runs: a killed tensor-parallel worker holds its GPU
    memory until it is gone, and the next start would find it taken. A signal is delivered
    asynchronously, and a group offers nothing to wait on, so this polls."""
    for _ in range(int(limit / 0.02)):
        if not _group_alive(pgid):
            return
        await asyncio.sleep(0.02)


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
        await _group_gone(self._proc.pid)


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
        await _group_gone(pid)

    async def discard(self) -> None:
        pass  # a process start cannot be half done

    async def start(self, cmd: LaunchCommand) -> Child:
        env = {**os.environ, **cmd.env, **cmd.secret_env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd.argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent())
        except OSError as error:
            raise StartFailed(127, [f"{cmd.argv[0]}: {error.strerror}"]) from error
        return ProcessChild(proc)

    async def adopt(self, existing: Existing) -> Child:
        raise NotImplementedError("a process is never adopted")
