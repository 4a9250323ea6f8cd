"""Metrics: real traffic through the real proxy, then a real scrape of /metrics; plus the observer,
the launcher/GPU collectors and the vLLM relay on their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import KIBANA_TEST_BODY, MakeSettings, TLSFiles, Tokens, sse_events
from proxy.exchange import Exchange
from proxy.launcher.status import LauncherStatus, write_state_file
from proxy.metrics import MAX_MODELS, ProxyCollector, ProxyMetrics
from proxy.metrics_launcher import GpuCollector, LauncherCollector, state_file_source
from proxy.metrics_relay import VllmRelay, vllm_families
from proxy.observability import Observability, build_observability
from proxy.server import ProxyServer
from proxy.simulator import RunningSimulator

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Observed:
    server: ProxyServer
    obs: Observability
    url: str
    metrics_url: str

    async def scrape(self, session: aiohttp.ClientSession) -> tuple[str, Samples]:
        async with session.get(self.metrics_url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
        return text, parse(text)

    async def settled(self) -> None:
        """Wait until every exchange has been finished by the core (hang-ups take a tick)."""
        for _ in range(200):
            if self.obs.metrics.in_flight == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("exchanges still in flight")


StartObserved = Callable[..., Awaitable[Observed]]


@pytest.fixture
async def observed(make_settings: MakeSettings) -> AsyncIterator[StartObserved]:
    """A proxy wired with build_observability, metrics on a plain loopback listener.
    (What ProxyServer will get from the lead's wiring; until then, built here.)"""
    started: list[tuple[ProxyServer, Observability]] = []

    async def start(upstream_url: str, **sections: dict[str, Any]) -> Observed:
        sections.setdefault("metrics", {}).setdefault("listen", "127.0.0.1:0")
        settings = make_settings(upstream_url, **sections)
        obs = build_observability(settings)
        server = ProxyServer(settings, observer=obs.observer, metrics_app=obs.metrics_app,
                             metrics_text=obs.metrics_text)
        await server.start()
        started.append((server, obs))
        return Observed(server, obs, f"https://127.0.0.1:{server.https_port}",
                        f"http://127.0.0.1:{server.metrics_port}/metrics")

    yield start
    for server, obs in started:
        await server.stop()
        await obs.close()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- end to end ---------------------------------------------------------------------------------

async def test_scrape_counts_real_traffic(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    gate = await observed(simulator.url)
    for _ in range(2):
        async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY,
                               headers=auth(tokens.kibana)) as resp:
            assert resp.status == 200
            await resp.read()
    async with client.post(gate.url + CHAT, json={**KIBANA_TEST_BODY, "stream": True},
                           headers={**auth(tokens.ops), "x-sim-tokens": "5"}) as resp:
        assert sse_events(await resp.read())[-1] == "[DONE]"
    async with client.get(gate.url + "/v1/models", headers=auth(tokens.ops)) as resp:
        assert resp.status == 200
    for headers in ({}, {"Authorization": "Basic abc"}, auth("ag-not-a-real-token")):
        async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY, headers=headers) as resp:
            assert resp.status == 401
    async with client.get(gate.url + "/not/allowed", headers=auth(tokens.ops)) as resp:
        assert resp.status == 404
    await gate.settled()

    async with aiohttp.ClientSession() as plain:
        text, samples = await gate.scrape(plain)
    requests = "airgate_requests_total"
    assert value(samples, requests, token="kibana", route=CHAT, status="2xx") == 2
    assert value(samples, requests, token="ops", route=CHAT, status="2xx") == 1
    assert value(samples, requests, token="ops", route="/v1/models", status="2xx") == 1
    # refused by auth: not served by any route, so "other", and the token as "-"
    assert value(samples, requests, token="-", route="other", status="4xx") == 3
    assert value(samples, requests, token="ops", route="other", status="4xx") == 1
    for reason in ("missing", "malformed", "unknown"):
        assert value(samples, "airgate_auth_failures_total", reason=reason) == 1
    assert value(samples, "airgate_requests_in_flight") == 0
    assert value(samples, "airgate_request_duration_seconds_count", route=CHAT) == 3
    assert value(samples, "airgate_upstream_first_byte_seconds_count", route=CHAT) == 3
    assert value(samples, "airgate_request_body_bytes_count", route=CHAT) == 3
    body = len(json.dumps(KIBANA_TEST_BODY))
    assert value(samples, "airgate_request_body_bytes_sum", route=CHAT) >= 3 * body
    assert value(samples, "airgate_response_body_bytes_sum", route=CHAT) > 0
    assert value(samples, "airgate_client_aborts_total", phase="streaming") == 0
    # Only the stream has a first token and gaps between tokens.
    assert value(samples, "airgate_time_to_first_token_seconds_count", route=CHAT) == 1
    assert value(samples, "airgate_inter_token_gap_seconds_count", route=CHAT) >= 1
    assert value(samples, "airgate_upstream_metrics_up") == 1
    # vLLM's families relayed unchanged, vLLM's process families not (they'd clash with ours).
    assert value(samples, "vllm:request_success_total", model_name="sim-model",
                 finished_reason="stop") == 3
    assert "process_resident_memory_bytes" in text
    assert text.count("# TYPE process_resident_memory_bytes ") == 1
    # Secrets never reach a label or a value.
    assert tokens.kibana not in text and tokens.ops not in text


