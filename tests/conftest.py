"""Shared fixtures: real TLS (trustme), a real stand-in vLLM, the real proxy on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import uvloop

from proxy.exchange import Exchange, ExchangeObserver
from proxy.server import ProxyServer
from proxy.settings import Settings, load_settings
from proxy.simulator import RecordedRequest, RunningSimulator, SimulatorConfig, start_simulator
from proxy.tokens import append_token
from proxy.upstream import HEALTH_USER_AGENT

# The real-vLLM suite (tests/e2e, `make e2e`) needs a 3.5 GB install; `make test` leaves it out
# so that its own conftest (imported as `conftest` too) is never loaded beside this one.
collect_ignore = [] if os.environ.get("AIRGATE_E2E") == "1" else ["e2e"]


@dataclass
class TLSFiles:
    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path        # leaf certificate chain + key, one PEM file
    client_context: ssl.SSLContext


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost", "llm.example.com")
    cert_pem = directory / "server.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    context = ssl.create_default_context(cafile=str(ca_pem))
    return TLSFiles(ca, ca_pem, cert_pem, context)


@dataclass
class Tokens:
    path: Path
    kibana: str
    ops: str


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    path = tmp_path / "tokens"
    kibana = append_token(path, "kibana")
    ops = append_token(path, "ops")
    return Tokens(path, kibana, ops)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, tls: TLSFiles, tokens: Tokens) -> MakeSettings:
    """Settings for a proxy on 127.0.0.1:0 in front of `upstream`; `sections` override keys."""

    def make(upstream_url: str = "http://127.0.0.1:9", **sections: dict[str, Any]) -> Settings:
        config: dict[str, dict[str, Any]] = {
            "listen": {"https": "127.0.0.1:0", "http": "", "server_name": "localhost",
                       "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
            "auth": {"tokens_file": str(tokens.path)},
            "upstream": {"url": upstream_url, "health_interval": 0.2},
            "metrics": {"listen": ""},
            "log": {"access": "off"},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        return load_settings(write_config(tmp_path / "airgate.toml", config))

    return make


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig(ttft=0.01, token_interval=0.005))
    yield running
    await running.close()


StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
async def start_proxy(make_settings: MakeSettings) -> AsyncIterator[StartProxy]:
    started: list[ProxyServer] = []

    async def start(upstream_url: str = "http://127.0.0.1:9", *,
                    observer: ExchangeObserver | None = None,
                    **sections: dict[str, Any]) -> ProxyServer:
        server = ProxyServer(make_settings(upstream_url, **sections), observer=observer)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@dataclass
class Gate:
    """A running proxy in front of a running simulator, and what a client needs."""

    server: ProxyServer
    sim: RunningSimulator
    url: str
    token: str
    tls: TLSFiles

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
async def gate(simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
               tls: TLSFiles) -> Gate:
    server = await start_proxy(simulator.url)
    return Gate(server, simulator, f"https://127.0.0.1:{server.https_port}", tokens.kibana, tls)


@pytest.fixture
async def client(tls: TLSFiles) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=tls.client_context)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"


KIBANA_TEST_BODY = {"model": "sim-model", "messages": [{"role": "user", "content": "Hello world"}]}


def sse_events(raw: bytes) -> list[str]:
    """Parse an event stream the way Kibana's connector does: only `data: ` lines count."""
    return [line[len("data: "):] for line in raw.decode().split("\n") if line.startswith("data: ")]


def reached_vllm(sim: RunningSimulator) -> list[str]:
    """Requests that reached the stand-in vLLM, ignoring the proxy's own health checks."""
    return [f"{r.method} {r.path}" for r in sim.stats.requests if not _from_health_checker(r)]


def _from_health_checker(request: RecordedRequest) -> bool:
    return request.headers.get("user-agent") == HEALTH_USER_AGENT


def last_request(sim: RunningSimulator) -> RecordedRequest:
    """The newest request that reached the stand-in vLLM, other than a health check."""
    return next(r for r in reversed(sim.stats.requests) if not _from_health_checker(r))


class Recorder:
    """An ExchangeObserver that keeps what the core reported, for assertions."""

    def __init__(self) -> None:
        self.finished: list[Exchange] = []
        self.auth_failures: list[str] = []

    def exchange_started(self, exchange: Exchange) -> None:
        pass

    def exchange_finished(self, exchange: Exchange) -> None:
        self.finished.append(exchange)

    def auth_failed(self, reason: str) -> None:
        self.auth_failures.append(reason)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on uvloop, as `airgate serve` does in production."""
    return {"uvloop": uvloop.new_event_loop}


def free_port() -> int:
    """A port free now on 127.0.0.1, for servers started as separate processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def children_of(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []
