"""Fuzz the request front end: hypothesis-generated request heads and raw bytes over TLS.

For a bounded number of examples (a few seconds), each thrown at one running proxy: the proxy
answers with a well-formed HTTP/1.1 response or closes; nothing off the allowlist reaches the
stand-in vLLM; no callback raises (the event loop's exception handler stays silent); and a
normal request still works at the end.

The proxy and the simulator run on their own event loop in a thread, so that hypothesis drives
plain blocking sockets and one proxy serves every example.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import KIBANA_TEST_BODY, TLSFiles, write_config
from proxy.server import ProxyServer
from proxy.settings import DEFAULT_ALLOW, load_settings
from proxy.simulator import RunningSimulator, SimulatorConfig, start_simulator
from proxy.tokens import append_token

ALLOWED = {tuple(route.split(" ", 1)) for route in DEFAULT_ALLOW}
READ_LIMIT = 1.0  # seconds to wait for an answer; an incomplete request may get none


@dataclass
class Target:
    """The proxy under fuzz, running in a background thread."""

    port: int
    token: str
    server: ProxyServer
    sim: RunningSimulator
    loop: asyncio.AbstractEventLoop
    loop_errors: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def target(tls: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("fuzz")
    token = append_token(directory / "tokens", "kibana")
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    # Anything a protocol callback raises ends up here instead of being swallowed.
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[ProxyServer, RunningSimulator]:
        sim = await start_simulator(SimulatorConfig(ttft=0.0, token_interval=0.0))
        config = write_config(directory / "airgate.toml", {
            "listen": {"https": "127.0.0.1:0", "http": "", "server_name": "localhost",
                       "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
            "auth": {"tokens_file": str(directory / "tokens"), "fail_limit": 0},
            "upstream": {"url": sim.url, "health_interval": 5},
            # Short: an example whose head or body never completes costs this much.
            "server": {"header_timeout": 0.15, "keepalive_timeout": 0.15},
            "metrics": {"listen": ""},
            "log": {"access": "off"},
        })
        server = ProxyServer(load_settings(config))
        await server.start()
        return server, sim

    server, sim = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield Target(server.https_port, token, server, sim, loop, errors)

    async def stop() -> None:
        await server.stop()
        await sim.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


class _Response:
    """httptools callbacks: just enough to tell a well-formed response from garbage."""

    def __init__(self) -> None:
        self.complete = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:  # the first response is the one checked
            self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def send(target: Target, tls: TLSFiles, data: bytes) -> bytes:
    """Send `data` over a new TLS connection; read until close or READ_LIMIT of silence."""
    raw = socket.create_connection(("127.0.0.1", target.port), timeout=5)
    with tls.client_context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(data)
        conn.settimeout(READ_LIMIT)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            pass
    return received


def check_response(data: bytes) -> None:
    if not data:
        return  # closing without an answer is allowed (e.g. an incomplete head timed out)
    assert data.startswith(b"HTTP/1.1 "), data[:200]
    # An `Expect: 100-continue` request gets the interim 100 first; the final answer follows.
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    if data.startswith(interim) and len(data) > len(interim):
        data = data[len(interim):]
    response = _Response()
    parser = httptools.HttpResponseParser(response)
    parser.feed_data(data)  # raises on a malformed response
    status = parser.get_status_code()
    assert 100 <= status <= 599
    if status >= 400 and response.complete:
        # Every error the proxy makes up is OpenAI-shaped JSON.
        assert (b"content-type", b"application/json") in response.headers, data[:500]
        assert "message" in json.loads(response.body)["error"]


def check_vllm_saw_only_allowlisted(target: Target) -> None:
    for request in list(target.sim.stats.requests):
        if request.path == "/health":
            continue
        assert (request.method, request.path) in ALLOWED, (request.method, request.path)


# ---- strategies -----------------------------------------------------------------------------

TOKEN = "\x00TOKEN\x00"  # replaced by the real token: examples must be able to authenticate

methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE",
                                     "CONNECT", "TRACE", "PATCH", "PRI", "get", "POST "]),
                    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                            min_size=1, max_size=8))
segments = st.sampled_from(["v1", "chat", "completions", "models", "embeddings", "..", ".",
                            "%2e%2e", "%2F", "pause", "invocations", "metrics", "healthz",
                            "", "V1", "%00", ";x", "\\", "?", "#", "*"])
paths = st.one_of(
    st.sampled_from([path for _, path in sorted(ALLOWED)]),
    st.lists(segments, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=40).map(lambda text: "/" + text),
    st.sampled_from(["*", "http://127.0.0.1:8000/v1/models", "//v1/models", ""]),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9",
                            "http/1.1", "HTTP/1.1 ", ""])
header_names = st.one_of(
    st.sampled_from(["Host", "Authorization", "Content-Length", "Transfer-Encoding",
                     "Connection", "Expect", "Upgrade", "Content-Type", "X-Request-Id",
                     "Keep-Alive", "TE", "Trailer", "X-Forwarded-For", "Cookie"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), min_size=0,
            max_size=20),
)
header_values = st.one_of(
    st.sampled_from([f"Bearer {TOKEN}", "Bearer wrong", "chunked", "gzip, chunked", "0", "5",
                     "-1", "1, 1", "close", "keep-alive", "100-continue", "websocket",
                     "application/json", "localhost", "x" * 5000]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=60),
)
bodies = st.one_of(st.just(b""), st.just(json.dumps(KIBANA_TEST_BODY).encode()),
                   st.binary(max_size=300))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = f"{draw(methods)} {draw(paths)} {draw(versions)}"
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    if draw(st.booleans()):
        headers.append(("Authorization", f"Bearer {TOKEN}"))
    body = draw(bodies)
    if draw(st.booleans()):  # mostly self-consistent framing, so requests get through
        headers.append(("Content-Length", str(len(body))))
    separator = draw(st.sampled_from(["\r\n", "\r\n", "\n", "\r"]))
    head = separator.join([line, *(f"{name}: {value}" for name, value in headers)])
    return (head + separator + separator).encode("utf-8", "replace") + body


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A request that passes auth and the allowlist, with plausible extras: this is what
    reaches the forwarding path (head rebuilding, framing, vLLM)."""
    method, path = draw(st.sampled_from(sorted(ALLOWED)))
    query = draw(st.sampled_from(["", "?a=1", "?x=%00", "?" + "q" * 3000]))
    body = draw(bodies)
    headers = [("Host", "localhost"), ("Authorization", f"Bearer {TOKEN}")]
    headers += draw(st.lists(st.tuples(
        st.sampled_from(["Connection", "Keep-Alive", "TE", "Trailer", "X-Request-Id",
                         "X-Forwarded-For", "Forwarded", "Content-Type", "Accept-Encoding",
                         "Expect", "Proxy-Authorization", "X-Real-IP", "Via"]),
        header_values.filter(lambda v: "\r" not in v and "\n" not in v)), max_size=4))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        sizes = draw(st.lists(st.integers(1, 64), max_size=4))
        chunks, rest = b"", body
        for size in sizes:
            piece, rest = rest[:size], rest[size:]
            if piece:
                chunks += b"%x\r\n%b\r\n" % (len(piece), piece)
        if rest:
            chunks += b"%x\r\n%b\r\n" % (len(rest), rest)
        body = chunks + b"0\r\n\r\n"
    head = f"{method} {path}{query} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("utf-8", "replace") + body


