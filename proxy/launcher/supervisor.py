"""The supervisor: start vLLM, wait for it to load, restart it when it dies, stop it cleanly.

An explicit state machine, as supervisord and gunicorn's arbiter keep one:

    starting ─▶ loading ─▶ ready
        │          │         │   (the child exits, or does not load within start_timeout)
        ▼          ▼         ▼
      backoff ◀────┴─────────┘ ─▶ starting …     fatal after max_quick_failures in a row
    any state ─▶ stopping ─▶ stopped             (when the stop event is set)

Readiness is vLLM's own `/health` answering 200: while the model loads vLLM has no HTTP server
at all, so a refused connection means "still loading". A failure is "quick" unless the run had
been ready for stable_after seconds; quick failures double the delay before the next start and,
max_quick_failures in a row, end in `fatal`: a model that cannot load is not retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.launcher import checks
from proxy.launcher.command import LaunchError
from proxy.launcher.container import ContainerRuntime
from proxy.launcher.diagnose import Failure, LoadProgress, explain_exit, log_level
from proxy.launcher.health import probe_health
from proxy.launcher.process import ProcessRuntime
from proxy.launcher.runtime import Child, Runtime, StartFailed
from proxy.launcher.status import (
    BACKOFF,
    FATAL,
    LOADING,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    LauncherStatus,
    StatusBoard,
    read_state_file,
)
from proxy.settings import LauncherSettings

log = logging.getLogger("airgate.launcher")
vllm_log = logging.getLogger("airgate.vllm")


class Supervisor(StatusBoard):
    """Supervises one vLLM as `settings` describe it.

    `run(stop)` supervises until `stop` is set (in `fatal` it waits for that too), then stops
    vLLM and returns. `status()` and `add_listener()` come from StatusBoard.

    `keep_running=True` leaves a container running when stopped, for the next airgate to adopt
    without a model reload (default: the `keep_running_on_exit` setting if there is one, else
    False: nothing is left behind).
    """

    def __init__(self, settings: LauncherSettings, *, keep_running: bool | None = None) -> None:
        self._settings = settings
        self._keep_running = (settings.keep_running_on_exit if keep_running is None
                              else keep_running)
        super().__init__(settings.state_file, LauncherStatus(
            state=STOPPED, message="not started", since=time.time(),
            runtime=settings.runtime, model=settings.model))
        self._progress = LoadProgress()
        self._tail: deque[str] = deque(maxlen=40)  # last output lines, to explain a crash
        self._secrets: tuple[str, ...] = ()
        self._quick_failures = 0
        self._previous_pid: int | None = None

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until `stop` is set, then stop vLLM and return."""
        # The process an airgate that was killed may have left (read before our first write).
        previous = read_state_file(self._settings.state_file) or {}
        pid = previous.get("child_pid") if previous.get("runtime") == "process" else None
        self._previous_pid = pid if isinstance(pid, int) else None
        try:
            while not stop.is_set():
                failure = await self._one_run(stop)
                if failure is None or stop.is_set():
                    break
                delay = self._account(failure)
                if delay is None:
                    await stop.wait()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if not stop.is_set():
                    self._status = replace(self._status, restarts=self._status.restarts + 1)
        finally:
            self._publish(STOPPED, "stopped", progress=None)

    def _account(self, failure: Failure) -> float | None:
        """Count a failure; publish backoff (returns its delay) or fatal (returns None)."""
        s = self._settings
        if failure.ready_for >= s.stable_after:
            self._quick_failures = 0  # it had been serving a good while: start counting anew
            delay = s.backoff_initial
        else:
            self._quick_failures += 1
            delay = min(s.backoff_max, s.backoff_initial * 2 ** (self._quick_failures - 1))
        log.error("vLLM failed: %s", failure.reason)
        details = {"last_exit_code": failure.code, "last_exit_reason": failure.reason,
                   "progress": None, "health_latency": None}
        if self._quick_failures >= s.max_quick_failures:
            self._publish(FATAL, f"gave up after {self._quick_failures} failures in a row "
                                 f"(max_quick_failures); last: {failure.reason}. Fix the cause "
                                 f"and restart airgate", **details)
            return None
        self._backoff_until = time.monotonic() + delay
        self._publish(BACKOFF, f"restarting in {delay:g} s after: {failure.reason}", **details)
        return delay

    def _runtime(self) -> Runtime:
        s = self._settings
        if s.runtime == "process":
            return ProcessRuntime(self._previous_pid)
        secrets_dir = Path(s.state_file).parent / "private"
        return ContainerRuntime(s.runtime, checks.find_binary(s), s.container_name, secrets_dir,
                                run_timeout=max(600.0, s.start_timeout))

    async def _start(self, runtime: Runtime) -> tuple[Child, bool]:
        s = self._settings
        cmd = await checks.check_all(s, runtime.binary)
        # Kept to mask them, should vLLM ever print one into the log.
        self._secrets = tuple(value for value in cmd.secret_env.values() if len(value) >= 4)
        existing = await runtime.find_existing(cmd)
        if existing is not None:
            if existing.running and existing.config_hash == cmd.config_hash:
                log.info("adopting %s %s: it runs with this configuration", runtime.name,
                         existing.ident)
                return await runtime.adopt(existing), True
            why = existing.status if not existing.running else \
                "left by an airgate that was killed" if runtime.name == "process" else \
                "it runs another configuration"
            log.warning("removing stale %s %s (%s)", runtime.name, existing.ident, why)
            await runtime.remove_existing(existing, s.stop_timeout)
        checks.check_port(s.port)
        return await runtime.start(cmd), False

    async def _one_run(self, stop: asyncio.Event) -> Failure | None:
        """Start (or adopt) one vLLM and watch it; None when stopped, else why it ended."""
        self._progress = LoadProgress()
        self._tail.clear()
        self._child_pid = None
        self._publish(STARTING, "checking and starting", progress=None, started_at=None,
                      ready_at=None, health_latency=None, child="")
        stop_task = asyncio.ensure_future(stop.wait())
        try:
            started = await self._start_unless_stopped(stop_task)
            if started is None or isinstance(started, Failure):
                return started
            child, adopted = started
            try:
                return await self._watch(child, adopted, stop_task)
            except Exception as error:  # a bug must not end supervision, nor leave vLLM
                log.exception("supervising vLLM failed")
                await self._stop_child(child)
                return Failure(None, f"launcher error: {error!r}")
            except BaseException:  # cancelled: still leave no vLLM behind
                await self._stop_child(child)
                raise
        finally:
            stop_task.cancel()

    async def _start_unless_stopped(self, stop_task: asyncio.Future[Any],
                                    ) -> tuple[Child, bool] | Failure | None:
        try:
            runtime = self._runtime()
        except LaunchError as error:
            return Failure(None, str(error))
        start = asyncio.ensure_future(self._start(runtime))
        try:
            await asyncio.wait({start, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._abandon(start, runtime)
            raise
        if not start.done() or stop_task.done():  # stopped during checks or a long `run`
            await self._abandon(start, runtime)
            return None
        try:
            child, adopted = start.result()
        except LaunchError as error:
            return Failure(None, str(error))
        except StartFailed as error:
            return Failure(error.code, explain_exit(error.code, error.output))
        except Exception as error:  # a bug must not end supervision: count it as a failure
            log.exception("launching vLLM failed")
            return Failure(None, f"launcher error: {error!r}")
        if isinstance(runtime, ProcessRuntime):
            self._child_pid = int(child.ident)
        return child, adopted

    async def _abandon(self, start: asyncio.Future[tuple[Child, bool]], runtime: Runtime) -> None:
        start.cancel()
        try:
            child, _ = await start
        except (asyncio.CancelledError, LaunchError, StartFailed):
            await runtime.discard()
        else:  # it had just started after all
            await self._stop_child(child)

    async def _watch(self, child: Child, adopted: bool, stop_task: asyncio.Future[Any],
                     ) -> Failure | None:
        s = self._settings
        started = time.monotonic()
        what = "adopted the running container; waiting for /health" if adopted else \
            "loading model"
        self._publish(LOADING, what, started_at=time.time(), child=child.ident)
        reader = asyncio.ensure_future(self._follow(child))
        exited = asyncio.ensure_future(child.wait())
        ready_since: float | None = None
        try:
            while True:
                probe = asyncio.ensure_future(probe_health(s.port, max(2.0, s.health_interval)))
                await asyncio.wait({probe, exited, stop_task},
                                   return_when=asyncio.FIRST_COMPLETED)
                if stop_task.done() or exited.done():
                    probe.cancel()
                    break
                latency = probe.result()
                now = time.monotonic()
                if latency is not None and ready_since is None:
                    ready_since = now
                    self._publish(READY, "ready", progress=1.0, ready_at=time.time(),
                                  time_to_ready=now - started, health_latency=latency)
                elif latency is not None and self._status.message != "ready":
                    log.info("vLLM's /health answers 200 again")
                    self._publish(READY, "ready", health_latency=latency)
                elif latency is not None:
                    self._status = replace(self._status, health_latency=latency)
                elif ready_since is None and now - started > s.start_timeout:
                    await self._stop_child(child)
                    return Failure(None, f"not ready after {s.start_timeout:g} s "
                                          f"(start_timeout) while {self._progress.describe()}: "
                                          f"raise launcher.start_timeout if it was still loading")
                elif ready_since is not None and self._status.message == "ready":
                    log.warning("vLLM's /health stopped answering 200 on port %d", s.port)
                    self._publish(READY, "ready, but /health is failing")
                await asyncio.wait({exited, stop_task}, timeout=s.health_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if stop_task.done() or exited.done():
                    break
            if stop_task.done():
                if self._keep_running and await child.detach():
                    log.info("leaving %s running for the next airgate to adopt", child.ident)
                else:
                    await self._stop_child(child)
                return None
            # It ended by itself: let the last lines arrive, they say why.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 2.0)
            info = exited.result()
            await child.remove()  # its output is in airgate's log; the name is free for a restart
            ready_for = time.monotonic() - ready_since if ready_since is not None else 0.0
            reason = explain_exit(info.code, self._tail, oom_killed=info.oom_killed)
            return Failure(info.code, reason, ready_for)
        finally:
            for task in (reader, exited):
                task.cancel()
            # Awaited, so that a helper process they were waiting on is reaped before we return.
            await asyncio.gather(reader, exited, return_exceptions=True)

    async def _stop_child(self, child: Child) -> None:
        self._publish(STOPPING, f"stopping {child.ident} (up to {self._settings.stop_timeout:g} s)")
        try:
            await child.stop(self._settings.stop_timeout)
        finally:
            await child.remove()

    async def _follow(self, child: Child) -> None:
        """Copy the child's output into airgate's log and read the load progress from it."""
        prefix = f"[{child.ident}]"
        async for raw in child.lines():
            line = raw
            for secret in self._secrets:
                line = line.replace(secret, "***")
            self._tail.append(line)
            vllm_log.log(log_level(line), "%s %s", prefix, line)
            if self._status.state == LOADING and self._progress.feed(line):
                self._publish(LOADING, self._progress.describe(), progress=self._progress.value)
