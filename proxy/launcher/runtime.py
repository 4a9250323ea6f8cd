"""What the supervisor needs from a way of running vLLM, and helpers the adapters share.

Two adapters implement it: `container` (docker, podman) and `process` (a plain `vllm serve`).
Both speak through `asyncio.create_subprocess_exec`, never a shell: no quoting bugs, and no
injection through a model name.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy.launcher.command import LaunchCommand

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
        await proc.wait()
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

    async def detach(self) -> bool:
        """Stop following it but leave it running, for the next airgate to adopt; False when
        this runtime cannot (a process dies with airgate)."""
        return False


class Runtime(ABC):
    name: str
    binary: str = ""  # the docker/podman executable

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
