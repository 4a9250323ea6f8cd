"""The proxy end to end: real TLS, the real forwarding core, the stand-in vLLM, real clients."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import warnings
from pathlib import Path

import aiohttp
import openai
import pytest

from conftest import (
    KIBANA_TEST_BODY,
    Gate,
    MakeSettings,
    StartProxy,
    TLSFiles,
    Tokens,
    last_request,
    reached_vllm,
    sse_events,
)
from proxy.simulator import RunningSimulator, SimulatorConfig, start_simulator

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"


async def test_kibana_connector_test_request(gate: Gate, client: aiohttp.ClientSession) -> None:
    async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY, headers=gate.auth) as resp:
        assert resp.status == 200
        body = await resp.json()
        request_id = resp.headers["X-Request-Id"]
    # What Kibana validates: usage with all three counts, and choices[].message.role.
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert body["choices"][0]["message"]["role"] == "assistant"
    seen = last_request(gate.sim)
    assert seen.json == KIBANA_TEST_BODY
    assert seen.headers["x-request-id"] == request_id
    assert "authorization" not in seen.headers  # the client's token never reaches vLLM


async def test_streamed_chunks_arrive_spaced_not_at_once(
    gate: Gate, client: aiohttp.ClientSession
) -> None:
    # The seed's Nginx delivered these 10 chunks all at once after 2 s.
    headers = {**gate.auth, "x-sim-ttft": "0.2", "x-sim-interval": "0.2", "x-sim-tokens": "10"}
    start = time.monotonic()
    arrivals: list[float] = []
    raw = b""
    async with client.post(gate.url + CHAT, headers=headers,
                           json={**KIBANA_TEST_BODY, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in resp.headers
        async for chunk in resp.content.iter_any():
            raw += chunk
            arrivals.append(time.monotonic() - start)
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    tokens = [json.loads(e) for e in events[:-1]]
    assert all(t["object"] == "chat.completion.chunk" and t["choices"] for t in tokens)
    assert arrivals[0] < 0.5
    # Spread over ~2 s: the stream was not held back and released in one piece.
    assert arrivals[-1] - arrivals[0] > 1.2
    assert len(arrivals) >= 8


async def test_openai_sdk_streamed_and_not(gate: Gate) -> None:
    http_client = openai.DefaultAsyncHttpxClient(verify=gate.tls.client_context)
    sdk = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key=gate.token,
                             http_client=http_client, max_retries=0)
    async with http_client:
        reply = await sdk.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
        assert reply.choices[0].message.role == "assistant"
        stream = await sdk.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=7,
            stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert len([p for p in pieces if p]) == 7
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["sim-model"]


async def test_openai_sdk_wrong_key_gets_clear_401(gate: Gate) -> None:
    http_client = openai.DefaultAsyncHttpxClient(verify=gate.tls.client_context)
    sdk = openai.AsyncOpenAI(base_url=gate.url + "/v1", api_key="wrong", http_client=http_client,
                             max_retries=0)
    async with http_client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await sdk.models.list()
    assert "invalid bearer token" in str(raised.value)
    assert reached_vllm(gate.sim) == []


async def test_curl_streams(gate: Gate) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--cacert", str(gate.tls.ca_pem), gate.url + CHAT,
        "-H", f"Authorization: Bearer {gate.token}", "-H", "Content-Type: application/json",
        "-d", json.dumps({**KIBANA_TEST_BODY, "stream": True, "max_tokens": 3}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err
    events = sse_events(out)
    assert events[-1] == "[DONE]" and len(events) == 1 + 3 + 1  # role, 3 tokens, DONE


@pytest.mark.parametrize("authorization,reason", [
    (None, "missing"),
    ("Bearer not-a-token", "invalid bearer token"),
    ("Basic dXNlcjpwYXNz", "malformed"),
    ("Bearer", "malformed"),
])
async def test_bad_tokens_get_json_401_and_never_reach_vllm(
    gate: Gate, client: aiohttp.ClientSession, authorization: str | None, reason: str
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert reason in body["error"]["message"]
    assert reached_vllm(gate.sim) == []


async def test_bearer_scheme_is_case_insensitive(gate: Gate, client: aiohttp.ClientSession) -> None:
    async with client.get(gate.url + "/v1/models",
                          headers={"Authorization": f"bEaReR {gate.token}"}) as resp:
        assert resp.status == 200


async def test_every_token_in_the_file_works(
    gate: Gate, client: aiohttp.ClientSession, tokens: Tokens
) -> None:
    for token in (tokens.kibana, tokens.ops):
        async with client.get(gate.url + "/v1/models",
                              headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200


@pytest.mark.parametrize("method,path", [
    ("POST", "/invocations"), ("POST", "/pause"), ("GET", "/metrics"), ("POST", "/tokenize"),
    ("GET", "/version"), ("POST", "/v1/../pause"), ("POST", "/v1/%2e%2e/pause"),
    ("POST", "/v1/chat/completions/../../pause"), ("GET", "/V1/models"), ("GET", "/v1/models/"),
    ("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("POST", "//v1/chat/completions"),
    ("POST", "/v1/chat%2Fcompletions"), ("POST", "/v1/chat/completions;x"),
    ("GET", "http://127.0.0.1:8000/v1/models"),
])
async def test_only_allowlisted_routes_reach_vllm(
    gate: Gate, method: str, path: str
) -> None:
    # Raw requests: aiohttp would normalise some of these paths before sending.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gate.server.https_port, ssl=gate.tls.client_context,
        server_hostname="localhost")
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                 f"{gate.token}\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert json.loads(body)["error"]["code"] == "not_found"
    assert reached_vllm(gate.sim) == []


async def test_allowlist_is_configurable(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, upstream={"allow": ["GET /v1/models"]})
    url = f"https://127.0.0.1:{server.https_port}"
    auth = {"Authorization": f"Bearer {tokens.kibana}"}
    async with client.get(url + "/v1/models", headers=auth) as resp:
        assert resp.status == 200
    async with client.post(url + CHAT, headers=auth, json=KIBANA_TEST_BODY) as resp:
        assert resp.status == 404


async def test_eight_mib_prompt_is_forwarded(gate: Gate, client: aiohttp.ClientSession) -> None:
    big = "word " * (8 * 1024 * 1024 // 5)
    body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": big}]})
    assert len(body) > 8 * 1024 * 1024
    async with client.post(gate.url + CHAT, data=body, headers={
            **gate.auth, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        await resp.read()
    assert last_request(gate.sim).body_length == len(body)


async def test_chunked_request_body_is_forwarded(gate: Gate, client: aiohttp.ClientSession) -> None:
    payload = json.dumps({**KIBANA_TEST_BODY, "max_tokens": 2}).encode()

    async def pieces():  # type: ignore[no-untyped-def]
        for index in range(0, len(payload), 7):
            yield payload[index:index + 7]

    async with client.post(gate.url + CHAT, data=pieces(), headers={
            **gate.auth, "Content-Type": "application/json"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"]["completion_tokens"] == 2
    assert last_request(gate.sim).json["max_tokens"] == 2


async def test_body_over_max_body_gets_413_naming_the_setting(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, upstream={"max_body": "1KiB"})
    url = f"https://127.0.0.1:{server.https_port}" + CHAT
    auth = {"Authorization": f"Bearer {tokens.kibana}", "Content-Type": "application/json"}
    async with client.post(url, data=b"x" * 2048, headers=auth) as resp:
        assert resp.status == 413
        assert "max_body" in (await resp.json())["error"]["message"]

    async def chunked():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"y" * 600

    async with client.post(url, data=chunked(), headers=auth) as resp:
        assert resp.status == 413
        assert "max_body" in (await resp.json())["error"]["message"]
    assert all(r.body_length <= 1024 for r in simulator.stats.requests)


async def test_upstream_silence_within_read_timeout_is_waited_for(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    # Nginx gave 504 after 60 s of silence. Scaled down: a 1.5 s silence with a 3 s limit
    # passes; the same silence with a 0.5 s limit is a JSON 504.
    auth = {"Authorization": f"Bearer {tokens.kibana}", "x-sim-ttft": "1.5"}
    patient = await start_proxy(simulator.url, upstream={"read_timeout": 3})
    async with client.post(f"https://127.0.0.1:{patient.https_port}" + CHAT,
                           json=KIBANA_TEST_BODY, headers=auth) as resp:
        assert resp.status == 200
        assert "usage" in await resp.json()
    impatient = await start_proxy(simulator.url, upstream={"read_timeout": 0.5})
    async with client.post(f"https://127.0.0.1:{impatient.https_port}" + CHAT,
                           json=KIBANA_TEST_BODY, headers=auth) as resp:
        assert resp.status == 504
        assert "read_timeout" in (await resp.json())["error"]["message"]


async def test_default_read_timeout_outlasts_nginx(make_settings: MakeSettings) -> None:
    assert make_settings().upstream.read_timeout == 900 > 60


async def test_slow_stream_with_gaps_under_read_timeout_is_not_cut(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    # The limit is on silence, not on the total: 6 gaps of 0.4 s under a 1 s read timeout.
    server = await start_proxy(simulator.url, upstream={"read_timeout": 1})
    headers = {"Authorization": f"Bearer {tokens.kibana}", "x-sim-interval": "0.4",
               "x-sim-tokens": "6"}
    async with client.post(f"https://127.0.0.1:{server.https_port}" + CHAT, headers=headers,
                           json={**KIBANA_TEST_BODY, "stream": True}) as resp:
        events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"


async def test_client_hangup_mid_stream_closes_upstream_within_a_second(gate: Gate) -> None:
    headers = {**gate.auth, "x-sim-interval": "0.05", "x-sim-tokens": "400"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gate.url + CHAT, headers=headers, ssl=gate.tls.client_context,
                                  json={**KIBANA_TEST_BODY, "stream": True})
        await resp.content.readline()
        resp.close()  # hang up mid-stream
        hung_up = time.monotonic()
    await gate.sim.stats.wait_aborted(1, timeout=1.0)
    assert time.monotonic() - hung_up < 1.0
    assert gate.sim.stats.generation_tokens < 400


async def test_client_hangup_before_first_byte_closes_upstream(gate: Gate) -> None:
    headers = {**gate.auth, "x-sim-ttft": "30"}
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(
            gate.url + CHAT, headers=headers, ssl=gate.tls.client_context,
            json=KIBANA_TEST_BODY))
        await gate.sim.stats.wait_for(lambda: bool(reached_vllm(gate.sim)))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        hung_up = time.monotonic()
    # vLLM notices only a real TCP close, and then aborts the generation.
    await gate.sim.stats.wait_aborted(1, timeout=1.0)
    assert time.monotonic() - hung_up < 1.0


async def test_vllm_not_listening_gives_503_with_retry_after(
    start_proxy: StartProxy, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    server = await start_proxy("http://127.0.0.1:9")  # nothing listens on the discard port
    url = f"https://127.0.0.1:{server.https_port}"
    async with client.post(url + CHAT, json=KIBANA_TEST_BODY,
                           headers={"Authorization": f"Bearer {tokens.kibana}"}) as resp:
        assert resp.status == 503
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
        body = await resp.json()
    assert "not ready" in body["error"]["message"]
    async with client.get(url + "/healthz") as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "not_ready"


async def test_healthz_reports_ready_without_a_token(
    gate: Gate, client: aiohttp.ClientSession
) -> None:
    # the health checker's own polls change the simulator's stats, which wakes this wait
    await gate.sim.stats.wait_for(lambda: gate.server.health.readiness.ready)
    async with client.get(gate.url + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready"}
    assert reached_vllm(gate.sim) == []


@pytest.mark.parametrize("mode,status", [("bad-response", 502), ("close", 503),
                                         ("empty-500", 500)])
async def test_broken_upstream_answers_are_json_errors(
    gate: Gate, client: aiohttp.ClientSession, mode: str, status: int
) -> None:
    async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY,
                           headers={**gate.auth, "x-sim-fail": mode}) as resp:
        assert resp.status == status
        body = await resp.json()
    assert body["error"]["message"]


async def test_old_flat_vllm_error_is_normalised(gate: Gate, client: aiohttp.ClientSession) -> None:
    async with client.post(gate.url + CHAT, json=KIBANA_TEST_BODY,
                           headers={**gate.auth, "x-sim-fail": "flat-error"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["message"]
    assert body["error"]["code"] == 400


async def test_vllm_errors_pass_with_status_and_message(
    gate: Gate, client: aiohttp.ClientSession
) -> None:
    async with client.post(gate.url + CHAT, json={**KIBANA_TEST_BODY, "model": "nope"},
                           headers=gate.auth) as resp:
        assert resp.status == 404
        assert "nope" in (await resp.json())["error"]["message"]
    async with client.post(gate.url + CHAT, data=b"{not json", headers={
            **gate.auth, "Content-Type": "application/json"}) as resp:
        assert resp.status == 400


async def test_vllm_key_is_injected_and_its_401_never_reaches_the_client(
    tmp_path: Path, start_proxy: StartProxy, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    sim = await start_simulator(SimulatorConfig(api_key="vllm-secret", ttft=0.01))
    try:
        key_file = tmp_path / "vllm-key"
        key_file.write_text("vllm-secret\n")
        good = await start_proxy(sim.url, upstream={"api_key_file": str(key_file)})
        auth = {"Authorization": f"Bearer {tokens.kibana}"}
        async with client.post(f"https://127.0.0.1:{good.https_port}" + CHAT,
                               json={**KIBANA_TEST_BODY, "model": "sim-model"},
                               headers=auth) as resp:
            assert resp.status == 200
        assert last_request(sim).headers["authorization"] == "Bearer vllm-secret"
        key_file.write_text("stale-key\n")
        wrong = await start_proxy(sim.url, upstream={"api_key_file": str(key_file)})
        async with client.post(f"https://127.0.0.1:{wrong.https_port}" + CHAT,
                               json=KIBANA_TEST_BODY, headers=auth) as resp:
            assert resp.status == 502
            assert "api_key_file" in (await resp.json())["error"]["message"]
    finally:
        await sim.close()


async def test_hop_by_hop_and_forwarded_headers(gate: Gate, client: aiohttp.ClientSession) -> None:
    headers = {**gate.auth, "Connection": "keep-alive, X-Private", "X-Private": "drop me",
               "Keep-Alive": "timeout=5", "TE": "trailers", "X-Forwarded-For": "6.6.6.6",
               "X-Request-Id": "kibana-req-1", "X-Custom": "kept", "Accept-Encoding": "gzip"}
    async with client.get(gate.url + "/v1/models", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "kibana-req-1"
        assert "Keep-Alive" not in resp.headers
    seen = last_request(gate.sim).headers
    for dropped in ("x-private", "keep-alive", "te", "authorization", "accept-encoding"):
        assert dropped not in seen
    assert seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's own claim is replaced
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"].startswith("127.0.0.1")
    assert seen["x-request-id"] == "kibana-req-1"


async def test_request_id_is_generated_when_absent(
    gate: Gate, client: aiohttp.ClientSession
) -> None:
    async with client.get(gate.url + "/v1/models", headers=gate.auth) as resp:
        generated = resp.headers["X-Request-Id"]
    assert len(generated) == 32
    assert last_request(gate.sim).headers["x-request-id"] == generated


async def test_keepalive_pool_never_sends_into_closing_upstream_sockets(
    start_proxy: StartProxy, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    # vLLM closes idle connections after 5 s; scaled down to 0.3 s here. Requests spaced just
    # under, at, and just past that time: zero errors.
    sim = await start_simulator(SimulatorConfig(ttft=0.0, keepalive_timeout=0.3))
    try:
        server = await start_proxy(sim.url, upstream={"pool_idle_timeout": 0.25})
        url = f"https://127.0.0.1:{server.https_port}/v1/models"
        auth = {"Authorization": f"Bearer {tokens.kibana}"}
        statuses = []
        for index in range(30):
            async with client.get(url, headers=auth) as resp:
                statuses.append(resp.status)
                await resp.read()
            await asyncio.sleep((0.27, 0.3, 0.33)[index % 3])
        assert statuses == [200] * 30
    finally:
        await sim.close()


async def test_keepalive_reuses_upstream_connections(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    server = await start_proxy(simulator.url, upstream={"health_interval": 60})
    url = f"https://127.0.0.1:{server.https_port}/v1/models"
    auth = {"Authorization": f"Bearer {tokens.kibana}"}
    async with client.get(url, headers=auth) as resp:
        await resp.read()
    await simulator.stats.wait_for(lambda: bool(server.health.served_model))
    before = simulator.stats.connections_total
    for _ in range(20):
        async with client.get(url, headers=auth) as resp:
            assert resp.status == 200
            await resp.read()
    assert simulator.stats.connections_total == before  # all on the pinned connection


async def test_tls_below_1_2_is_refused(gate: Gate, tls: TLSFiles) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(tls.ca_pem))
    with warnings.catch_warnings():  # the point is to use the deprecated versions
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        await asyncio.open_connection("127.0.0.1", gate.server.https_port, ssl=context,
                                      server_hostname="localhost")


async def test_port_80_redirects_like_nginx(
    simulator: RunningSimulator, start_proxy: StartProxy
) -> None:
    server = await start_proxy(simulator.url, listen={"http": "127.0.0.1:0",
                                                      "server_name": "llm.example.com"})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}/v1/models?a=1&b=%20",
                               allow_redirects=False) as resp:
            assert resp.status == 301
            # https port 0 in tests stands for 443: no port in the location
            assert resp.headers["Location"] == "https://llm.example.com/v1/models?a=1&b=%20"
    assert reached_vllm(simulator) == []


async def test_many_concurrent_streams(gate: Gate, client: aiohttp.ClientSession) -> None:
    headers = {**gate.auth, "x-sim-tokens": "5", "x-sim-interval": "0.01"}

    async def one() -> int:
        async with client.post(gate.url + CHAT, headers=headers,
                               json={**KIBANA_TEST_BODY, "stream": True}) as resp:
            return len(sse_events(await resp.read()))

    counts = await asyncio.gather(*(one() for _ in range(100)))
    assert counts == [7] * 100


async def test_engine_dying_under_a_request_gives_503_not_502(
    start_proxy: StartProxy, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    # The engine dies while a request waits for its first token: vLLM's connection closes
    # without an answer. airgate sends the request once more on a new connection, which is
    # refused while the launcher restarts vLLM: "not ready, retry" (503), not a 502.
    sim = await start_simulator(SimulatorConfig(ttft=0.0))
    server = await start_proxy(sim.url, upstream={"health_interval": 60})
    url = f"https://127.0.0.1:{server.https_port}" + CHAT
    auth = {"Authorization": f"Bearer {tokens.kibana}", "x-sim-ttft": "30"}
    pending = asyncio.ensure_future(client.post(url, json=KIBANA_TEST_BODY, headers=auth))
    await sim.stats.wait_for(lambda: bool(reached_vllm(sim)))
    await sim.close()  # cuts the running request's connection, stops listening
    resp = await pending
    assert resp.status == 503
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
    resp.release()
