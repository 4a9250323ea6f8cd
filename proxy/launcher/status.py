"""The launcher's state as data: what the proxy, metrics and `airgate status` read.

The supervisor owns the state and publishes an immutable `LauncherStatus`; other processes
(`airgate status`, a proxy in a separate unit) read the same data from a small JSON state file,
written atomically so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("airgate.launcher")

STARTING: Final = "starting"
LOADING: Final = "loading"
READY: Final = "ready"
BACKOFF: Final = "backoff"
FATAL: Final = "fatal"
STOPPING: Final = "stopping"
STOPPED: Final = "stopped"
STATES: Final = (STARTING, LOADING, READY, BACKOFF, FATAL, STOPPING, STOPPED)


@dataclass(frozen=True, slots=True)
class LauncherStatus:
    state: str = STOPPED
    progress: float | None = None  # 0..1 load progress, when vLLM's output tells it
    message: str = ""
    since: float = 0.0  # time.time() of the last state change
    restarts: int = 0
    last_exit_code: int | None = None
    last_exit_reason: str = ""
    time_to_ready: float | None = None  # seconds from launch to ready, of the last ready run
    health_latency: float | None = None  # seconds, of the last /health probe that answered
    retry_after: int = 30  # seconds a client should wait before retrying (Retry-After, 1..30)
    # For `airgate status`: when the current run started and became ready (time.time()), who.
    started_at: float | None = None
    ready_at: float | None = None
    runtime: str = ""
    model: str = ""
    child: str = ""  # container name or process id
    pid: int = field(default_factory=os.getpid)  # the launcher's own process

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LauncherStatus:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def clamp_retry_after(seconds: float) -> int:
    return max(1, min(30, round(seconds)))


def retry_after(status: LauncherStatus, backoff_left: float) -> int:
    """Seconds a client should wait before trying again (the proxy's 503 Retry-After): about
    when vLLM may be ready, capped at 30 s so that an OpenAI SDK (which honours values below
    60 s) retries instead of giving up."""
    if status.state == READY:
        return 1
    if status.state in (STARTING, LOADING):
        progress, started = status.progress, status.started_at
        if progress and progress > 0.05 and started:
            elapsed = time.time() - started  # remaining = elapsed * (1 - p) / p
            return clamp_retry_after(elapsed * (1 - progress) / progress)
        return 10
    if status.state == BACKOFF:
        return clamp_retry_after(backoff_left + 1)  # +1: the start itself takes a moment
    return 30


def write_state_file(path: str, status: LauncherStatus, extra: dict[str, Any]) -> None:
    """Write status (plus `extra`, e.g. the child's pid) to `path` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {**status.to_json(), **extra}
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
            file.write("\n")
        # mkstemp makes the file 0600; the state holds no secret and `airgate status` may run as
        # another user than the launcher.
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_state_file(path: str) -> dict[str, Any] | None:
    """The state file's data, or None when there is none (never started, or removed)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class StatusBoard:
    """The current LauncherStatus, and everyone told of each change: listeners (sd_notify,
    metrics) and the state file (`airgate status`, a proxy in another process)."""

    def __init__(self, state_file: str, status: LauncherStatus) -> None:
        self._state_file = state_file
        self._status = status
        self._listeners: list[Callable[[LauncherStatus], None]] = []
        self._backoff_until = 0.0  # time.monotonic() when a backoff ends
        self._child_pid: int | None = None  # written to the state file, to find it again
        self._state_file_error = ""

    def status(self) -> LauncherStatus:
        """The current status; cheap enough to call per request."""
        status = self._status
        if status.state == BACKOFF:  # the only value that moves between state changes
            left = self._backoff_until - time.monotonic()
            return replace(status, retry_after=retry_after(status, left))
        return status

    def add_listener(self, callback: Callable[[LauncherStatus], None]) -> None:
        """`callback(status)`, in the loop, after every change of state, message or progress."""
        self._listeners.append(callback)

    def _publish(self, state: str, message: str, **changes: Any) -> None:
        old = self._status
        since = time.time() if state != old.state else old.since
        status = replace(old, state=state, message=message, since=since, **changes)
        left = self._backoff_until - time.monotonic()
        self._status = status = replace(status, retry_after=retry_after(status, left))
        if state != old.state:
            log.info("launcher %s: %s", state, message)
        try:
            write_state_file(self._state_file, status, {"child_pid": self._child_pid})
            self._state_file_error = ""
        except OSError as error:
            if str(error) != self._state_file_error:  # once, not at every progress step
                log.warning("cannot write the state file %s (airgate status will not see this "
                            "launcher): %s", self._state_file, error)
                self._state_file_error = str(error)
        for callback in list(self._listeners):
            try:
                callback(self.status())
            except Exception:
                log.exception("launcher status listener failed")
