"""Abuse limits and connection hygiene: failed-auth throttling per address, per-token
concurrency and rate limits, slowloris and idle timeouts, header limits, the TLS handshake
timeout, optional client certificates. Every refusal is a JSON error (429 with Retry-After where
waiting helps) and never reaches vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from typing import Any

import aiohttp
import pytest
import trustme

from conftest import KIBANA_TEST_BODY, StartProxy, TLSFiles, Tokens, reached_vllm
from proxy import auth
from proxy.auth import FailureThrottle, TokenLimits
from proxy.server import ProxyServer
from proxy.settings import AuthSettings
from proxy.simulator import RunningSimulator

CHAT = "/v1/chat/completions"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def url(server: ProxyServer, path: str = "/v1/models") -> str:
    return f"https://127.0.0.1:{server.https_port}{path}"


async def tls_connect(server: ProxyServer, tls: TLSFiles
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.https_port,
                                         ssl=tls.client_context, server_hostname="localhost")


async def read_all(reader: asyncio.StreamReader, limit: float = 5.0) -> bytes:
    """Everything until the proxy closes (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), limit)
    except (ConnectionResetError, ssl.SSLError):
        return b""


def parse(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


async def check_429(resp: aiohttp.ClientResponse, code: str) -> int:
    assert resp.status == 429
    retry_after = int(resp.headers["Retry-After"])
    body = await resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "rate_limit_error"
    assert f"retry in {retry_after} s" in body["error"]["message"]
    return retry_after


# ---- failed-auth throttling -----------------------------------------------------------------

async def test_failed_auth_blocks_address_even_for_right_token_until_block_ends(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, auth={"fail_limit": 3, "fail_window": 30,
                                                    "block_seconds": 1})
    for _ in range(3):
        async with client.get(url(server), headers=bearer("guess")) as resp:
            assert resp.status == 401
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        retry_after = await check_429(resp, "auth_throttled")
    assert retry_after == 1
    assert reached_vllm(simulator) == []
    # Guessing on while blocked gains nothing and does not need a token check at all.
    async with client.get(url(server), headers=bearer("guess")) as resp:
        await check_429(resp, "auth_throttled")
    # Retry-After is the truth: after it, the right token works again.
    await asyncio.sleep(retry_after)
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        assert resp.status == 200


async def test_throttle_is_per_address(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
) -> None:
    server = await start_proxy(simulator.url, auth={"fail_limit": 2, "block_seconds": 30})

    async def get(source: str, token: str) -> int:
        # 127.0.0.2 is another client address on the loopback network.
        connector = aiohttp.TCPConnector(ssl=tls.client_context, local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.get(url(server), headers=bearer(token)) as resp:
            return resp.status

    assert [await get("127.0.0.2", "guess") for _ in range(2)] == [401, 401]
    assert await get("127.0.0.2", tokens.kibana) == 429
    assert await get("127.0.0.1", tokens.kibana) == 200


async def test_failures_outside_the_window_do_not_add_up() -> None:
    throttle = FailureThrottle(AuthSettings(fail_limit=3, fail_window=10, block_seconds=60))
    for now in (0.0, 6.0, 12.0, 18.0):  # never 3 within 10 s
        assert throttle.check("a", now) is None
        throttle.failure("a", now)
    assert throttle.check("a", 18.5) is None
    throttle.failure("a", 19.0)  # 12, 18, 19: three within 10 s
    blocked = throttle.check("a", 19.5)
    assert blocked is not None and b"Retry-After: 60\r\n" in blocked
    assert throttle.check("a", 79.0) is None
    throttle.failure("a", 79.5)  # the old failures were forgotten with the block
    assert throttle.check("a", 80.0) is None


def test_throttle_zero_disables_it() -> None:
    throttle = FailureThrottle(AuthSettings(fail_limit=0))
    for now in range(100):
        throttle.failure("a", float(now))
    assert throttle.check("a", 100.0) is None


def test_throttle_memory_is_bounded_under_an_address_spray(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "MAX_TRACKED_ADDRESSES", 50)
    throttle = FailureThrottle(AuthSettings(fail_limit=1, block_seconds=1000))
    for index in range(500):
        throttle.failure(f"10.0.{index // 256}.{index % 256}", float(index))
    assert len(throttle._failures) <= 50
    assert len(throttle._blocked) <= 50
    assert throttle.check("10.0.1.243", 500.0) is not None  # the newest block is kept


# ---- per-token limits -----------------------------------------------------------------------

async def test_per_token_concurrency_limit(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, auth={"max_concurrent": 1})
    slow = {**bearer(tokens.kibana), "x-sim-tokens": "40", "x-sim-interval": "0.02"}
    stream = await client.post(url(server, CHAT), headers=slow,
                               json={**KIBANA_TEST_BODY, "stream": True})
    await stream.content.readline()
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        assert await check_429(resp, "concurrency_limit") >= 1
        assert "max_concurrent" in (await resp.json())["error"]["message"]
    async with client.get(url(server), headers=bearer(tokens.ops)) as resp:
        assert resp.status == 200  # the limit is per token
    await stream.read()
    stream.release()
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        assert resp.status == 200  # released when the stream ended


async def test_concurrency_slot_is_released_when_the_client_hangs_up(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, auth={"max_concurrent": 1})
    slow = {**bearer(tokens.kibana), "x-sim-tokens": "400", "x-sim-interval": "0.02"}
    async with aiohttp.ClientSession() as other:
        resp = await other.post(url(server, CHAT), headers=slow, ssl=tls.client_context,
                                json={**KIBANA_TEST_BODY, "stream": True})
        await resp.content.readline()
        resp.close()
    await simulator.stats.wait_aborted(1)
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        assert resp.status == 200


async def test_per_token_requests_per_minute(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, auth={"requests_per_minute": 2})
    for _ in range(2):
        async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
            assert resp.status == 200
    async with client.get(url(server), headers=bearer(tokens.kibana)) as resp:
        retry_after = await check_429(resp, "rate_limit")
    assert 50 <= retry_after <= 60
    async with client.get(url(server), headers=bearer(tokens.ops)) as resp:
        assert resp.status == 200
    assert len(reached_vllm(simulator)) == 3


def test_rate_window_slides() -> None:
    limits = TokenLimits(AuthSettings(requests_per_minute=2))
    assert limits.acquire("k", 0.0) is None
    limits.release("k")
    assert limits.acquire("k", 30.0) is None
    limits.release("k")
    refusal = limits.acquire("k", 59.0)
    assert refusal is not None and b"Retry-After: 1\r\n" in refusal
    assert limits.acquire("k", 60.0) is None  # the request at 0 s left the window


def test_limits_off_by_default() -> None:
    limits = TokenLimits(AuthSettings())
    assert not limits.enabled


# ---- connection hygiene ---------------------------------------------------------------------

async def test_slowloris_head_gets_408_then_close(
    simulator: RunningSimulator, start_proxy: StartProxy, tls: TLSFiles, tokens: Tokens,
) -> None:
    server = await start_proxy(simulator.url, server={"header_timeout": 0.5})
    reader, writer = await tls_connect(server, tls)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()

    async def trickle() -> None:
        # One header byte every 0.1 s: activity, but the head as a whole is late.
        with contextlib.suppress(ConnectionError, RuntimeError):
            for byte in b"X-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

    trickling = asyncio.ensure_future(trickle())
    response = await read_all(reader)
    elapsed = time.monotonic() - started
    trickling.cancel()
    writer.close()
    status, headers, body = parse(response)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert 0.4 <= elapsed < 2.0
    assert reached_vllm(simulator) == []


async def test_stalled_request_body_gets_408(
    simulator: RunningSimulator, start_proxy: StartProxy, tls: TLSFiles, tokens: Tokens,
) -> None:
    server = await start_proxy(simulator.url, server={"header_timeout": 0.5})
    reader, writer = await tls_connect(server, tls)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + tokens.kibana.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\":")
    status, _, body = parse(await read_all(reader))
    writer.close()
    assert status == 408 and body["error"]["code"] == "request_timeout"
    # vLLM got a part of the body and must see the connection close, not wait for the rest.
    await simulator.stats.wait_open_connections(0)


async def test_silent_connection_is_closed_after_header_timeout(
    start_proxy: StartProxy, tls: TLSFiles
) -> None:
    server = await start_proxy(server={"header_timeout": 0.5})
    reader, writer = await tls_connect(server, tls)
    started = time.monotonic()
    assert await read_all(reader) == b""
    assert 0.4 <= time.monotonic() - started < 2.0
    writer.close()


async def test_keepalive_idle_timeout_closes_idle_connection(
    simulator: RunningSimulator, start_proxy: StartProxy, tls: TLSFiles, tokens: Tokens,
) -> None:
    server = await start_proxy(simulator.url, server={"keepalive_timeout": 0.6,
                                                      "header_timeout": 5})
    reader, writer = await tls_connect(server, tls)
    request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + tokens.kibana.encode() + b"\r\n\r\n")
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    await reader.readexactly(length)
    # Idle but under the limit: still open, a second request is served.
    writer.write(request)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(length)
    served = time.monotonic()
    assert await read_all(reader) == b""  # closed, without a response, once idle too long
    assert 0.5 <= time.monotonic() - served < 2.5
    writer.close()


