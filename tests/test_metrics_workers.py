"""`[server] workers = N`: each worker publishes snapshots, any worker's scrape sums them all."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import KIBANA_TEST_BODY, MakeSettings, Tokens
from proxy.exchange import Exchange
from proxy.metrics import ProxyMetrics
from proxy.metrics_workers import (
    SharedProxyCollector,
    WorkerSnapshots,
    prepare_worker_dir,
    snapshot,
)
from proxy.observability import build_observability
from proxy.server import ProxyServer
from proxy.simulator import RunningSimulator

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"


def exchange(token: str = "kibana", status: int = 200, **fields: object) -> Exchange:
    ex = Exchange(0.0, 0.0, "127.0.0.1")
    ex.route, ex.token_name, ex.status, ex.end, ex.ttfb = CHAT, token, status, 0.5, 0.1
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def count(metrics: ProxyMetrics, *exchanges: Exchange, leave_open: int = 0) -> None:
    for ex in exchanges:
        metrics.exchange_started(ex)
        metrics.exchange_finished(ex)
    metrics.in_flight += leave_open


def scrape(shared: WorkerSnapshots) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SharedProxyCollector(shared))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


async def test_a_scrape_on_any_worker_sums_all_of_them(tmp_path: Path) -> None:
    prepare_worker_dir(str(tmp_path))
    one, two = ProxyMetrics([CHAT]), ProxyMetrics([CHAT])
    first = WorkerSnapshots(str(tmp_path), one, name="w1", interval=0.05)
    second = WorkerSnapshots(str(tmp_path), two, name="w2", interval=0.05)
    first.start()
    second.start()
    try:
        count(one, exchange(), exchange(completion_tokens=5, model="m"), leave_open=1)
        count(two, exchange(token="ops"), exchange(status=503, upstream_error="refused"),
              exchange(completion_tokens=7, model="m"), leave_open=2)
        two.auth_failed("unknown")
        await asyncio.sleep(0.2)  # a few publishing intervals
        samples = scrape(first)
    finally:
        first.stop()
        second.stop()
    key = "airgate_requests_total"
    assert samples[(key, frozenset({"token": "kibana", "route": CHAT, "status": "2xx"}.items()))
                   ] == 3
    assert samples[(key, frozenset({"token": "ops", "route": CHAT, "status": "2xx"}.items()))] == 1
    assert samples[("airgate_requests_in_flight", frozenset())] == 3
    assert samples[("airgate_model_not_ready_total", frozenset())] == 1
    assert samples[("airgate_auth_failures_total", frozenset({("reason", "unknown")}))] == 1
    assert samples[("airgate_completion_tokens_total",
                    frozenset({"token": "kibana", "model": "m"}.items()))] == 12
    assert samples[("airgate_request_duration_seconds_count", frozenset({("route", CHAT)}))] == 5
    # stop() leaves the final counts, with nothing in flight.
    final = json.loads((tmp_path / "w2.json").read_text())
    assert final["in_flight"] == 0 and final["model_not_ready"] == 1


async def test_an_exited_workers_counts_stay_but_not_its_in_flight(tmp_path: Path) -> None:
    gone = ProxyMetrics([CHAT])
    count(gone, exchange(), exchange(), leave_open=4)
    data = snapshot(gone)
    data["pid"] = dead_pid()
    (tmp_path / "gone.json").write_text(json.dumps(data))
    (tmp_path / "torn.json").write_text('{"pid": 1, "rout')  # half written: skipped
    live = ProxyMetrics([CHAT])
    count(live, exchange(), leave_open=1)
    samples = scrape(WorkerSnapshots(str(tmp_path), live, name="live"))
    assert samples[("airgate_requests_total",
                    frozenset({"token": "kibana", "route": CHAT, "status": "2xx"}.items()))] == 3
    assert samples[("airgate_requests_in_flight", frozenset())] == 1


async def test_prepare_worker_dir_forgets_the_previous_run(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "1234.json").write_text("{}")
    prepare_worker_dir(str(directory))
    assert list(directory.iterdir()) == []


async def test_build_observability_with_a_worker_dir_serves_the_sum(
    make_settings: MakeSettings, simulator: RunningSimulator, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    workers = tmp_path / "workers"
    prepare_worker_dir(str(workers))
    other = ProxyMetrics([CHAT])
    count(other, exchange(), exchange())  # another worker, alive (it has our pid)
    (workers / "other.json").write_text(json.dumps(snapshot(other)))
    settings = make_settings(simulator.url, metrics={"listen": "127.0.0.1:0"})
    obs = build_observability(settings, worker_dir=str(workers))
    server = ProxyServer(settings, observer=obs.observer, metrics_app=obs.metrics_app,
                         metrics_text=obs.metrics_text)
    await server.start()
    try:
        async with client.post(f"https://127.0.0.1:{server.https_port}{CHAT}",
                               json=KIBANA_TEST_BODY,
                               headers={"Authorization": f"Bearer {tokens.kibana}"}) as resp:
            assert resp.status == 200
            await resp.read()
        async with aiohttp.ClientSession() as plain, plain.get(
                f"http://127.0.0.1:{server.metrics_port}/metrics") as resp:
            text = await resp.text()
    finally:
        await server.stop()
        await obs.close()
    requests = [sample for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "airgate_requests_total"]
    assert [(s.labels, s.value) for s in requests] == [
        ({"token": "kibana", "route": CHAT, "status": "2xx"}, 3.0)]
    assert obs.workers is not None and obs.workers.path.exists()
