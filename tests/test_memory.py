"""Memory after bursts: idle upstream sockets are let go, freed heap is handed back."""

from __future__ import annotations

import asyncio

import aiohttp

from conftest import KIBANA_TEST_BODY, StartProxy, TLSFiles, Tokens
from proxy.memory import TRIM_AFTER_PEAK, BurstTrimmer
from proxy.simulator import SimulatorConfig, start_simulator


def test_trims_once_connections_fall_to_a_quarter_of_the_peak() -> None:
    trimmer = BurstTrimmer()
    for count in (10, 500, 1000):
        assert not trimmer.observe(count)
    assert not trimmer.observe(300)       # still above a quarter of the peak
    assert trimmer.observe(200)           # the burst is over
    assert not trimmer.observe(150)       # and not again until a new peak
    assert trimmer.trims == 1
    small = BurstTrimmer()
    small.observe(TRIM_AFTER_PEAK - 1)
    assert not small.observe(0)           # small peaks are not worth a trim


async def test_idle_upstream_connections_are_closed_after_a_burst(
    start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles
) -> None:
    sim = await start_simulator(SimulatorConfig(ttft=0.05, keepalive_timeout=30.0))
    try:
        server = await start_proxy(sim.url, upstream={"pool_idle_timeout": 0.3},
                                   server={"keepalive_timeout": 0.5})
        url = f"https://127.0.0.1:{server.https_port}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {tokens.kibana}"}

        async def one() -> int:
            connector = aiohttp.TCPConnector(ssl=tls.client_context)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.post(url, json=KIBANA_TEST_BODY, headers=auth) as resp:
                    await resp.read()
                    return resp.status

        assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20
        # the clients are gone; their upstream connections went back to the pool, and the
        # pool lets them go once they are too old to reuse — vLLM sees them close
        await sim.stats.wait_for(lambda: sim.stats.open_connections == 0, timeout=5.0)
    finally:
        await sim.close()