async def test_aborted_streams_are_counted_by_phase(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens, tls: TLSFiles,
) -> None:
    gate = await observed(simulator.url)
    headers = {**auth(tokens.kibana), "x-sim-interval": "0.05", "x-sim-tokens": "400"}
    context = tls.client_context
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gate.url + CHAT, headers=headers, ssl=context,
                                  json={**KIBANA_TEST_BODY, "stream": True})
        await resp.content.readline()
        resp.close()  # hang up mid-stream
        waiting = asyncio.ensure_future(session.post(
            gate.url + CHAT, headers={**auth(tokens.kibana), "x-sim-ttft": "30"}, ssl=context,
            json=KIBANA_TEST_BODY))
        await simulator.stats.wait_for(lambda: simulator.stats.running >= 1)
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    await simulator.stats.wait_aborted(2, timeout=2.0)
    await gate.settled()
    async with aiohttp.ClientSession() as plain:
        _, samples = await gate.scrape(plain)
    assert value(samples, "airgate_client_aborts_total", phase="streaming") == 1
    assert value(samples, "airgate_client_aborts_total", phase="waiting") == 1
    # The stream had its 200 already; the one still waiting is logged as Nginx's 499.
    assert value(samples, "airgate_requests_total", token="kibana", route=CHAT,
                 status="2xx") == 1
    assert value(samples, "airgate_requests_total", token="kibana", route=CHAT,
                 status="4xx") == 1


async def test_dead_vllm_does_not_break_the_scrape_and_503s_are_counted(
    observed: StartObserved, tokens: Tokens, client: aiohttp.ClientSession,
) -> None:
    gate = await observed("http://127.0.0.1:9")  # nothing listens on the discard port
    async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY,
                           headers=auth(tokens.kibana)) as resp:
        assert resp.status == 503
    await gate.settled()
    async with aiohttp.ClientSession() as plain:
        text, samples = await gate.scrape(plain)
    assert value(samples, "airgate_upstream_metrics_up") == 0
    assert not any(line.startswith(("vllm:", "# TYPE vllm:")) for line in text.splitlines())
    assert value(samples, "airgate_model_not_ready_total") == 1
    assert value(samples, "airgate_upstream_errors_total", kind="refused") == 1
    assert value(samples, "airgate_requests_total", token="kibana", route=CHAT,
                 status="5xx") == 1


async def test_silent_vllm_metrics_time_out_quickly(observed: StartObserved) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, then say nothing until the client gives up
        writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        gate = await observed(f"http://127.0.0.1:{port}", metrics={"upstream_timeout": 0.3})
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with aiohttp.ClientSession() as plain:
            _, samples = await gate.scrape(plain)
        assert loop.time() - began < 2.0
        assert value(samples, "airgate_upstream_metrics_up") == 0
    finally:
        silent.close()


async def scrape_tls(gate: Observed, client: aiohttp.ClientSession, token: str) -> Samples:
    async with client.get(gate.url + "/metrics", headers=auth(token)) as resp:
        assert resp.status == 200
        return parse(await resp.text())


