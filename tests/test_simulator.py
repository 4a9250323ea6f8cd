"""The vLLM simulator speaks vLLM's wire format; real sockets on 127.0.0.1, no sleeps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.simulator import RunningSimulator, SimulatorConfig, start_simulator

ROOT = Path(__file__).resolve().parent.parent
HELLO = {"model": "sim-model", "messages": [{"role": "user", "content": "Hello world"}]}


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig(ttft=0.0, token_interval=0.0))
    yield running
    await running.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    """The raw `data: ` payloads, checking the framing on the way."""
    raw = (await response.read()).decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event[len("data: "):] for event in events]


async def test_non_streamed_shape(sim: RunningSimulator, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{sim.url}/v1/chat/completions", json={**HELLO, "max_tokens": 5}) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "sim-model" and body["prompt_logprobs"] is None
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["tool_calls"] == [] and choice["message"]["reasoning_content"] is None
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert len(choice["message"]["content"].split()) == 5
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11,
                             "prompt_tokens_details": None}
    seen = sim.stats.requests[-1]
    assert (seen.method, seen.path, seen.json) == ("POST", "/v1/chat/completions",
                                                   {**HELLO, "max_tokens": 5})
    assert seen.headers["content-type"] == "application/json"
    assert (sim.stats.prompt_tokens, sim.stats.generation_tokens) == (6, 5)


async def test_completions_and_tool_calls(
    sim: RunningSimulator, client: aiohttp.ClientSession
) -> None:
    async with client.post(f"{sim.url}/v1/completions",
                           json={"prompt": "one two", "max_tokens": 3}) as r:
        body = await r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    request = {**HELLO, "tools": [tool],
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    async with client.post(f"{sim.url}/v1/chat/completions", json=request) as r:
        body = await r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "sim"}


async def test_stream_framing(sim: RunningSimulator, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{sim.url}/v1/chat/completions",
                           json={**HELLO, "stream": True, "max_tokens": 3}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert "Content-Length" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) == 4  # role, then one token per chunk; no usage chunk unasked
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:])
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_usage_chunk(sim: RunningSimulator, client: aiohttp.ClientSession) -> None:
    request = {**HELLO, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post(f"{sim.url}/v1/chat/completions", json=request,
                           headers={"x-sim-tokens": "2"}) as r:
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = json.loads(events[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 2
    assert json.loads(events[-3])["choices"][0]["finish_reason"] == "stop"


async def test_stream_pacing(client: aiohttp.ClientSession) -> None:
    running = await start_simulator(SimulatorConfig(ttft=0.2, token_interval=0.05))
    try:
        started = time.monotonic()
        async with client.post(f"{running.url}/v1/chat/completions",
                               json={**HELLO, "stream": True, "max_tokens": 4}) as r:
            headers_at = time.monotonic() - started
            first = await r.content.readuntil(b"\n\n")
            first_at = time.monotonic() - started
            await r.read()
            done_at = time.monotonic() - started
    finally:
        await running.close()
    assert b'"role":"assistant"' in first
    assert headers_at < 0.15  # headers right away, like uvicorn
    assert 0.19 <= first_at < 1.0
    assert 0.19 + 3 * 0.05 <= done_at < 2.0


async def test_per_request_knobs(sim: RunningSimulator, client: aiohttp.ClientSession) -> None:
    headers = {"x-sim-tokens": "7", "x-sim-body-bytes": "100000"}
    async with client.post(f"{sim.url}/v1/chat/completions", json=HELLO, headers=headers) as r:
        body = await r.json()
    assert len(body["choices"][0]["message"]["content"]) == 100000
    assert body["usage"]["completion_tokens"] == 7
    async with client.post(f"{sim.url}/v1/chat/completions", json=HELLO,
                           headers={"x-sim-fail": "flat-error"}) as r:
        assert r.status == 400
        assert (await r.json())["object"] == "error"
    async with client.post(f"{sim.url}/v1/chat/completions", json=HELLO,
                           headers={"x-sim-fail": "empty-500"}) as r:
        assert r.status == 500 and await r.read() == b""


@pytest.mark.parametrize("mode", ["close", "bad-response", "die-mid-stream"])
async def test_broken_connections(
    sim: RunningSimulator, client: aiohttp.ClientSession, mode: str
) -> None:
    with pytest.raises(aiohttp.ClientError):
        async with client.post(f"{sim.url}/v1/chat/completions", json={**HELLO, "stream": True},
                               headers={"x-sim-fail": mode}) as r:
            await r.read()
    await sim.stats.wait_open_connections(0)


async def test_wrong_key_is_401(client: aiohttp.ClientSession) -> None:
    async with await start_simulator(SimulatorConfig(api_key="s3cret")) as running:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with client.get(f"{running.url}/v1/models", headers=headers) as r:
                assert r.status == 401 and "WWW-Authenticate" not in r.headers
                assert await r.read() == b'{"error":"Unauthorized"}'
        async with client.get(f"{running.url}/v1/models",
                              headers={"Authorization": "Bearer s3cret"}) as r:
            (model,) = (await r.json())["data"]
        assert (model["id"], model["owned_by"], model["max_model_len"]) == ("sim-model", "vllm",
                                                                            4096)
        async with client.post(f"{running.url}/pause") as r:  # vLLM leaves it open
            assert r.status == 200 and (await r.json())["path"] == "/pause"


async def test_errors(sim: RunningSimulator, client: aiohttp.ClientSession) -> None:
    async def post(data: Any, content_type: str = "application/json") -> tuple[int, Any]:
        async with client.post(f"{sim.url}/v1/chat/completions", data=data,
                               headers={"Content-Type": content_type}) as r:
            return r.status, await r.json()

    status, body = await post(json.dumps({**HELLO, "model": "gpt-4"}))
    assert status == 404
    assert body == {"error": {"message": "The model `gpt-4` does not exist.",
                              "type": "NotFoundError", "param": None, "code": 404}}
    status, body = await post(json.dumps({**HELLO, "stream_options": {"include_usage": True}}))
    assert (status, body["error"]["code"]) == (400, 400)
    assert (await post("{not json"))[0] == 400
    assert (await post(json.dumps(HELLO), "text/plain"))[0] == 400
    assert (await post(json.dumps({**HELLO, "max_tokens": 5000})))[0] == 400


async def test_client_disconnect_is_aborted(client: aiohttp.ClientSession) -> None:
    running = await start_simulator(SimulatorConfig(ttft=0.0, token_interval=0.02))
    try:
        async with client.post(f"{running.url}/v1/chat/completions",
                               json={**HELLO, "stream": True, "max_tokens": 500}) as r:
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
            r.close()  # hang up mid-stream
        await running.stats.wait_aborted(1, timeout=2.0)
        await running.stats.wait_open_connections(0, timeout=1.0)
        assert 1 <= running.stats.generation_tokens < 500
        async with client.get(f"{running.url}/metrics") as r:
            text = await r.text()
        assert 'vllm:request_success_total{model_name="sim-model",finished_reason="abort"} 1.0' in (
            text)
        assert "vllm:time_to_first_token_seconds_bucket" in text
    finally:
        await running.close()


async def test_hang_until_client_goes(sim: RunningSimulator) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.get(f"{sim.url}/v1/models", headers={"x-sim-fail": "hang"})
    await sim.stats.wait_aborted(1)


async def _read_until_running(stdout: asyncio.StreamReader) -> tuple[list[str], int]:
    lines: list[str] = []
    while True:
        line = (await stdout.readline()).decode()
        assert line, f"simulator exited early: {lines}"
        lines.append(line)
        if "Uvicorn running on http://127.0.0.1:" in line:
            return lines, int(line.split("127.0.0.1:")[1].split()[0])


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_cli_accepts_vllm_flags(client: aiohttp.ClientSession, workers: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.simulator", "serve", "mistralai/Some-Model", "--port", "0",
        "--tool-call-parser", "mistral", "--enable-auto-tool-choice", "--gpu-memory-utilization",
        "0.9", "--tensor-parallel-size", "2", "--tokenizer-mode", "mistral", "--load-seconds",
        "0.2", "--workers", workers, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "VLLM_API_KEY": "k"})
    assert process.stdout is not None
    try:
        lines, port = await asyncio.wait_for(_read_until_running(process.stdout), 10)
        assert any("Loading safetensors checkpoint shards: 100% Completed" in x for x in lines)
        async with client.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with client.get(f"http://127.0.0.1:{port}/v1/models") as r:
            assert r.status == 401  # VLLM_API_KEY honoured
        async with client.get(f"http://127.0.0.1:{port}/v1/models",
                              headers={"Authorization": "Bearer k"}) as r:
            assert (await r.json())["data"][0]["id"] == "mistralai/Some-Model"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
