"""Bad input and faults: hostile or broken requests, and a broken vLLM. Every case expects a
clear JSON 4xx/5xx (or a clean close where HTTP cannot be spoken) and a proxy that keeps
serving: each test ends with a normal request."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

import aiohttp
import pytest

from conftest import (
    KIBANA_TEST_BODY,
    Gate,
    StartProxy,
    TLSFiles,
    Tokens,
    reached_vllm,
    sse_events,
)
from proxy.forward import ClientConnection
from proxy.server import ProxyServer
from proxy.simulator import RunningSimulator

CHAT = "/v1/chat/completions"


async def exchange(port: int, tls: TLSFiles, data: bytes, limit: float = 5.0) -> bytes:
    """Send raw bytes over TLS and read until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client_context,
                                                   server_hostname="localhost")
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), limit)
    except (ConnectionResetError, ssl.SSLError):
        return b""
    finally:
        writer.close()


def parse(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), response[:200]
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, json.loads(body)


async def still_serves(server: ProxyServer, tls: TLSFiles, token: str) -> None:
    connector = aiohttp.TCPConnector(ssl=tls.client_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"https://127.0.0.1:{server.https_port}{CHAT}",
                                headers={"Authorization": f"Bearer {token}"},
                                json={**KIBANA_TEST_BODY, "max_tokens": 2}) as resp:
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 2


def head(token: str, *lines: str, method: str = "POST", target: str = CHAT) -> bytes:
    text = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
    return (text + "".join(line + "\r\n" for line in lines) + "\r\n").encode("latin-1")


# ---- malformed and hostile requests ---------------------------------------------------------