async def test_metrics_on_the_tls_listener(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(tokens.ops + "\n")
    gate = await observed(simulator.url, metrics={"listen": "", "token_file": str(token_file)})
    async with client.get(gate.url + "/metrics", headers=auth(tokens.kibana)) as resp:
        assert resp.status == 401
    # The synchronous path relays what the previous scrape fetched, and starts a fresh fetch.
    samples = await scrape_tls(gate, client, tokens.ops)
    await asyncio.sleep(0.2)
    samples = await scrape_tls(gate, client, tokens.ops)
    assert value(samples, "airgate_upstream_metrics_up") == 1
    assert value(samples, "vllm:num_requests_running", model_name="sim-model") == 0


async def test_a_dedicated_metrics_token_is_enough_on_the_tls_listener(
    observed: StartObserved, simulator: RunningSimulator, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("scrape-only-secret\n")
    gate = await observed(simulator.url, metrics={"listen": "", "token_file": str(token_file)})
    samples = await scrape_tls(gate, client, "scrape-only-secret")
    assert value(samples, "airgate_requests_in_flight") >= 0


async def test_usage_of_non_streamed_answers_is_counted_per_token_and_model(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    gate = await observed(simulator.url)
    prompt = completion = 0
    for count in ("3", "7"):
        async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY,
                               headers={**auth(tokens.kibana), "x-sim-tokens": count}) as resp:
            usage = (await resp.json())["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    await gate.settled()
    async with aiohttp.ClientSession() as plain:
        _, samples = await gate.scrape(plain)
    labels = {"token": "kibana", "model": "sim-model"}
    assert value(samples, "airgate_prompt_tokens_total", **labels) == prompt
    assert value(samples, "airgate_completion_tokens_total", **labels) == completion == 10


@pytest.mark.parametrize("client_asks", [True, False])
async def test_usage_of_streams_is_counted_and_unasked_usage_chunk_never_reaches_client(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens,
    client: aiohttp.ClientSession, client_asks: bool,
) -> None:
    gate = await observed(simulator.url)
    body: dict[str, Any] = {**KIBANA_TEST_BODY, "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    async with client.post(gate.url + CHAT, json=body,
                           headers={**auth(tokens.ops), "x-sim-tokens": "6"}) as resp:
        events = sse_events(await resp.read())
    chunks = [json.loads(event) for event in events if event != "[DONE]"]
    usage_chunks = [chunk for chunk in chunks if chunk["choices"] == []]
    assert len(usage_chunks) == (1 if client_asks else 0)  # Kibana breaks on an unasked one
    await gate.settled()
    async with aiohttp.ClientSession() as plain:
        _, samples = await gate.scrape(plain)
    labels = {"token": "ops", "model": "sim-model"}
    assert value(samples, "airgate_completion_tokens_total", **labels) == 6
    assert value(samples, "airgate_prompt_tokens_total", **labels) > 0


# -- the observer on its own ---------------------------------------------------------------------

def exchange(route: str = CHAT, token: str = "kibana", status: int = 200,
             **fields: Any) -> Exchange:
    ex = Exchange(100.0, 1_700_000_000.0, "10.0.0.5")
    ex.method, ex.path, ex.route, ex.token_name, ex.status = "POST", route, route, token, status
    ex.end = 100.25
    ex.body_in, ex.body_out, ex.ttfb = 120, 2048, 0.05
    for name, field_value in fields.items():
        setattr(ex, name, field_value)
    return ex


def scrape_of(metrics: ProxyMetrics) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(metrics))
    return parse(generate_latest(registry).decode())


def finish(metrics: ProxyMetrics, ex: Exchange) -> None:
    metrics.exchange_started(ex)
    metrics.exchange_finished(ex)


async def test_observer_counts_usage_per_token_name_and_model() -> None:
    metrics = ProxyMetrics([CHAT])
    finish(metrics, exchange(model="m1", prompt_tokens=10, completion_tokens=4))
    finish(metrics, exchange(model="m1", prompt_tokens=5, completion_tokens=6))
    finish(metrics, exchange(token="ops", model="m2", prompt_tokens=1, completion_tokens=1))
    finish(metrics, exchange(token="", status=401, route=""))  # no usage, no token
    samples = scrape_of(metrics)
    assert value(samples, "airgate_prompt_tokens_total", token="kibana", model="m1") == 15
    assert value(samples, "airgate_completion_tokens_total", token="kibana", model="m1") == 10
    assert value(samples, "airgate_completion_tokens_total", token="ops", model="m2") == 1
    assert value(samples, "airgate_requests_total", token="-", route="other", status="4xx") == 1
    assert not any(name == "airgate_prompt_tokens_total" and ("token", "-") in labels
                   for name, labels in samples)


async def test_labels_stay_bounded() -> None:
    metrics = ProxyMetrics([CHAT])
    for number in range(MAX_MODELS + 30):
        finish(metrics, exchange(model=f"model-{number}", completion_tokens=1))
    finish(metrics, exchange(route="/v1/secret-typo-path"))  # not from the allowlist: core bug
    finish(metrics, exchange(status=0))
    samples = scrape_of(metrics)
    models = {dict(labels)["model"] for name, labels in samples
              if name == "airgate_completion_tokens_total"}
    assert len(models) == MAX_MODELS + 1 and "other" in models
    assert value(samples, "airgate_completion_tokens_total", token="kibana", model="other") == 30
    assert value(samples, "airgate_requests_total", token="kibana", route="other",
                 status="other") == 0
    assert value(samples, "airgate_requests_total", token="kibana", route=CHAT,
                 status="other") == 1
    assert len(metrics._models) == MAX_MODELS


async def test_observer_histograms_errors_and_not_ready() -> None:
    metrics = ProxyMetrics([CHAT])
    finish(metrics, exchange(streamed=True, ttft=0.2, token_gaps=[0.01, 0.02, 0.5]))
    finish(metrics, exchange(status=503, upstream_error="refused", ttfb=None))
    finish(metrics, exchange(status=504, upstream_error="timeout", ttfb=None))
    finish(metrics, exchange(status=200, aborted="streaming"))
    finish(metrics, exchange(status=200, aborted="nonsense-phase"))
    metrics.auth_failed("missing")
    samples = scrape_of(metrics)
    assert value(samples, "airgate_time_to_first_token_seconds_count", route=CHAT) == 1
    assert value(samples, "airgate_time_to_first_token_seconds_bucket", route=CHAT,
                 le="0.25") == 1
    assert value(samples, "airgate_inter_token_gap_seconds_count", route=CHAT) == 3
    assert value(samples, "airgate_inter_token_gap_seconds_bucket", route=CHAT, le="0.02") == 2
    assert value(samples, "airgate_inter_token_gap_seconds_sum", route=CHAT) == pytest.approx(
        0.53)
    assert value(samples, "airgate_upstream_first_byte_seconds_count", route=CHAT) == 3
    assert value(samples, "airgate_request_duration_seconds_bucket", route=CHAT,
                 le="0.25") == 5  # a value equal to a bound is in that bucket (le)
    assert value(samples, "airgate_model_not_ready_total") == 1
    assert value(samples, "airgate_upstream_errors_total", kind="refused") == 1
    assert value(samples, "airgate_upstream_errors_total", kind="timeout") == 1
    assert value(samples, "airgate_client_aborts_total", phase="streaming") == 1
    assert value(samples, "airgate_client_aborts_total", phase="other") == 1
    assert value(samples, "airgate_auth_failures_total", reason="missing") == 1
    assert value(samples, "airgate_requests_in_flight") == 0


async def test_own_registry_never_the_global_one(make_settings: MakeSettings) -> None:
    obs = build_observability(make_settings())
    try:
        assert obs.registry is not REGISTRY
        assert b"airgate_requests_in_flight" not in generate_latest(REGISTRY)
        assert b"airgate_requests_in_flight" in obs.metrics_text()
    finally:
        await obs.close()


# -- launcher and GPU ---------------------------------------------------------------------------

def collect(*collectors: Any) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return parse(generate_latest(registry).decode())


async def test_launcher_collector_reads_status_at_scrape_time() -> None:
    status = LauncherStatus(state="loading", progress=0.4, restarts=2, last_exit_code=-9,
                            time_to_ready=95.5, health_latency=0.003, since=1_700_000_000.0)
    current = [status]
    collector = LauncherCollector(lambda: current[0])
    samples = collect(collector)
    assert value(samples, "airgate_launcher_state", state="loading") == 1
    assert value(samples, "airgate_launcher_state", state="ready") == 0
    assert value(samples, "airgate_launcher_restarts_total") == 2
    assert value(samples, "airgate_launcher_last_exit_code") == -9
    assert value(samples, "airgate_launcher_load_progress_ratio") == 0.4
    assert value(samples, "airgate_launcher_time_to_ready_seconds") == 95.5
    assert value(samples, "airgate_launcher_health_latency_seconds") == 0.003
    assert value(samples, "airgate_launcher_state_since_timestamp_seconds") == 1.7e9
    current[0] = LauncherStatus(state="ready")
    samples = collect(collector)
    assert value(samples, "airgate_launcher_state", state="ready") == 1
    assert ("airgate_launcher_last_exit_code", frozenset()) not in samples  # None: no series


async def test_launcher_status_from_the_state_file(tmp_path: Path) -> None:
    path = tmp_path / "launcher.json"
    source = state_file_source(str(path))
    assert collect(LauncherCollector(source)) == {}  # no launcher: no series, no error
    write_state_file(str(path), LauncherStatus(state="backoff", restarts=3), {"child_pid": 1})
    samples = collect(LauncherCollector(source))
    assert value(samples, "airgate_launcher_state", state="backoff") == 1
    assert value(samples, "airgate_launcher_restarts_total") == 3


async def test_launcher_collector_survives_a_failing_source() -> None:
    def broken() -> LauncherStatus:
        raise RuntimeError("boom")

    assert collect(LauncherCollector(broken)) == {}


async def test_no_gpu_library_means_no_gpu_series(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    gpu = GpuCollector()
    assert collect(gpu) == {}
    assert collect(gpu) == {}  # and it does not try again on every scrape


async def test_gpu_series_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("pynvml")
    calls: list[str] = []
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30))
    fake.nvmlDeviceGetUtilizationRates = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(gpu=50 + h, memory=10))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu = GpuCollector()
    samples = collect(gpu)
    assert value(samples, "airgate_gpu_memory_used_bytes", gpu="1") == 2 * 2**30
    assert value(samples, "airgate_gpu_memory_total_bytes", gpu="0") == 80 * 2**30
    assert value(samples, "airgate_gpu_utilization_ratio", gpu="1") == 0.51
    gpu.close()
    assert calls == ["init", "shutdown"]