async def test_oversized_header_gets_431(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, server={"max_header_size": "2KiB"})
    async with client.get(url(server), headers={**bearer(tokens.kibana),
                                                "X-Big": "b" * 1500}) as resp:
        assert resp.status == 200  # under the limit
    async with client.get(url(server), headers={**bearer(tokens.kibana),
                                                "X-Big": "b" * 3000}) as resp:
        assert resp.status == 431
        body = await resp.json()
    assert "max_header_size" in body["error"]["message"]
    assert len(reached_vllm(simulator)) == 1


async def test_too_many_headers_gets_431(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, server={"max_headers": 10})
    many = {f"X-H{index}": "v" for index in range(12)}
    async with client.get(url(server), headers={**bearer(tokens.kibana), **many}) as resp:
        assert resp.status == 431
        assert (await resp.json())["error"]["code"] == "request_header_fields_too_large"
    assert reached_vllm(simulator) == []


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00"], ids=["nothing", "half-hello"])
async def test_tls_handshake_timeout(start_proxy: StartProxy, sent: bytes) -> None:
    server = await start_proxy(listen={"tls_handshake_timeout": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.https_port)
    writer.write(sent)
    started = time.monotonic()
    assert await read_all(reader) == b""
    assert 0.4 <= time.monotonic() - started < 2.5
    writer.close()


async def test_max_connections(
    simulator: RunningSimulator, start_proxy: StartProxy, tls: TLSFiles, tokens: Tokens,
) -> None:
    server = await start_proxy(simulator.url, server={"max_connections": 2})
    held = [await tls_connect(server, tls) for _ in range(2)]
    reader, writer = await tls_connect(server, tls)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + tokens.kibana.encode() + b"\r\n\r\n")
    # Over the limit: a quick 503 (or a close), not a served request.
    response = await read_all(reader, limit=2.0)
    assert not response.startswith(b"HTTP/1.1 200")
    if response:
        assert parse(response)[0] == 503
    for _, held_writer in held:
        held_writer.close()


