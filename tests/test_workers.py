"""`[server] workers = 2`: two processes on one port, one /metrics that adds them up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import KIBANA_TEST_BODY, TLSFiles, Tokens, children_of, free_port, write_config
from proxy.simulator import RunningSimulator

ROOT = Path(__file__).resolve().parent.parent


async def wait_until(predicate: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    async with asyncio.timeout(seconds):
        while not await predicate():  # noqa: ASYNC110 - another process: no event to await
            await asyncio.sleep(0.1)


async def requests_total(metrics_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(metrics_url) as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "airgate_requests" for sample in family.samples
               if sample.name == "airgate_requests_total")


@pytest.fixture
async def two_workers(tmp_path: Path, tls: TLSFiles, tokens: Tokens,
                      simulator: RunningSimulator) -> AsyncIterator[tuple[str, str, int]]:
    https, metrics = free_port(), free_port()
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"https": f"127.0.0.1:{https}", "http": "", "cert": str(tls.cert_pem),
                   "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
        "upstream": {"url": simulator.url},
        "metrics": {"listen": f"127.0.0.1:{metrics}"},
        "log": {"access": "off"},
        "server": {"workers": 2, "drain_timeout": 5},
    })
    process = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)], cwd=ROOT)
    url = f"https://127.0.0.1:{https}"

    async def listening() -> bool:
        return len(children_of(process.pid)) == 2 and await _accepts(https)

    await wait_until(listening)
    yield url, f"http://127.0.0.1:{metrics}/metrics", process.pid
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 20) == 0


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_two_workers_share_the_port_and_metrics_add_up(
    two_workers: tuple[str, str, int], tokens: Tokens, tls: TLSFiles
) -> None:
    url, metrics_url, parent = two_workers
    auth = {"Authorization": f"Bearer {tokens.kibana}"}
    for _ in range(30):  # a new connection each time, so the kernel spreads them
        connector = aiohttp.TCPConnector(ssl=tls.client_context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(url + "/v1/chat/completions", json=KIBANA_TEST_BODY,
                                    headers=auth) as resp:
                assert resp.status == 200
    assert await requests_total(metrics_url) == 30
    # a worker that dies is started again, and the port keeps answering meanwhile
    first = children_of(parent)[0]
    os.kill(first, signal.SIGKILL)

    async def replaced() -> bool:
        now = children_of(parent)
        return len(now) == 2 and first not in now

    await wait_until(replaced)
    connector = aiohttp.TCPConnector(ssl=tls.client_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url + "/v1/models", headers=auth) as resp:
            assert resp.status == 200
    # what the dead worker had counted is carried over: the counter did not go down
    assert await requests_total(metrics_url) == 31
