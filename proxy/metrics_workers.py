"""Metrics across `[server] workers = N` processes.

Each worker counts in its own ProxyMetrics (no locks, no shared memory on the request path). With
SO_REUSEPORT a scrape lands on any one worker, so every worker publishes a snapshot of its tables
to a shared directory once a second (SNAPSHOT_INTERVAL), and the worker that answers a scrape sums
all the snapshots, its own live tables in place of its own file. The result is exact to within
one interval for the other workers.

- Counters and histograms of a worker that exited stay in the sum (its file stays), so totals
  never go backwards when a worker is replaced; the requests-in-flight gauge only counts workers
  that are alive.
- The directory must be emptied when the service starts (`prepare_worker_dir`, by the process that
  starts the workers), or the previous run's counts are added in. A tmpfs such as systemd's
  RuntimeDirectory (/run/airgate) suits it: files are small and rewritten every second.
- prometheus-client's own multiprocess mode (PROMETHEUS_MULTIPROC_DIR, mmap files) would need its
  locked metric objects on the request path, which proxy.metrics avoids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from proxy.launcher.status import pid_alive
from proxy.metrics import Histogram, ProxyCollector, ProxyMetrics, RouteStats

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 1.0
_HISTOGRAMS = ("duration", "ttfb", "ttft", "gaps", "body_in", "body_out")


def prepare_worker_dir(path: str) -> None:
    """Create `path` and remove the snapshots of a previous run (call before starting workers)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


def snapshot(metrics: ProxyMetrics) -> dict[str, Any]:
    """Plain data (JSON-ready) holding everything `metrics` counted."""
    routes: dict[str, Any] = {}
    for route, stats in metrics.routes.items():
        entry: dict[str, Any] = {
            "requests": [[token, status, count]
                         for (token, status), count in stats.requests.items()]}
        for name in _HISTOGRAMS:
            histogram: Histogram = getattr(stats, name)
            entry[name] = [list(histogram.counts), histogram.sum]
        routes[route] = entry
    return {
        "pid": os.getpid(),
        "in_flight": metrics.in_flight,
        "routes": routes,
        "auth_failures": dict(metrics.auth_failures),
        "aborts": dict(metrics.aborts),
        "upstream_errors": dict(metrics.upstream_errors),
        "model_not_ready": metrics.model_not_ready,
        "usage": [[token, model, prompt, completion]
                  for (token, model), (prompt, completion) in metrics.usage.items()],
    }


def merge(target: ProxyMetrics, data: dict[str, Any], *, alive: bool = True) -> None:
    """Add a snapshot's counts to `target` (the in-flight gauge only if its worker is alive)."""
    if alive:
        target.in_flight += int(data.get("in_flight", 0))
    for route, entry in data.get("routes", {}).items():
        stats = target.routes.get(route)
        if stats is None:
            stats = target.routes[route] = RouteStats()
        for token, status, count in entry.get("requests", ()):
            key = (token, status)
            stats.requests[key] = stats.requests.get(key, 0) + count
        for name in _HISTOGRAMS:
            histogram: Histogram = getattr(stats, name)
            counts, total = entry.get(name, ((), 0.0))
            if len(counts) != len(histogram.counts):
                continue  # another version's buckets: can't be added bucket by bucket
            histogram.counts = [mine + theirs for mine, theirs in zip(histogram.counts, counts,
                                                                       strict=True)]
            histogram.sum += total
    for table in ("auth_failures", "aborts", "upstream_errors"):
        mine: dict[str, int] = getattr(target, table)
        for key, count in data.get(table, {}).items():
            mine[key] = mine.get(key, 0) + count
    target.model_not_ready += int(data.get("model_not_ready", 0))
    for token, model, prompt, completion in data.get("usage", ()):
        cell = target.usage.setdefault((token, model), [0, 0])
        cell[0] += prompt
        cell[1] += completion


class WorkerSnapshots:
    """Publishes this worker's snapshot to `directory` every `interval` seconds and sums all
    workers' snapshots on demand."""

    def __init__(self, directory: str, metrics: ProxyMetrics, *, name: str = "",
                 interval: float = SNAPSHOT_INTERVAL) -> None:
        self.directory = Path(directory)
        self.metrics = metrics
        self.interval = interval
        self.path = self.directory / f"{name or os.getpid()}.json"
        self._handle: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(json.dumps(snapshot(self.metrics)))  # at once: a scrape may come first
        self._schedule()

    def _schedule(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._publish)

    def _publish(self) -> None:
        # The snapshot is taken on the loop (a consistent view); the file is written by the
        # default executor so that a slow disk never stalls the loop. One write at a time.
        if self._writing is None or self._writing.done():
            data = json.dumps(snapshot(self.metrics))
            self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, data)
        self._schedule()

    def _write(self, data: str) -> None:
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".snapshot.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(data)
            os.replace(temp, self.path)  # readers never see half a file
        except OSError as error:
            log.warning("cannot write the metrics snapshot %s: %s", self.path, error)

    def aggregate(self) -> ProxyMetrics:
        """Everyone's counts: this worker's live tables plus the other workers' last snapshots."""
        total = ProxyMetrics(self.metrics.routes)
        merge(total, snapshot(self.metrics))
        for path in self.directory.glob("*.json"):
            if path == self.path:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # removed or being replaced: at worst this scrape misses one interval
            pid = int(data.get("pid", 0))
            merge(total, data, alive=pid > 0 and pid_alive(pid))
        return total

    def stop(self) -> None:
        """Stop publishing and write the final counts (at shutdown; blocking is fine then)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        final = snapshot(self.metrics)
        final["in_flight"] = 0
        self._write(json.dumps(final))


class SharedProxyCollector(ProxyCollector):
    """ProxyCollector over the sum of all workers."""

    def __init__(self, shared: WorkerSnapshots) -> None:
        super().__init__(shared.metrics)
        self.shared = shared

    def current(self) -> ProxyMetrics:
        return self.shared.aggregate()