# -- relay ---------------------------------------------------------------------------------------

async def test_relay_keeps_vllm_families_byte_for_byte() -> None:
    page = (b"# HELP python_gc_objects_collected_total Objects collected during gc\n"
            b"# TYPE python_gc_objects_collected_total counter\n"
            b'python_gc_objects_collected_total{generation="0"} 1.0\n'
            b"# HELP vllm:num_requests_running Number of requests.\n"
            b"# TYPE vllm:num_requests_running gauge\n"
            b'vllm:num_requests_running{model_name="m",engine="0"} 3.0\n'
            b"# HELP process_cpu_seconds_total CPU.\n"
            b"process_cpu_seconds_total 12.5\n")
    assert vllm_families(page) == (
        b"# HELP vllm:num_requests_running Number of requests.\n"
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{model_name="m",engine="0"} 3.0\n')
    assert vllm_families(b"") == b""


async def test_relay_never_reuses_a_connection_vllm_may_be_closing(
    simulator: RunningSimulator,
) -> None:
    # vLLM drops idle keep-alive connections after 5 s, about a scrape interval: a GET sent
    # into one it is closing fails, and that scrape would lose every vllm: family.
    relay = VllmRelay(simulator.url, timeout=5)
    try:
        before = simulator.stats.connections_total
        for _ in range(3):
            assert await relay.fetch()
            assert b"vllm:" in relay.text
        assert simulator.stats.connections_total - before == 3
    finally:
        await relay.close()


async def test_host_metrics_off_for_all_workers_but_one(
    make_settings: MakeSettings, simulator: RunningSimulator, tmp_path: Path,
) -> None:
    state_file = tmp_path / "launcher.json"
    write_state_file(str(state_file), LauncherStatus(state="ready"), {})
    settings = make_settings(simulator.url, launcher={"state_file": str(state_file)})
    worker, host = (build_observability(settings, host_metrics=flag) for flag in (False, True))
    try:
        finish(worker.metrics, exchange())
        quiet = (await worker.render()).decode()
        full = (await host.render()).decode()
    finally:
        await worker.close()
        await host.close()
    assert 'airgate_requests_total{' in quiet
    for family in ("airgate_launcher_state", "airgate_upstream_metrics_up", "airgate_build_info",
                   "# TYPE vllm:"):
        assert family not in quiet
        assert family in full
    assert simulator.stats.paths.count("/metrics") == 1  # only the host-metrics one asked vLLM


# -- every way an exchange can end finishes it exactly once --------------------------------------

async def raw_tls(gate: Observed, tls: TLSFiles) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gate.server.https_port,
                                         ssl=tls.client_context, server_hostname="localhost")


