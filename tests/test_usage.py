"""Usage counting and the model alias: what the proxy reads from and changes in bodies."""

from __future__ import annotations

import json

import aiohttp
import pytest

from conftest import (
    KIBANA_TEST_BODY,
    Recorder,
    StartProxy,
    Tokens,
    last_request,
    sse_events,
)
from proxy.simulator import RunningSimulator

pytestmark = pytest.mark.asyncio
CHAT = "/v1/chat/completions"


async def _proxy(start_proxy: StartProxy, simulator: RunningSimulator, **sections: dict[str, object]
                 ) -> tuple[str, Recorder]:
    recorder = Recorder()
    server = await start_proxy(simulator.url, observer=recorder, **sections)  # type: ignore[arg-type]
    return f"https://127.0.0.1:{server.https_port}", recorder


def kibana_parse(raw: bytes) -> list[dict[str, object]]:
    """Kibana's stream parsers: `data: ` lines only, JSON each, choices[0] read on every chunk."""
    chunks = []
    for event in sse_events(raw):
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["choices"][0] is not None  # IndexError on `choices: []` breaks Kibana
        chunks.append(chunk)
    return chunks


async def test_stream_without_include_usage_is_counted_and_client_sees_no_usage_chunk(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = await _proxy(start_proxy, simulator)
    body = {**KIBANA_TEST_BODY, "stream": True, "max_tokens": 9}
    async with client.post(url + CHAT, json=body,
                           headers={"Authorization": f"Bearer {tokens.kibana}"}) as resp:
        raw = await resp.read()
    chunks = kibana_parse(raw)
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert sse_events(raw)[-1] == "[DONE]"
    # vLLM was asked for usage so that airgate could count it...
    assert last_request(simulator).json["stream_options"] == {"include_usage": True}
    exchange = recorder.finished[-1]
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (6, 9)
    assert exchange.model == "sim-model"
    assert exchange.token_name == "kibana"
    assert exchange.ttft is not None and exchange.streamed


async def test_stream_with_include_usage_passes_the_usage_chunk_through(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = await _proxy(start_proxy, simulator)
    body = {**KIBANA_TEST_BODY, "stream": True, "max_tokens": 4,
            "stream_options": {"include_usage": True}}
    async with client.post(url + CHAT, json=body,
                           headers={"Authorization": f"Bearer {tokens.kibana}"}) as resp:
        events = sse_events(await resp.read())
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert recorder.finished[-1].completion_tokens == 4


async def test_non_streamed_usage_is_read_from_the_answer(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = await _proxy(start_proxy, simulator)
    async with client.post(url + CHAT, json={**KIBANA_TEST_BODY, "max_tokens": 3},
                           headers={"Authorization": f"Bearer {tokens.ops}"}) as resp:
        answer = await resp.json()
    exchange = recorder.finished[-1]
    assert exchange.completion_tokens == answer["usage"]["completion_tokens"] == 3
    assert exchange.prompt_tokens == answer["usage"]["prompt_tokens"]
    assert exchange.finish_reason == "length"
    assert exchange.token_name == "ops"


async def test_usage_off_forwards_the_body_untouched(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, _ = await _proxy(start_proxy, simulator, metrics={"usage": False})
    raw = b'{"model": "sim-model", "stream": true,  "messages": [{"role": "user", "content": "x"}]}'
    async with client.post(url + CHAT, data=raw, headers={
            "Authorization": f"Bearer {tokens.kibana}", "Content-Type": "application/json"}) as r:
        await r.read()
    seen = last_request(simulator)
    assert seen.body_length == len(raw) and "stream_options" not in seen.json


async def test_usage_on_passes_non_streamed_bodies_byte_for_byte(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    # Only a streamed request is rewritten (to ask for usage); the rest reach vLLM as sent,
    # even when "stream" appears in a message or is false.
    url, recorder = await _proxy(start_proxy, simulator)
    raw = (b'{ "model" : "sim-model",\n "stream" :false, "max_tokens": 2, "messages": '
           b'[{"role": "user", "content": "say \\"stream\\": true"}]}')
    async with client.post(url + CHAT, data=raw, headers={
            "Authorization": f"Bearer {tokens.kibana}", "Content-Type": "application/json"}) as r:
        assert r.status == 200
        await r.read()
    seen = last_request(simulator)
    assert seen.body_length == len(raw) and "stream_options" not in seen.json
    assert recorder.finished[-1].completion_tokens == 2  # still counted, from the answer
    streamed = raw.replace(b'"stream" :false', b'"stream" :\n true')
    async with client.post(url + CHAT, data=streamed, headers={
            "Authorization": f"Bearer {tokens.kibana}", "Content-Type": "application/json"}) as r:
        await r.read()
    assert last_request(simulator).json["stream_options"] == {"include_usage": True}


async def test_model_alias_is_rewritten_and_listed(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = await _proxy(start_proxy, simulator, upstream={"model_alias": "default"})
    auth = {"Authorization": f"Bearer {tokens.kibana}"}
    await simulator.stats.wait_for(lambda: any(r.path == "/v1/models"
                                               for r in simulator.stats.requests))
    async with client.get(url + "/v1/models", headers=auth) as resp:
        listed = [m["id"] for m in (await resp.json())["data"]]
    assert listed == ["sim-model", "default"]
    async with client.post(url + CHAT, json={**KIBANA_TEST_BODY, "model": "default"},
                           headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["model"] == "sim-model"
    assert last_request(simulator).json["model"] == "sim-model"
    assert recorder.finished[-1].model == "sim-model"


async def test_stream_that_dies_mid_way_ends_cleanly_for_the_client(
    simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
    client: aiohttp.ClientSession,
) -> None:
    url, recorder = await _proxy(start_proxy, simulator)
    headers = {"Authorization": f"Bearer {tokens.kibana}", "x-sim-fail": "die-mid-stream"}
    async with client.post(url + CHAT, json={**KIBANA_TEST_BODY, "stream": True},
                           headers=headers) as resp:
        raw = await resp.read()  # a complete chunked body: no exception
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])
    assert recorder.finished[-1].upstream_error == "reset"