raw_bytes = st.one_of(
    st.binary(min_size=1, max_size=2048),
    # Valid-looking start, then anything: the parser's middle states.
    st.binary(max_size=512).map(lambda tail: b"POST /v1/chat/completions HTTP/1.1\r\n" + tail),
    st.binary(max_size=512).map(
        lambda tail: b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n" + tail),
)


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.large_base_example])


@FUZZ
@given(data=st.one_of(requests(), near_valid(), raw_bytes))
def test_fuzzed_requests(target: Target, tls: TLSFiles, data: bytes) -> None:
    data = data.replace(TOKEN.encode("latin-1"), target.token.encode())
    check_response(send(target, tls, data))
    check_vllm_saw_only_allowlisted(target)
    assert target.loop_errors == []


@settings(FUZZ, max_examples=50)
@given(requests_=st.lists(st.one_of(requests(), near_valid()), min_size=2, max_size=4))
def test_fuzzed_pipelines(target: Target, tls: TLSFiles, requests_: list[bytes]) -> None:
    # Several requests in one write: the first is answered, then the connection closes.
    data = b"".join(requests_).replace(TOKEN.encode("latin-1"), target.token.encode())
    check_response(send(target, tls, data))
    check_vllm_saw_only_allowlisted(target)
    assert target.loop_errors == []


def test_still_serves_after_fuzzing(target: Target, tls: TLSFiles) -> None:
    body = json.dumps(KIBANA_TEST_BODY).encode()
    data = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
            f"{target.token}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            "\r\nConnection: close\r\n\r\n").encode() + body
    response = send(target, tls, data)
    assert response.startswith(b"HTTP/1.1 200 "), response[:300]
    # The fuzzing got past the front door too, not only into the parser's error paths.
    assert sum(1 for r in target.sim.stats.requests if r.path != "/health") > 1
    assert b'"usage"' in response
    assert target.loop_errors == []
