"""`[server] workers = N`: N proxy processes on one port, and one /metrics for all of them.

One Python process uses one core. The parent forks N workers before it starts an event loop;
each worker binds the TLS port with SO_REUSEPORT (or uses the socket systemd passed) and the
kernel spreads connections across them. The parent forwards signals, restarts a worker that
dies, tells systemd it is ready once every worker listens, and serves the metrics listener:
at each scrape it asks every worker for its metrics over a private unix socket and adds them
up. Families every worker reports alike (vLLM's relayed metrics, the launcher's, the upstream
relay's `up`) are taken from the first worker only, so they are not multiplied by N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy import systemd
from proxy.lifeline import die_with_parent
from proxy.settings import Settings

log = logging.getLogger("airgate.workers")

WORKER_ENV = "AIRGATE_WORKER"
# Families that describe something outside the worker (the same value in every worker).
SHARED_PREFIXES = ("vllm:", "airgate_launcher_", "airgate_upstream_metrics_", "airgate_gpu_",
                   "process_", "python_")


def metrics_socket(runtime_dir: Path, index: int) -> Path:
    return runtime_dir / f"metrics-{index}.sock"


SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def parse_counters(text: str) -> dict[SeriesKey, float]:
    """The monotonic series (counters, histogram parts) of one worker's exposition."""
    found: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram", "summary"):
            continue
        for sample in family.samples:
            if sample.name.endswith(COUNTER_SUFFIXES):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def merge_families(texts: list[str], carried: dict[SeriesKey, float] | None = None
                   ) -> list[Metric]:
    """Add up the samples of every worker's exposition, series by series, plus what workers
    that have since been replaced had counted (`carried`), so counters never go down."""
    merged: dict[str, Metric] = {}
    values: dict[SeriesKey, float] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            shared = family.name.startswith(SHARED_PREFIXES)
            if shared and index > 0:
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type,
                                             family.unit)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = values.get(key, 0.0) + sample.value
    for key, value in (carried or {}).items():
        values[key] = values.get(key, 0.0) + value
    for (name, labels), value in values.items():
        target = merged.get(_family_of(name, merged))
        if target is not None:  # None: a carried series whose family no live worker reports
            target.add_sample(name, dict(labels), value)
    return list(merged.values())


def _family_of(sample_name: str, families: dict[str, Metric]) -> str:
    if sample_name in families:
        return sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created", "_info"):
        base = sample_name.removesuffix(suffix)
        if base in families:
            return base
    return sample_name


class _Merged:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class WorkerScraper:
    """Scrapes every worker at once and keeps the last counters of each, so that when a worker
    is replaced its counts are carried into the total instead of vanishing (which Prometheus
    would read as a counter reset and turn into a false spike in rate())."""

    def __init__(self, runtime_dir: Path, count: int, wait: float) -> None:
        self._runtime_dir = runtime_dir
        self._count = count
        self._wait = wait
        self._last: dict[int, dict[SeriesKey, float]] = {}
        self.carried: dict[SeriesKey, float] = {}

    def worker_replaced(self, index: int) -> None:
        for key, value in self._last.pop(index, {}).items():
            self.carried[key] = self.carried.get(key, 0.0) + value

    async def _one(self, index: int) -> str:
        connector = aiohttp.UnixConnector(path=str(metrics_socket(self._runtime_dir, index)))
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get("http://worker/metrics",
                                       timeout=aiohttp.ClientTimeout(total=self._wait)) as resp:
                    text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            log.warning("worker %d did not answer the metrics scrape: %r", index, error)
            return ""
        self._last[index] = parse_counters(text)
        return text

    async def scrape(self) -> bytes:
        texts = await asyncio.gather(*(self._one(index) for index in range(self._count)))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_families(list(texts), self.carried)))
        return generate_latest(registry)


