"""Metrics and access log, built from Settings in one place and handed to the ProxyServer.

    obs = build_observability(settings, supervisor=supervisor)
    server = ProxyServer(settings, observer=obs.observer, metrics_app=obs.metrics_app,
                         metrics_text=obs.metrics_text)
    ...
    loop.add_signal_handler(signal.SIGUSR1, obs.reopen_logs)
    ...
    await server.stop(); await obs.close()
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from proxy.accesslog import AccessLog
from proxy.exchange import Exchange, ExchangeObserver
from proxy.launcher.status import LauncherStatus
from proxy.metrics import ProxyCollector, ProxyMetrics
from proxy.metrics_launcher import GpuCollector, LauncherCollector, StatusSource, state_file_source
from proxy.metrics_relay import VllmRelay
from proxy.settings import Settings
from proxy.state import ModelStatus

# The classic text format: what every Prometheus 2.x (Debian's included) and vLLM speak.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How old vLLM's relayed metrics may be on the synchronous path (see Observability.metrics_text).
RELAY_MAX_AGE = 60.0

try:
    from importlib.metadata import version as _version

    VERSION = _version("airgate")
except Exception:  # running from a source tree that was never installed
    VERSION = "unknown"


class HasStatus(Protocol):
    def status(self) -> LauncherStatus: ...


class MetricsAndLog:
    """Fans each event out to the metrics and the access log (the log only needs the end)."""

    __slots__ = ("_log", "_metrics")

    def __init__(self, metrics: ProxyMetrics, access_log: AccessLog) -> None:
        self._metrics = metrics
        self._log = access_log

    def exchange_started(self, exchange: Exchange) -> None:
        self._metrics.exchange_started(exchange)

    def exchange_finished(self, exchange: Exchange) -> None:
        self._metrics.exchange_finished(exchange)
        self._log.exchange_finished(exchange)

    def auth_failed(self, reason: str) -> None:
        self._metrics.auth_failed(reason)


class _HostCollector(Collector):
    """What one process per host reports: the build, and whether vLLM's metrics came."""

    def __init__(self, relay: VllmRelay) -> None:
        self.relay = relay

    def collect(self) -> list[Metric]:
        info = GaugeMetricFamily("airgate_build_info", "airgate's version.", labels=("version",))
        info.add_metric((VERSION,), 1.0)
        up = GaugeMetricFamily("airgate_upstream_metrics_up", "1 when vLLM's /metrics answered "
                               "for this scrape (its vllm: families follow), else 0.")
        up.add_metric((), 1.0 if self.relay.up else 0.0)
        return [info, up]


class _AccessLogCollector(Collector):
    def __init__(self, access_log: AccessLog) -> None:
        self.access_log = access_log

    def collect(self) -> list[Metric]:
        dropped = CounterMetricFamily("airgate_access_log_dropped_lines", "Access log lines "
                                      "lost: backlog full (disk too slow) or write failed.")
        dropped.add_metric((), self.access_log.dropped)
        return [dropped]


@dataclass
class Observability:
    observer: ExchangeObserver
    metrics: ProxyMetrics
    registry: CollectorRegistry
    relay: VllmRelay | None     # None: host_metrics=False
    access_log: AccessLog | None
    gpu: GpuCollector | None
    metrics_app: web.Application

    async def render(self) -> bytes:
        """The whole scrape: airgate's families, then vLLM's, fetched now."""
        if self.relay is None:
            return generate_latest(self.registry)
        await self.relay.fetch()
        return generate_latest(self.registry) + self.relay.text

    def metrics_text(self) -> bytes:
        """The same, for callers that can't await (the TLS listener's /metrics): vLLM's part
        is the one fetched by the previous scrape (at most RELAY_MAX_AGE old), and a fresh
        fetch starts for the next one."""
        relay = self.relay
        if relay is None:
            return generate_latest(self.registry)
        if relay.up and time.monotonic() - relay.fetched_at > RELAY_MAX_AGE:
            relay.up, relay.text = False, b""
        relay.refresh_soon()
        return generate_latest(self.registry) + relay.text

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log file (logrotate has renamed it)."""
        if self.access_log is not None:
            self.access_log.reopen()

    async def close(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        if self.access_log is not None:
            self.access_log.close()
        if self.gpu is not None:
            self.gpu.close()


def launcher_source(settings: Settings, model_status: Callable[[], ModelStatus] | None,
                    supervisor: HasStatus | None) -> StatusSource:
    if supervisor is not None:
        return supervisor.status
    if model_status is not None:
        status_of = model_status

        def from_model_status() -> LauncherStatus | None:
            status = status_of()
            return status if isinstance(status, LauncherStatus) else None

        return from_model_status
    # `airgate serve` in its own unit: the launcher (if any) publishes its state file.
    return state_file_source(settings.launcher.state_file)


def build_observability(
    settings: Settings,
    *,
    model_status: Callable[[], ModelStatus] | None = None,
    supervisor: HasStatus | None = None,
    host_metrics: bool = True,
) -> Observability:
    """Build metrics (own registry), the vLLM relay, the access log and the metrics app.
    Opens the access log file now: an OSError here is a start-up error.

    `host_metrics=False` leaves out what describes the host rather than this process (launcher,
    GPUs, vLLM's relayed families, build info): with `[server] workers` > 1, only one worker
    should report those, so the others don't fetch vLLM's /metrics or query NVML for nothing."""
    metrics = ProxyMetrics(route.partition(" ")[2] for route in settings.upstream.allow)
    access_log = (AccessLog(settings.log.access, settings.log.access_file)
                  if settings.log.access != "off" else None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(metrics))
    relay = gpu = None
    if host_metrics:
        relay = VllmRelay(settings.upstream.url, settings.metrics.upstream_timeout)
        gpu = GpuCollector()
        registry.register(LauncherCollector(launcher_source(settings, model_status, supervisor)))
        registry.register(gpu)
        registry.register(_HostCollector(relay))
    if access_log is not None:
        registry.register(_AccessLogCollector(access_log))
    # The proxy's own CPU and memory (the numbers the design is judged by); these register
    # themselves in the registry they are given.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    observer: ExchangeObserver = (MetricsAndLog(metrics, access_log) if access_log is not None
                                  else metrics)
    obs = Observability(observer, metrics, registry, relay, access_log, gpu, web.Application())
    obs.metrics_app.router.add_get("/metrics", _handler(obs))
    return obs


def _handler(obs: Observability) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=await obs.render(), headers={"Content-Type": CONTENT_TYPE})

    return metrics