# ---- client certificates --------------------------------------------------------------------

def client_context(tls: TLSFiles, issuer: trustme.CA | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_pem))
    if issuer is not None:
        issuer.issue_cert("kibana@example.com").configure_cert(context)
    return context


async def test_client_certificate_required_with_client_ca(
    simulator: RunningSimulator, start_proxy: StartProxy, tls: TLSFiles, tokens: Tokens,
) -> None:
    # Kibana's connector in PKI mode presents a certificate signed by the site's CA.
    server = await start_proxy(simulator.url, listen={"client_ca": str(tls.ca_pem)})

    async def get(context: ssl.SSLContext) -> int:
        connector = aiohttp.TCPConnector(ssl=context, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session, \
                session.get(url(server), headers=bearer(tokens.kibana)) as resp:
            return resp.status

    assert await get(client_context(tls, tls.ca)) == 200
    for issuer in (None, trustme.CA()):  # no certificate, or one from a stranger's CA
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get(client_context(tls, issuer))
    assert len(reached_vllm(simulator)) == 1
    assert await get(client_context(tls, tls.ca)) == 200  # and it keeps serving


async def test_client_certificate_optional_without_client_ca(
    gate: Any, tls: TLSFiles,
) -> None:
    connector = aiohttp.TCPConnector(ssl=client_context(tls, None))
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get(gate.url + "/v1/models", headers=gate.auth) as resp:
        assert resp.status == 200
