"""`airgate launch` (the launcher alone) and `airgate status` (what it is doing).

Exit statuses of `airgate status`, in the spirit of `systemctl is-active`: 0 ready; 1 starting,
loading, in backoff or stopping; 2 fatal; 3 not running (stopped, no state file, or the launcher
that wrote it is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

from proxy import systemd
from proxy.launcher import checks
from proxy.launcher.command import LaunchError, build_command, read_secrets
from proxy.launcher.status import (
    FATAL,
    READY,
    STOPPED,
    LauncherStatus,
    pid_alive,
    read_state_file,
)
from proxy.launcher.supervisor import Supervisor
from proxy.settings import ConfigError, LauncherSettings, load_settings

log = logging.getLogger("airgate.launcher")


def print_command(settings: LauncherSettings) -> int:
    """`airgate launch --print`: the exact command, secrets masked."""
    try:
        binary = checks.find_binary(settings)
    except LaunchError as error:
        print(f"# note: {error}", file=sys.stderr)
        binary = settings.runtime_command or settings.runtime
    try:
        secrets = read_secrets(settings)
    except LaunchError as error:
        # Still show the command; the variable names are all that is printed anyway.
        print(f"# note: {error}", file=sys.stderr)
        names = (["VLLM_API_KEY"] if settings.api_key_file else []) + \
            (["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] if settings.hf_token_file else [])
        secrets = dict.fromkeys(names, "unreadable")
    try:
        command = build_command(settings, secrets, binary)
    except (LaunchError, ValueError) as error:
        print(f"airgate launch: {error}", file=sys.stderr)
        return 2
    print(command.masked(), end="")
    return 0


def _setup_logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _launch(settings: LauncherSettings) -> int:
    supervisor = Supervisor(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)  # the work happens in the loop, not here
    # A reload or log-reopen signal meant for the proxy must not kill the model server.
    for signum in (signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(signum, _nothing_to_reload, signum)
    gave_up = False

    def on_change(status: LauncherStatus) -> None:
        # Alone, a launcher that gave up exits non-zero so that systemd (Restart=) or an
        # operator sees it; inside `airgate run` the proxy answers 503 with the reason instead.
        nonlocal gave_up
        if status.state == FATAL:
            gave_up = True
            stop.set()

    supervisor.add_listener(on_change)
    # Under systemd (Type=notify) the unit is up once supervision runs: a model load can take
    # longer than any sensible TimeoutStartSec. `systemctl status` shows the state line.
    supervisor.add_listener(_tell_systemd)
    systemd.notify("READY=1")
    helper = asyncio.ensure_future(_systemd_helper(stop))
    try:
        await supervisor.run(stop)
    finally:
        helper.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
    return 1 if gave_up else 0


def _nothing_to_reload(signum: int) -> None:
    log.info("%s: the launcher has nothing to reload (it reads [launcher] at start); "
             "restart it to apply a changed config", signal.Signals(signum).name)


def _tell_systemd(status: LauncherStatus) -> None:
    systemd.notify(f"STATUS=vLLM {status.state}: {status.message}"[:400])


async def _systemd_helper(stop: asyncio.Event) -> None:
    """WATCHDOG=1 while the loop is alive (if the unit asks for it); STOPPING=1 on stop."""
    interval = systemd.watchdog_interval()
    while not stop.is_set():
        if interval is None:
            await stop.wait()
            break
        systemd.notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    systemd.notify("STOPPING=1")


def launch_main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"airgate launch: {error}", file=sys.stderr)
        return 2
    if getattr(args, "print_only", False):
        return print_command(settings.launcher)
    _setup_logging(settings.log.level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio works as well
        return asyncio.run(_launch(settings.launcher))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_launch(settings.launcher))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    parts += [f"{minutes}m"] if minutes or hours or days else []
    return " ".join([*parts, f"{secs}s"])


def format_status(data: dict[str, Any], now: float) -> tuple[str, int]:
    """The state file as text for people, and the exit status of `airgate status`."""
    state = str(data.get("state", "unknown"))
    pid = data.get("pid")
    running = isinstance(pid, int) and pid_alive(pid)
    lines = []
    if not running and state != STOPPED:
        lines.append(f"launcher: not running (pid {pid} is gone); last known state below")
    lines.append(f"state:    {state} since {_duration(now - float(data.get('since') or now))}"
                 f" — {data.get('message', '')}")
    if data.get("model"):
        lines.append(f"model:    {data['model']} ({data.get('runtime')}"
                     f"{', ' + str(data['child']) if data.get('child') else ''})")
    progress = data.get("progress")
    if state != READY and isinstance(progress, int | float):
        lines.append(f"progress: {progress:.0%}")
    if data.get("ready_at") and state == READY:
        lines.append(f"uptime:   {_duration(now - float(data['ready_at']))} ready"
                     + (f", loaded in {_duration(data['time_to_ready'])}"
                        if data.get("time_to_ready") else ""))
    elif data.get("started_at"):
        lines.append(f"uptime:   {_duration(now - float(data['started_at']))} since start")
    lines.append(f"restarts: {data.get('restarts', 0)}")
    if data.get("last_exit_reason"):
        lines.append(f"last exit: {data['last_exit_reason']}")
    if not running or state == STOPPED:
        code = 3
    else:
        code = 0 if state == READY else 2 if state == FATAL else 1
    return "\n".join(lines) + "\n", code


def status_main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"airgate status: {error}", file=sys.stderr)
        return 2
    path = settings.launcher.state_file
    data = read_state_file(path)
    if data is None:
        print(f"launcher: no state in {path}: it has not run yet (airgate launch / airgate run),"
              f" or launcher.state_file differs from the running launcher's")
        return 3
    text, code = format_status(data, time.time())
    print(text, end="")
    return code