SMUGGLE = b'GET /pause HTTP/1.1\r\nHost: x\r\n\r\n'
BAD_REQUESTS: dict[str, tuple[Any, set[int]]] = {
    # request smuggling: two framings, or a framing that two parsers could read differently
    "cl-and-te": (lambda t: head(t, "Content-Length: 5", "Transfer-Encoding: chunked")
                  + b"0\r\n\r\n" + SMUGGLE, {400}),
    "te-and-cl": (lambda t: head(t, "Transfer-Encoding: chunked", "Content-Length: 40")
                  + b"0\r\n\r\n" + SMUGGLE, {400}),
    "two-content-lengths": (lambda t: head(t, "Content-Length: 2", "Content-Length: 40")
                            + b"{}" + SMUGGLE, {400}),
    "content-length-list": (lambda t: head(t, "Content-Length: 2, 40") + b"{}", {400}),
    "negative-content-length": (lambda t: head(t, "Content-Length: -1"), {400}),
    "plus-content-length": (lambda t: head(t, "Content-Length: +2") + b"{}", {400}),
    "huge-content-length": (lambda t: head(t, "Content-Length: 99999999999999999999999"),
                            {400, 413}),
    "bad-chunk-size": (lambda t: head(t, "Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n",
                       {400}),
    "overflowing-chunk-size": (lambda t: head(t, "Transfer-Encoding: chunked")
                               + b"fffffffffffffffffffff\r\n{}", {400, 413}),
    "chunk-without-crlf": (lambda t: head(t, "Transfer-Encoding: chunked")
                           + b"2\r\n{}XX0\r\n\r\n", {400}),
    "te-not-chunked": (lambda t: head(t, "Transfer-Encoding: gzip") + b"{}", {400, 501}),
    "te-chunked-then-other": (lambda t: head(t, "Transfer-Encoding: chunked, gzip"),
                              {400, 501}),
    "te-with-space-before-colon": (lambda t: head(t, "Transfer-Encoding : chunked")
                                   + b"0\r\n\r\n", {400}),
    "obs-fold": (lambda t: head(t, "X-A: one", " folded", "Content-Length: 2") + b"{}", {400}),
    "folded-te": (lambda t: head(t, "X-A: one", " Transfer-Encoding: chunked") + b"0\r\n\r\n",
                  {400}),
    # invalid heads
    "nul-in-header-value": (lambda t: head(t, "X-A: a\x00b"), {400}),
    "nul-in-path": (lambda t: head(t, target="/v1/models\x00/x", method="GET"), {400}),
    "space-in-header-name": (lambda t: head(t, "X A: 1"), {400}),
    "header-without-colon": (lambda t: head(t, "Garbage"), {400}),
    "bare-lf": (lambda t: f"GET /v1/models HTTP/1.1\nAuthorization: Bearer {t}\n\n".encode(),
                {400}),
    "bare-cr": (lambda t: head(t, "X-A: a\rb"), {400}),
    "unknown-method": (lambda t: head(t, method="FOO"), {400, 404, 405}),
    "lowercase-method": (lambda t: head(t, method="post"), {400, 404, 405}),
    "connect": (lambda t: head(t, method="CONNECT", target="127.0.0.1:8000"), {400, 404, 405}),
    "upgrade": (lambda t: head(t, "Connection: Upgrade", "Upgrade: websocket", method="GET",
                               target="/v1/models"), {400}),
    "http2-preface": (lambda t: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    # HTTP/0.9 has no headers, so no token: refused either way
    "http-0.9": (lambda t: b"GET /v1/models\r\n\r\n", {400, 401, 505}),
    "huge-url": (lambda t: head(t, target="/v1/" + "a" * 100_000, method="GET"), {414, 431}),
    "utf8-path": (lambda t: head(t, target="/v1/mod\u00e9ls", method="GET").replace(
        b"\xe9", "\u00e9".encode()), {400, 404}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_malformed_request_gets_json_error_and_proxy_keeps_serving(
    gate: Gate, tls: TLSFiles, case: str
) -> None:
    build, expected = BAD_REQUESTS[case]
    response = await exchange(gate.server.https_port, tls, build(gate.token))
    status, headers, body = parse(response)
    assert status in expected, (status, body)
    assert body["error"]["message"] and body["error"]["type"]
    assert headers["connection"] == "close"  # framing can't be trusted past a bad request
    assert reached_vllm(gate.sim) == []  # nothing, smuggled or not, reached vLLM
    await still_serves(gate.server, tls, gate.token)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
async def test_unsupported_http_version_gets_505(gate: Gate, tls: TLSFiles,
                                                 version: bytes) -> None:
    data = head(gate.token, "Connection: close", method="GET", target="/v1/models")
    status, _, _ = parse(await exchange(gate.server.https_port, tls,
                                        data.replace(b"HTTP/1.1", version, 1)))
    assert status in (400, 505)  # llhttp itself refuses a major version it doesn't know
    assert reached_vllm(gate.sim) == []


@pytest.mark.parametrize("target", [
    "/v1/%6dodels",              # percent-encoded 'm': vLLM would decode it to /v1/models
    "/v1/models%00",
    "/v1/models%2f",
    "/v1/./models",
    "/v1/models/.",
    "/v1\\models",
    "/%2e%2e/pause",
    "/v1/models#frag",
    "*",
    "/v1/models/../../pause",
    "/.%2e/pause",
    "/v1//models",
])
async def test_encoding_tricks_never_pass_the_allowlist(
    gate: Gate, tls: TLSFiles, target: str
) -> None:
    response = await exchange(gate.server.https_port, tls,
                              head(gate.token, method="GET", target=target))
    status, _, body = parse(response)
    assert status in (400, 404), body
    assert reached_vllm(gate.sim) == []
    await still_serves(gate.server, tls, gate.token)


async def test_query_string_passes_but_path_is_what_is_checked(gate: Gate, tls: TLSFiles) -> None:
    response = await exchange(gate.server.https_port, tls,
                              head(gate.token, "Connection: close", method="GET",
                                   target="/v1/models?x=/../pause"))
    assert response.startswith(b"HTTP/1.1 200 ")
    assert reached_vllm(gate.sim) == ["GET /v1/models"]


@pytest.mark.parametrize("query", ["api_key={token}", "token={token}", "x=1&access_token={token}",
                                   "Authorization=Bearer%20{token}", "KEY={token}"])
async def test_token_in_query_string_is_refused_and_never_logged(
    gate: Gate, tls: TLSFiles, caplog: pytest.LogCaptureFixture, query: str
) -> None:
    caplog.set_level(logging.DEBUG)
    target = "/v1/models?" + query.format(token=gate.token)
    for authorization in (True, False):  # refused even alongside a right header
        data = head(gate.token, method="GET", target=target)
        if not authorization:
            data = data.replace(f"Authorization: Bearer {gate.token}\r\n".encode(), b"")
        status, headers, body = parse(await exchange(gate.server.https_port, tls, data))
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert "URL" in body["error"]["message"]
        assert gate.token not in json.dumps(body)
    assert reached_vllm(gate.sim) == []
    await still_serves(gate.server, tls, gate.token)
    assert gate.token not in caplog.text


async def test_garbage_before_tls_handshake(gate: Gate, tls: TLSFiles) -> None:
    for garbage in (b"\x00" * 64, b"GARBAGE\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"A" * 300):
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.server.https_port)
        writer.write(garbage)
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            data = b""
        writer.close()
        assert not data.startswith(b"HTTP/1.1 2"), data
    assert reached_vllm(gate.sim) == []
    await still_serves(gate.server, tls, gate.token)


async def test_plain_http_on_tls_port(gate: Gate, tls: TLSFiles) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gate.server.https_port)
    writer.write(head(gate.token, method="GET", target="/v1/models"))
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        data = b""
    writer.close()
    # Closed (with at most a TLS alert): the token sent in the clear is not answered.
    assert not data.startswith(b"HTTP/1.1 200")
    assert reached_vllm(gate.sim) == []
    await still_serves(gate.server, tls, gate.token)


async def test_body_that_stops_midway_closes_the_upstream(gate: Gate, tls: TLSFiles) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", gate.server.https_port,
                                                   ssl=tls.client_context,
                                                   server_hostname="localhost")
    writer.write(head(gate.token, "Content-Type: application/json", "Content-Length: 200000")
                 + b'{"model": "sim-model", "messages": [' + b" " * 60000)
    await writer.drain()
    await gate.sim.stats.wait_for(lambda: gate.sim.stats.open_connections > 0)
    writer.close()  # the client gives up halfway
    # vLLM must not wait for the rest of a body that will never come.
    await gate.sim.stats.wait_open_connections(0)
    assert gate.sim.stats.running == 0
    await still_serves(gate.server, tls, gate.token)


# ---- a broken vLLM --------------------------------------------------------------------------

async def test_upstream_refuses(
    start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
) -> None:
    sim_gone = await _start_and_close_simulator()
    server = await start_proxy(sim_gone)
    status, headers, body = parse(await exchange(
        server.https_port, tls, head(tokens.kibana, "Content-Length: 2") + b"{}"))
    assert status == 503 and 1 <= int(headers["retry-after"]) <= 30
    assert "not ready" in body["error"]["message"]


async def _start_and_close_simulator() -> str:
    from proxy.simulator import start_simulator

    sim = await start_simulator()
    url = sim.url
    await sim.close()
    return url


async def test_upstream_hangs_before_first_byte_gives_504(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
) -> None:
    server = await start_proxy(simulator.url, upstream={"read_timeout": 0.5})
    status, _, body = parse(await exchange(server.https_port, tls, head(
        tokens.kibana, "x-sim-fail: hang", "Content-Type: application/json",
        f"Content-Length: {len(json.dumps(KIBANA_TEST_BODY))}")
        + json.dumps(KIBANA_TEST_BODY).encode()))
    assert status == 504
    assert body["error"]["code"] == "upstream_timeout"
    assert "read_timeout" in body["error"]["message"]
    await simulator.stats.wait_aborted(1)  # vLLM saw the close and freed the slot
    await still_serves(server, tls, tokens.kibana)


async def test_upstream_dies_mid_stream_client_sees_clean_end(
    gate: Gate, tls: TLSFiles,
) -> None:
    connector = aiohttp.TCPConnector(ssl=tls.client_context)
    async with aiohttp.ClientSession(connector=connector) as session, session.post(
            gate.url + CHAT, headers={**gate.auth, "x-sim-fail": "die-mid-stream"},
            json={**KIBANA_TEST_BODY, "stream": True}) as resp:
        assert resp.status == 200
        # read() raises ClientPayloadError unless the chunked body ended with its 0-chunk
        raw = await resp.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"] and error["type"] == "server_error"
    tokens = [json.loads(e) for e in events[:-2]]
    assert tokens and all(t["choices"] for t in tokens)  # what arrived before is intact
    await still_serves(gate.server, tls, gate.token)


@pytest.mark.parametrize("mode,status", [("bad-response", 502), ("close", 503),
                                         ("empty-500", 500), ("flat-error", 400)])
async def test_broken_upstream_answers_leave_the_proxy_serving(
    gate: Gate, tls: TLSFiles, mode: str, status: int
) -> None:
    got, _, body = parse(await exchange(gate.server.https_port, tls, head(
        gate.token, f"x-sim-fail: {mode}", "Connection: close", "Content-Length: 2") + b"{}"))
    assert got == status
    assert set(body) == {"error"} and body["error"]["message"]
    if mode == "flat-error":  # vLLM <= 0.10.0: status, message and type survive
        assert body["error"]["message"] == "simulated flat (vLLM <= 0.10.0) error"
        assert body["error"]["type"] == "BadRequestError"
    await still_serves(gate.server, tls, gate.token)


async def test_slow_reader_big_response_is_back_pressured(gate: Gate, tls: TLSFiles) -> None:
    # 48 MiB answer, a client that stops reading: the proxy must stop reading vLLM instead of
    # buffering the answer (the kernel's socket buffers hold a few MiB; the rest must wait).
    size = 48 * 1024 * 1024
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gate.server.https_port, ssl=tls.client_context, server_hostname="localhost",
        limit=64 * 1024)
    body = json.dumps(KIBANA_TEST_BODY).encode()
    writer.write(head(gate.token, "Content-Type: application/json", "x-sim-fail: slow-body",
                      "x-sim-interval: 0", f"x-sim-body-bytes: {size}",
                      f"Content-Length: {len(body)}", "Connection: close") + body)
    response_head = await reader.readuntil(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 200")

    conn = _only_connection(gate.server)

    def upstream_paused() -> bool:
        upstream = conn.upstream
        return (upstream is not None and upstream.transport is not None
                and not upstream.transport.is_reading())

    # Back-pressure engages: vLLM's connection stops being read.
    await asyncio.wait_for(_until(upstream_paused), 10)
    buffered = []
    for _ in range(5):
        assert conn.transport is not None
        buffered.append(conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.05)  # sampling over time, there is no event for "still bounded"
    assert max(buffered) < 4 * 1024 * 1024, buffered
    # Reading again drains it all, every byte.
    received = len(await asyncio.wait_for(reader.read(), 30))
    writer.close()
    assert received >= size
    await still_serves(gate.server, tls, gate.token)


def _only_connection(server: ProxyServer) -> ClientConnection:
    (conn,) = server.connections
    return conn


async def _until(predicate: Any) -> None:
    # The core has no event for "paused": poll it at a short interval under a timeout.
    while not predicate():  # noqa: ASYNC110 - no event to await, see above
        await asyncio.sleep(0.01)
