"""Launcher and GPU metrics, read at scrape time from state owned elsewhere.

The launcher publishes an immutable LauncherStatus; a Collector reads the current one when
Prometheus scrapes, so the supervisor does no metrics work of its own. GPU memory and utilisation
come from NVML (`pynvml`, package nvidia-ml-py), imported lazily: no library or no GPU means no
GPU series, never a failed scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.launcher.status import STATES, LauncherStatus, read_state_file

log = logging.getLogger(__name__)

StatusSource = Callable[[], LauncherStatus | None]


def state_file_source(path: str) -> StatusSource:
    """For a proxy in its own unit (`airgate serve` beside `airgate launch`): read the
    launcher's state file at scrape time. No file: no launcher series."""

    def read() -> LauncherStatus | None:
        data = read_state_file(path)
        return LauncherStatus.from_json(data) if data is not None else None

    return read


class LauncherCollector(Collector):
    def __init__(self, source: StatusSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        try:
            status = self.source()
        except Exception:  # a scrape must not fail because the launcher's state can't be read
            log.exception("cannot read the launcher's status for /metrics")
            return
        if status is None:
            return
        state = GaugeMetricFamily("airgate_launcher_state", "1 for the launcher's current "
                                  "state, 0 for the others.", labels=("state",))
        for name in STATES:
            state.add_metric((name,), 1.0 if status.state == name else 0.0)
        yield state
        since = GaugeMetricFamily("airgate_launcher_state_since_timestamp_seconds",
                                  "When the launcher entered its current state (Unix time).")
        since.add_metric((), status.since)
        yield since
        restarts = CounterMetricFamily("airgate_launcher_restarts", "Times the launcher "
                                       "restarted vLLM after it exited.")
        restarts.add_metric((), status.restarts)
        yield restarts
        optional = (
            ("airgate_launcher_last_exit_code", "Exit code of vLLM's last exit (negative: "
             "killed by that signal).", status.last_exit_code),
            ("airgate_launcher_load_progress_ratio", "Model loading progress, 0 to 1, when "
             "vLLM's output tells it.", status.progress),
            ("airgate_launcher_time_to_ready_seconds", "Seconds from launch to ready, of the "
             "last run that became ready.", status.time_to_ready),
            ("airgate_launcher_health_latency_seconds", "Latency of the last /health probe "
             "that vLLM answered.", status.health_latency),
        )
        for name, doc, value in optional:
            if value is not None:
                family = GaugeMetricFamily(name, doc)
                family.add_metric((), float(value))
                yield family


class GpuCollector(Collector):
    """GPU memory and utilisation through NVML, one series per GPU index."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._unavailable = False

    def _library(self) -> Any:
        if self._nvml is None and not self._unavailable:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as error:  # ImportError, or NVMLError: no driver, no GPU
                # Tried once: a machine without a GPU should not pay for it on every scrape.
                log.info("no GPU metrics: %s", error or type(error).__name__)
                self._unavailable = True
                return None
            self._nvml = pynvml
        return self._nvml

    def collect(self) -> Iterator[Metric]:
        nvml = self._library()
        if nvml is None:
            return
        used = GaugeMetricFamily("airgate_gpu_memory_used_bytes", "GPU memory in use.",
                                 labels=("gpu",))
        total = GaugeMetricFamily("airgate_gpu_memory_total_bytes", "GPU memory in all.",
                                  labels=("gpu",))
        busy = GaugeMetricFamily("airgate_gpu_utilization_ratio", "Fraction of the last "
                                 "sample period in which a kernel ran on the GPU.",
                                 labels=("gpu",))
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                gpu = str(index)
                used.add_metric((gpu,), float(memory.used))
                total.add_metric((gpu,), float(memory.total))
                busy.add_metric((gpu,), rates.gpu / 100.0)
        except Exception as error:  # a GPU that fell off the bus must not fail the scrape
            log.warning("GPU metrics incomplete: %s", error)
        yield used
        yield total
        yield busy

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # best effort at exit
                pass
            self._nvml = None