async def test_every_ending_leaves_nothing_in_flight(
    observed: StartObserved, simulator: RunningSimulator, tokens: Tokens, tls: TLSFiles,
    client: aiohttp.ClientSession,
) -> None:
    """The in-flight gauge is started+1 / finished-1: an ending that forgets to finish its
    exchange (or finishes it twice) shows here as a gauge that never returns to 0."""
    gate = await observed(simulator.url, server={"header_timeout": 0.4},
                          upstream={"max_body": "1KiB", "read_timeout": 0.5})
    good = auth(tokens.kibana)
    endings = 0

    async def post(headers: dict[str, str], body: Any = KIBANA_TEST_BODY,
                   path: str = CHAT) -> None:
        nonlocal endings
        endings += 1
        with contextlib.suppress(aiohttp.ClientError):
            async with client.post(gate.url + path, json=body, headers=headers) as resp:
                await resp.read()

    await post(good)                                             # 200
    await post(good, {**KIBANA_TEST_BODY, "stream": True})       # 200 stream
    await post({})                                               # 401
    await post(good, path="/v1/nope")                            # 404
    await post(good, {"padding": "x" * 2000})                    # 413
    for fail in ("empty-500", "bad-response", "close", "flat-error"):
        await post({**good, "x-sim-fail": fail})                 # vLLM misbehaves
    await post({**good, "x-sim-fail": "die-mid-stream"}, {**KIBANA_TEST_BODY, "stream": True})
    await post({**good, "x-sim-ttft": "5"})                      # 504 read timeout

    # The client hangs up: while sending, while waiting, while streaming.
    reader, writer = await raw_tls(gate, tls)
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens.kibana}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 900\r\n\r\n{\"m".encode())
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    endings += 1
    reader, writer = await raw_tls(gate, tls)
    body = json.dumps(KIBANA_TEST_BODY).encode()
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens.kibana}\r\n"
                 f"x-sim-ttft: 30\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await simulator.stats.wait_for(lambda: simulator.stats.running >= 1)
    writer.close()
    endings += 1
    reader, writer = await raw_tls(gate, tls)
    body = json.dumps({**KIBANA_TEST_BODY, "stream": True}).encode()
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens.kibana}\r\n"
                 f"x-sim-interval: 0.05\r\nx-sim-tokens: 400\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await reader.readuntil(b"data: ")
    writer.close()
    endings += 1
    # A head that never completes: 408 after header_timeout.
    reader, writer = await raw_tls(gate, tls)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    await reader.read()
    writer.close()
    endings += 1
    # A connection that says nothing at all is no exchange.
    reader, writer = await raw_tls(gate, tls)
    await reader.read()
    writer.close()

    await simulator.stats.wait_aborted(2, timeout=3.0)
    await gate.settled()
    async with aiohttp.ClientSession() as plain:
        _, samples = await gate.scrape(plain)
    assert value(samples, "airgate_requests_in_flight") == 0
    answered = sum(v for (name, _), v in samples.items() if name == "airgate_requests_total")
    assert answered == endings
    for phase in ("request", "waiting", "streaming"):
        assert value(samples, "airgate_client_aborts_total", phase=phase) == 1, phase
    assert value(samples, "airgate_upstream_errors_total", kind="timeout") == 1
    assert value(samples, "airgate_upstream_errors_total", kind="bad_response") >= 1
