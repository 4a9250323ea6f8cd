"""vLLM SIMULATOR: a stand-in for vLLM's OpenAI-compatible server, for demos, tests and benchmarks.

It is not vLLM and runs no model. It speaks vLLM 0.9-0.11's wire format (see FIELD-NOTES.md):
the same JSON shapes, SSE framing, errors, `/metrics` families, the unauthenticated side paths,
and the 5 s keep-alive. Every request is recorded in `SimulatorStats` so tests can assert what
reached "vLLM". Single requests are steered with `x-sim-*` headers (ttft, interval, tokens, fail,
body-bytes); see `FAIL_MODES`. `python -m proxy.simulator serve MODEL ...` replaces `vllm serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hmac
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

MAX_MODEL_LEN = 4096
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
FAIL_MODES = ("hang", "die-mid-stream", "empty-500", "flat-error", "bad-response", "close",
              "slow-body")
LEAK_PATHS = ("/invocations", "/pause", "/resume", "/sleep", "/wake_up", "/reset_prefix_cache",
              "/collective_rpc", "/tokenize", "/detokenize", "/version", "/ping", "/load")
_WORDS = ("The", "simulated", "model", "says", "hello", "from", "a", "closed", "network", "and",
          "counts", "its", "tokens", "one", "by", "one")
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_SLOW_BODY_BYTES = 4 * 1024 * 1024
_PIECE = 64 * 1024
_KEPT_REQUESTS = 1000  # the record is a window, so that benchmarks do not grow without bound


@dataclass(frozen=True)
class SimulatorConfig:
    model: str = "sim-model"
    api_key: str = ""
    ttft: float = 0.05
    token_interval: float = 0.02
    default_tokens: int = 16
    fail: str = ""
    load_seconds: float = 0.0
    keepalive_timeout: float = 5.0         # vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE; tests shorten it


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lowercased names
    body_length: int
    json: Any  # the parsed JSON body, None when absent or not JSON


_CURRENT: contextvars.ContextVar[RecordedRequest] = contextvars.ContextVar("sim_request")


class SimulatorStats:
    """What the simulator saw. Tests await changes (`wait_*`) instead of polling."""

    def __init__(self) -> None:
        self.requests: deque[RecordedRequest] = deque(maxlen=_KEPT_REQUESTS)
        self.request_count = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0  # generations cut short because the client went away
        self.running = 0
        self.open_connections = 0
        self.connections_total = 0  # TCP connections ever accepted (keep-alive reuse shows here)
        self.finished = {"stop": 0, "length": 0, "abort": 0}
        self.ttft_buckets = [0] * len(_TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._changed = asyncio.Event()

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> Awaitable[None]:
        """Await until `predicate()` holds; TimeoutError after `timeout` seconds."""
        return asyncio.wait_for(self._until(predicate), timeout)

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def wait_requests(self, n: int = 1, timeout: float = 5.0) -> Awaitable[None]:
        return self.wait_for(lambda: self.request_count >= n, timeout)

    def wait_aborted(self, n: int = 1, timeout: float = 5.0) -> Awaitable[None]:
        return self.wait_for(lambda: self.aborted >= n, timeout)

    def wait_open_connections(self, n: int = 0, timeout: float = 5.0) -> Awaitable[None]:
        return self.wait_for(lambda: self.open_connections == n, timeout)

    def _connection(self, delta: int) -> None:
        self.open_connections += delta
        if delta > 0:
            self.connections_total += delta
        self.notify()

    def _started(self, prompt_tokens: int, ttft: float | None) -> None:
        self.running += 1
        self.prompt_tokens += prompt_tokens
        if ttft is None:
            return
        self.ttft_sum += ttft
        self.ttft_count += 1
        for i, bound in enumerate(_TTFT_BUCKETS):
            if ttft <= bound:
                self.ttft_buckets[i] += 1
                break

    def _finished(self, tokens: int, reason: str) -> None:
        self.running -= 1
        self.generation_tokens += tokens
        self.finished["stop" if reason == "tool_calls" else reason] += 1
        if reason == "abort":
            self.aborted += 1
        self.notify()


STATS = web.AppKey("sim_stats", SimulatorStats)
CONFIG = web.AppKey("sim_config", SimulatorConfig)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str, type_: str = "BadRequestError") -> web.Response:
    """vLLM >= 0.10.1 error shape."""
    return _json({"error": {"message": message, "type": type_, "param": None, "code": status}},
                 status)


def _words(value: Any) -> int:
    """A deterministic stand-in for a tokenizer: words in strings, one per integer token id."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("text") or value.get("content"))
    return 1 if isinstance(value, int) else 0


