"""`airgate run` end to end: the launcher runs the stand-in vLLM as a real process, the proxy
answers 503 + Retry-After while it loads or restarts, and traffic flows once it is ready."""

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

from conftest import KIBANA_TEST_BODY, TLSFiles, Tokens, children_of, free_port, write_config

ROOT = Path(__file__).resolve().parent.parent


async def wait_until(predicate: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    async with asyncio.timeout(seconds):
        while not await predicate():  # noqa: ASYNC110 - another process: no event to await
            await asyncio.sleep(0.1)


@pytest.fixture
async def airgate_run(tmp_path: Path, tls: TLSFiles, tokens: Tokens
                      ) -> AsyncIterator[tuple[str, int]]:
    https, vllm = free_port(), free_port()
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"https": f"127.0.0.1:{https}", "http": "", "cert": str(tls.cert_pem),
                   "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
        "upstream": {"url": f"http://127.0.0.1:{vllm}", "health_interval": 0.2},
        "metrics": {"listen": ""},
        "log": {"access": "off"},
        "launcher": {
            "runtime": "process", "model": "sim-model", "preset": "hermes", "port": vllm,
            "vllm_command": [sys.executable, "-m", "proxy.simulator"],
            # the stand-in "loads" for a second, printing vLLM-like progress lines
            "extra_args": ["--load-seconds", "1", "--ttft", "0.01"],
            "state_file": str(tmp_path / "launcher.json"), "health_interval": 0.2,
            "backoff_initial": 0.5, "stop_timeout": 5, "hf_cache": str(tmp_path),
            "offline": False,  # the stand-in has no weights to find in the cache
        },
    })
    process = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        [sys.executable, "-m", "proxy.cli", "run", "--config", str(config)], cwd=ROOT)
    yield f"https://127.0.0.1:{https}", process.pid
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert children_of(process.pid) == []


async def test_run_serves_503_while_loading_and_restarting_then_200(
    airgate_run: tuple[str, int], tokens: Tokens, tls: TLSFiles
) -> None:
    url, pid = airgate_run
    auth = {"Authorization": f"Bearer {tokens.kibana}"}
    connector = aiohttp.TCPConnector(ssl=tls.client_context)
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def answered(expected: int) -> bool:
            try:
                async with session.post(url + "/v1/chat/completions", json=KIBANA_TEST_BODY,
                                        headers=auth) as resp:
                    statuses.append(resp.status)
                    if resp.status == 503:
                        assert 1 <= int(resp.headers["Retry-After"]) <= 30
                        message = (await resp.json())["error"]["message"]
                        assert "not ready" in message
                    return resp.status == expected
            except aiohttp.ClientConnectorError:
                return False  # the proxy itself is not listening yet

        await wait_until(lambda: answered(503))  # loading
        await wait_until(lambda: answered(200))  # ready
        model_server = children_of(pid)
        assert len(model_server) == 1
        os.kill(model_server[0], signal.SIGKILL)  # the engine dies mid-traffic
        await wait_until(lambda: answered(503))  # restarting
        await wait_until(lambda: answered(200))  # back
    assert statuses.count(200) >= 2 and 503 in statuses