def run_workers(settings: Settings,
                worker_main: Callable[[int, Path, list[socket.socket]], int],
                parent_task: Callable[[asyncio.Event], Awaitable[None]] | None = None) -> int:
    """Fork `settings.server.workers` processes running `worker_main(index, runtime_dir)` and
    supervise them until SIGTERM/SIGINT. Call before any event loop exists."""
    count = settings.server.workers
    runtime_dir = Path(tempfile.mkdtemp(prefix="airgate-workers-"))
    ready_read, ready_write = os.pipe()
    inherited = systemd.listen_sockets()  # read once here: the workers inherit the sockets
    children: dict[int, int] = {}

    lifeline = die_with_parent()  # a worker whose parent is killed drains and exits

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            if lifeline is not None:
                lifeline()
            os.close(ready_read)
            os.environ[WORKER_ENV] = f"{index}:{ready_write}"
            code = 1
            try:
                os.environ.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
                code = worker_main(index, runtime_dir, inherited)
            finally:
                os._exit(code)
        children[pid] = index

    for index in range(count):
        spawn(index)
    os.close(ready_write)
    # The parent keeps systemd's sockets open (it never accepts on them) so that a worker it
    # starts again inherits them too.
    return asyncio.run(_parent(settings, runtime_dir, ready_read, children, spawn, parent_task))


async def _parent(settings: Settings, runtime_dir: Path, ready_fd: int,
                  children: dict[int, int], spawn: Callable[[int], None],
                  parent_task: Callable[[asyncio.Event], Awaitable[None]] | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _forward, children, signal.SIGUSR1)

    def reload() -> None:
        # Each worker reloads itself (and logs a failure); the parent tells systemd.
        systemd.reloading()
        _forward(children, signal.SIGHUP)
        systemd.notify("READY=1", f"STATUS=reload sent to {len(children)} workers")

    loop.add_signal_handler(signal.SIGHUP, reload)

    count = settings.server.workers
    ready = 0

    def on_ready() -> None:
        nonlocal ready
        ready += len(os.read(ready_fd, 64))
        if ready == count:
            systemd.notify("READY=1", f"STATUS=serving on {settings.listen.https} with "
                           f"{count} workers")

    loop.add_reader(ready_fd, on_ready)
    # `airgate run`: the launcher lives in the parent, once, not in every worker.
    side_task = asyncio.ensure_future(parent_task(stop)) if parent_task is not None else None
    runner: web.AppRunner | None = None
    scraper = WorkerScraper(runtime_dir, count, settings.metrics.upstream_timeout + 1)
    if settings.metrics.listen:
        app = web.Application()

        async def metrics(request: web.Request) -> web.Response:
            body = await scraper.scrape()
            return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, _, port = settings.metrics.listen.rpartition(":")
        await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()

    watchdog = systemd.watchdog_interval()
    last_ping = loop.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if watchdog is not None and loop.time() - last_ping >= watchdog:
            systemd.notify("WATCHDOG=1")
            last_ping = loop.time()
        for pid, index in list(children.items()):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
                if done and not stop.is_set():
                    del children[pid]
                    log.error("worker %d exited (%s); starting it again", index,
                              _describe(status))
                    scraper.worker_replaced(index)
                    spawn(index)
    systemd.notify("STOPPING=1", "STATUS=draining running requests")
    _forward(children, signal.SIGTERM)
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            await loop.run_in_executor(None, os.waitpid, pid, 0)
    if runner is not None:
        await runner.cleanup()
    if side_task is not None:
        await side_task
    loop.remove_reader(ready_fd)
    os.close(ready_fd)
    shutil.rmtree(runtime_dir, ignore_errors=True)
    return 0


def _forward(children: dict[int, int], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def worker_identity() -> tuple[int, int] | None:
    """(index, ready-pipe fd) inside a worker, None in a single-process server."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, fd = value.partition(":")
    return int(index), int(fd)


def announce_ready(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
        os.close(fd)


def unix_metrics_socket(runtime_dir: Path, index: int) -> socket.socket:
    path = metrics_socket(runtime_dir, index)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    sock.setblocking(False)
    return sock