def _tokens(n: int) -> list[str]:
    return [("" if i == 0 else " ") + _WORDS[i % len(_WORDS)] for i in range(n)]


def _example(schema: Any) -> Any:
    kind = schema.get("type") if isinstance(schema, dict) else None
    return {"string": "sim", "integer": 1, "number": 1.0, "boolean": True}.get(str(kind))


def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The forced tool call for `tool_choice` naming a function or "required", else None."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    if not tools or not isinstance(tools, list):
        return None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
        function = next((t["function"] for t in tools if t.get("function", {}).get("name") == name),
                        {"name": name})
    elif choice == "required":
        function = tools[0].get("function", {})
    else:
        return None
    props = function.get("parameters", {}).get("properties", {})
    arguments = json.dumps({key: _example(schema) for key, schema in props.items()})
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": function.get("name"), "arguments": arguments}}


async def _forever() -> NoReturn:
    """Wait until the handler is cancelled (the runner enables handler_cancellation)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _hang_up(request: web.Request, data: bytes = b"", abort: bool = False) -> NoReturn:
    transport = request.transport
    if transport is not None:
        if data:
            transport.write(data)
        if abort:
            transport.abort()  # RST, no terminating chunk
        else:
            transport.close()
    await _forever()


def _knob(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        return default


@dataclass
class _Generation:
    chat: bool
    id: str
    created: int
    model: str
    prompt_tokens: int
    tokens: list[str]
    finish_reason: str
    tool_call: dict[str, Any] | None
    ttft: float
    interval: float

    def usage(self) -> dict[str, Any]:
        n = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + n,
                "completion_tokens": n, "prompt_tokens_details": None}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return b"data: " + _dumps(data) + b"\n\n"

    def token_chunk(self, text: str, finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text
        elif self.tool_call is not None:
            choice["delta"] = {"tool_calls": [{"index": 0, **self.tool_call}]}
        else:
            choice["delta"] = {"content": text}
        choice.update(logprobs=None, finish_reason=finish)
        if finish is not None or not self.chat:
            choice["stop_reason"] = None
        return self.chunk([choice])

    def whole(self, padding: int) -> dict[str, Any]:
        text = "x" * padding if padding else "".join(self.tokens)
        head = {"id": self.id, "created": self.created, "model": self.model}
        if not self.chat:
            return {**head, "object": "text_completion", "choices": [
                {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason,
                 "stop_reason": None, "prompt_logprobs": None}], "usage": self.usage()}
        calls = [] if self.tool_call is None else [self.tool_call]
        message = {"role": "assistant", "content": None if calls else text,
                   "reasoning_content": None, "tool_calls": calls}
        return {**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None,
             "finish_reason": self.finish_reason, "stop_reason": None}],
            "usage": self.usage(), "prompt_logprobs": None, "kv_transfer_params": None}


class _Simulator:
    def __init__(self, config: SimulatorConfig, stats: SimulatorStats) -> None:
        self.config, self.stats = config, stats

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def models(self, request: web.Request) -> web.Response:
        now, model = int(time.time()), self.config.model
        permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                      "created": now, "allow_create_engine": False, "allow_sampling": True,
                      "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                      "allow_fine_tuning": False, "organization": "*", "group": None,
                      "is_blocking": False}
        return _json({"object": "list", "data": [
            {"id": model, "object": "model", "created": now, "owned_by": "vllm", "root": model,
             "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": [permission]}]})

    async def leak(self, request: web.Request) -> web.Response:
        return _json({"simulator": "vllm", "path": request.path,
                      "leak": "vLLM leaves this path open; airgate must never forward it"})

    def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The JSON object of the request, or the error vLLM would answer."""
        record = _CURRENT.get()
        if request.content_type != "application/json":
            return _error(400, "Unsupported Media Type: Only 'application/json' is allowed")
        if not isinstance(record.json, dict):
            return _error(400, "JSON decode error: the body is not a JSON object")
        model = record.json.get("model")
        if model is not None and model != self.config.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return record.json

    async def embeddings(self, request: web.Request) -> web.Response:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) and not _is_ids(inputs) else [inputs]
        data = [{"index": i, "object": "embedding",
                 "embedding": [((hash(str(text)) >> k) % 1000) / 1000.0 for k in range(8)]}
                for i, text in enumerate(inputs)]
        n = _words(inputs)
        self.stats.prompt_tokens += n
        return _json({"id": f"embd-{uuid.uuid4().hex}", "object": "list",
                      "created": int(time.time()), "model": self.config.model, "data": data,
                      "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                                "prompt_tokens_details": None}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        field = "messages" if chat else "prompt"
        if field not in body or (chat and not isinstance(body["messages"], list)):
            return _error(400, f"{field}: Field required")
        stream = body.get("stream") is True
        if body.get("stream_options") is not None and not stream:
            return _error(400, "Stream options can only be defined when `stream=True`.")
        if chat:
            prompt = sum(4 + _words(m.get("content")) for m in body["messages"]
                         if isinstance(m, dict))
        else:
            prompt = _words(body["prompt"])
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(max_tokens, int) and max_tokens > MAX_MODEL_LEN - prompt:
            return _error(400, f"'max_tokens' or 'max_completion_tokens' is too large: "
                          f"{max_tokens}. This model's maximum context length is {MAX_MODEL_LEN} "
                          f"tokens and your request has {prompt} input tokens "
                          f"({max_tokens} > {MAX_MODEL_LEN} - {prompt}).")
        wanted = max_tokens if isinstance(max_tokens, int) else self.config.default_tokens
        n = max(1, int(_knob(request, "x-sim-tokens", wanted)))
        tool_call = _tool_call(body) if chat else None
        finish = "length" if isinstance(max_tokens, int) and n >= max_tokens else "stop"
        gen = _Generation(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                          int(time.time()), self.config.model, prompt, _tokens(n),
                          "tool_calls" if tool_call else finish, tool_call,
                          _knob(request, "x-sim-ttft", self.config.ttft),
                          _knob(request, "x-sim-interval", self.config.token_interval))
        fail = request.headers.get("x-sim-fail", self.config.fail)
        options = body.get("stream_options") or {}
        usage = isinstance(options, dict) and options.get("include_usage") is True
        self.stats._started(prompt, gen.ttft)
        if stream:
            return await self._stream(request, gen, usage, fail == "die-mid-stream")
        return await self._answer(request, gen, fail, int(_knob(request, "x-sim-body-bytes", 0)))

    async def _answer(self, request: web.Request, gen: _Generation, fail: str,
                      padding: int) -> web.StreamResponse:
        try:
            await asyncio.sleep(gen.ttft + gen.interval * (len(gen.tokens) - 1))
        except asyncio.CancelledError:
            self.stats._finished(0, "abort")
            raise
        self.stats._finished(len(gen.tokens), gen.finish_reason)
        if fail == "slow-body" and not padding:
            padding = _SLOW_BODY_BYTES
        data = _dumps(gen.whole(padding))
        if fail not in ("slow-body", "die-mid-stream"):
            return web.Response(body=data, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        if fail == "die-mid-stream":
            await response.write(data[: len(data) // 2])
            await _hang_up(request, abort=True)
        try:
            for start in range(0, len(data), _PIECE):
                await response.write(data[start:start + _PIECE])  # drains: back-pressure
                await asyncio.sleep(gen.interval)
        except ConnectionResetError:
            pass  # the client went away; aiohttp notices on write_eof
        return response

    async def _stream(self, request: web.Request, gen: _Generation, usage: bool,
                      die: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
        await response.prepare(request)  # headers go out now, like uvicorn
        sent, last = 0, len(gen.tokens) - 1
        try:
            await asyncio.sleep(gen.ttft)
            if gen.chat:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                await response.write(gen.chunk([role]))
            for i, text in enumerate(gen.tokens):
                if i:
                    await asyncio.sleep(gen.interval)
                if die and i == 2:
                    break
                if gen.tool_call is not None:  # the whole call in one delta
                    await response.write(gen.token_chunk("", gen.finish_reason))
                    sent = len(gen.tokens)
                    break
                finish = gen.finish_reason if i == last else None
                await response.write(gen.token_chunk(text, finish))
                sent += 1
            if not die:
                if usage:
                    await response.write(gen.chunk([], usage=gen.usage()))
                await response.write(b"data: [DONE]\n\n")
        except asyncio.CancelledError:
            self.stats._finished(sent, "abort")
            raise
        except ConnectionResetError:
            self.stats._finished(sent, "abort")
            return response
        self.stats._finished(sent, gen.finish_reason)
        if die:
            await _hang_up(request, abort=True)
        return response

    async def metrics(self, request: web.Request) -> web.Response:
        s, label = self.stats, f'model_name="{self.config.model}"'
        out: list[str] = []

        def family(name: str, kind: str, doc: str, *samples: tuple[str, str, float]) -> None:
            out.extend((f"# HELP {name} {doc}", f"# TYPE {name} {kind}"))
            out.extend(f"{name}{sfx}{{{label}{extra}}} {float(v)}" for sfx, extra, v in samples)

        family("vllm:num_requests_running", "gauge", "Number of requests in model execution "
               "batches.", ("", "", s.running))
        family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be "
               "processed.", ("", "", 0))
        family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               ("", "", min(1.0, s.running / 100)))
        family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               ("", "", s.prompt_tokens))
        family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
               ("", "", s.generation_tokens))
        family("vllm:request_success_total", "counter", "Count of successfully processed "
               "requests.", *(("", f',finished_reason="{r}"', v) for r, v in s.finished.items()))
        cumulative, buckets = 0, []
        for bound, count in zip(_TTFT_BUCKETS, s.ttft_buckets, strict=True):
            cumulative += count
            buckets.append(("_bucket", f',le="{bound}"', cumulative))
        family("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first "
               "token in seconds.", *buckets, ("_bucket", ',le="+Inf"', s.ttft_count),
               ("_count", "", s.ttft_count), ("_sum", "", s.ttft_sum))
        return web.Response(body=("\n".join(out) + "\n").encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _is_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) for v in value)


def build_app(config: SimulatorConfig) -> web.Application:
    stats = SimulatorStats()
    sim = _Simulator(config, stats)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else b""
        parsed = None
        if body and request.content_type == "application/json":
            try:
                parsed = json.loads(body)
            except ValueError:
                pass
        entry = RecordedRequest(request.method, request.path,
                                {k.lower(): v for k, v in request.headers.items()}, len(body),
                                parsed)
        stats.requests.append(entry)
        stats.request_count += 1
        stats.notify()
        _CURRENT.set(entry)
        if config.api_key and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {config.api_key}".encode()):
                return _json({"error": "Unauthorized"}, 401)
        fail = request.headers.get("x-sim-fail") or (
            config.fail if request.path not in ("/health", "/metrics") else "")
        if fail == "hang":
            stats._started(0, None)
            try:
                await _forever()
            except asyncio.CancelledError:
                stats._finished(0, "abort")
                raise
        if fail == "empty-500":
            return web.Response(status=500)
        if fail == "flat-error":
            return _json({"object": "error", "message": "simulated flat (vLLM <= 0.10.0) error",
                          "type": "BadRequestError", "param": None, "code": 400}, 400)
        if fail == "bad-response":
            await _hang_up(request, b"SIMULATOR GARBAGE, NOT HTTP\r\n\r\n")
        if fail == "close":
            await _hang_up(request)
        try:
            return await handler(request)
        except web.HTTPNotFound:  # FastAPI's shape
            return _json({"detail": "Not Found"}, 404)
        except web.HTTPMethodNotAllowed:
            return _json({"detail": "Method Not Allowed"}, 405)

    app = web.Application(middlewares=[record], client_max_size=1 << 30)
    app[STATS], app[CONFIG] = stats, config
    app.router.add_get("/health", sim.health)
    app.router.add_get("/metrics", sim.metrics)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_post("/v1/chat/completions", sim.chat)
    app.router.add_post("/v1/completions", sim.completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    for path in LEAK_PATHS:
        app.router.add_route("*", path, sim.leak)
    return app


class _Counted(asyncio.Protocol):
    """Wraps aiohttp's protocol to count open TCP connections exactly (open until closed)."""

    __slots__ = ("_inner", "_stats")

    def __init__(self, inner: RequestHandler, stats: SimulatorStats) -> None:
        self._inner, self._stats = inner, stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stats._connection(+1)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)
        self._stats._connection(-1)


class RunningSimulator:
    """A listening simulator: `url`, `port`, `stats`; `close()` or use `async with`."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, host: str,
                 port: int) -> None:
        self.app, self.stats, self.port = runner.app, runner.app[STATS], port
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._runner, self._server = runner, server

    async def close(self) -> None:
        self._server.close()
        await self._runner.cleanup()  # in-flight requests get 0.1 s, then are cut

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_simulator(config: SimulatorConfig = SimulatorConfig(), host: str = "127.0.0.1",
                          port: int = 0, *, reuse_port: bool = False) -> RunningSimulator:
    """Listen like vLLM/uvicorn: backlog 2048, idle keep-alive closed after 5 s."""
    app = build_app(config)
    runner = web.AppRunner(app, keepalive_timeout=config.keepalive_timeout,
                           handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    handlers, stats = runner.server, app[STATS]
    assert handlers is not None
    server = await asyncio.get_running_loop().create_server(
        lambda: _Counted(handlers(), stats), host, port, backlog=2048, reuse_port=reuse_port)
    return RunningSimulator(runner, server, host, server.sockets[0].getsockname()[1])


# ---- command line: `python -m proxy.simulator serve MODEL [vLLM flags...]` ----

def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


async def _serve(config: SimulatorConfig, host: str, port: int, reuse_port: bool,
                 ready: Callable[[int], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_simulator(config, host, port, reuse_port=reuse_port)
    ready(running.port)
    await stop.wait()
    await running.close()


def _fake_load(seconds: float, shards: int = 4) -> None:
    """vLLM has no HTTP server while it loads; print its progress lines meanwhile."""
    print(f"INFO:     vLLM SIMULATOR (proxy.simulator), not vLLM: 'loading' for {seconds:.1f} s",
          flush=True)
    step = seconds / shards

    def clock(t: float) -> str:
        return f"{int(t) // 60:02d}:{int(t) % 60:02d}"

    for done in range(shards + 1):
        if done:
            time.sleep(step)
        print(f"Loading safetensors checkpoint shards: {100 * done // shards:3d}% Completed | "
              f"{done}/{shards} [{clock(step * done)}<{clock(step * (shards - done))}, "
              f"{step:5.2f}s/it]", flush=True)


def _announce(host: str, port: int) -> None:
    print(f"INFO:     Started server process [{os.getpid()}]\n"
          "INFO:     Waiting for application startup.\n"
          "INFO:     Application startup complete.\n"
          f"INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)", flush=True)


def _workers(config: SimulatorConfig, host: str, port: int, count: int) -> int:
    """Fork `count` servers that share the port through SO_REUSEPORT; SIGTERM/SIGINT stop all."""
    reserve = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind((host, port))  # holds the port (0: picks a free one) until the workers listen
    port = reserve.getsockname()[1]
    read_end, write_end = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:  # a worker: serve, tell the parent once listening
            os.close(read_end)
            reserve.close()

            def tell(_port: int) -> None:
                os.write(write_end, b".")
                os.close(write_end)

            code = 1
            try:
                _run(_serve(config, host, port, True, tell))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(write_end)

    def stop(signum: int = 0, frame: Any = None) -> None:
        for child in pids:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = b""
    while len(ready) < count and (more := os.read(read_end, count)):
        ready += more  # EOF early: a worker died before listening
    reserve.close()
    if len(ready) == count:
        _announce(host, port)
    else:
        print("ERROR:    a simulator worker failed to start", file=sys.stderr, flush=True)
        stop()
    codes = [os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) for child in pids]
    return 0 if len(ready) == count and not any(codes) else 1


def main(argv: list[str] | None = None) -> int:
    """`serve MODEL [flags]` (like `vllm serve`) or `--model MODEL [flags]` (like the image)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m proxy.simulator serve", allow_abbrev=False,
        description="vLLM SIMULATOR for tests and demos; accepts and ignores other vLLM flags.")
    parser.add_argument("model_tag", nargs="?")
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY", ""))
    parser.add_argument("--ttft", type=float, default=SimulatorConfig.ttft)
    parser.add_argument("--token-interval", type=float, default=SimulatorConfig.token_interval)
    parser.add_argument("--default-tokens", type=int, default=SimulatorConfig.default_tokens)
    parser.add_argument("--fail", default="", choices=("", *FAIL_MODES))
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=1)
    args, _vllm_flags = parser.parse_known_args(argv)
    model = (args.served_model_name or [None])[0] or args.model_tag or args.model or "sim-model"
    config = SimulatorConfig(model=model, api_key=args.api_key, ttft=args.ttft,
                             token_interval=args.token_interval,
                             default_tokens=args.default_tokens, fail=args.fail,
                             load_seconds=args.load_seconds)
    if config.load_seconds > 0:
        _fake_load(config.load_seconds)
    if args.workers > 1:
        return _workers(config, args.host, args.port, args.workers)
    _run(_serve(config, args.host, args.port, False, lambda port: _announce(args.host, port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
