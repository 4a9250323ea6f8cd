"""The forwarding core: client connection in, vLLM connection out, bytes through.

Design (measured, see DESIGN.md "The hot path"): asyncio Protocols driven by httptools (llhttp)
parser callbacks — no Task, Future, StreamReader or response object per request. The request
head is rebuilt (hop-by-hop headers out, X-Forwarded-* and vLLM's key in); the request body is
written to vLLM as it arrives. The response head is rebuilt once; the response body, chunked
framing included, is written to the client exactly as read. Back-pressure runs both ways through
pause_reading/resume_reading. The upstream connection stays pinned to the client connection
between requests and goes back to the pool when the client leaves.

Anything not worth forwarding (bad auth, a path off the allowlist, a body over the limit) is
answered here with an OpenAI-shaped JSON error and never reaches vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

import httptools

from proxy import errors
from proxy.exchange import PHASE_REQUEST, PHASE_STREAMING, PHASE_WAITING, Exchange
from proxy.request_head import has_secret_param, new_request_id, printable, valid_request_id
from proxy.rewrite import (
    REWRITE_LIMIT,
    USAGE_ROUTES,
    cut_usage_event,
    models_with_alias,
    read_usage,
    rewrite_request,
)
from proxy.upstream_connection import UpstreamConnection

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.state import ProxyState
    from proxy.upstream import UpstreamPool

log = logging.getLogger(__name__)

# Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus the ones we replace.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
# accept-encoding: vLLM never compresses today; dropping it keeps it that way (a compressed
# event stream is a buffered event stream).
REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"authorization", b"content-length", b"expect", b"accept-encoding",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id",
    b"forwarded", b"x-real-ip",
}
# Framing headers are in this set only to be looked at; they are written back unchanged because
# the body is passed through with its framing.
RESPONSE_DROP = HOP_BY_HOP | {b"x-request-id", b"content-length"}

MAX_ERROR_BODY = 256 * 1024          # upstream error bodies are buffered to normalise them
PENDING_HIGH_WATER = 1024 * 1024     # request bytes held while connecting before we pause
RETRY_COPY_LIMIT = 1024 * 1024       # requests up to this size can be retried once

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


# What a connection is waiting for; the server's sweep applies the matching timeout.
PHASE_IDLE = 0        # for a request (keep-alive idle; header_timeout before the first)
PHASE_HEAD = 1        # for the rest of a request head (slowloris): header_timeout in all
PHASE_BODY = 2        # for more request body: header_timeout of silence
PHASE_UPSTREAM = 3    # for vLLM: read_timeout of silence


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer with a local error."""

    def __init__(self, response: bytes) -> None:
        self.response = response


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error",
           extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    return errors.json_error(status, message, type_, code, extra_headers=extra, keep_alive=False)


BAD_REQUEST = _error(400, "malformed HTTP request", "bad_request")
HEADERS_TOO_LARGE = _error(431, "request headers too large (see [server] max_header_size and "
                           "max_headers)", "request_header_fields_too_large")
REQUEST_TIMEOUT = _error(408, "the request was not received in time (see [server] "
                         "header_timeout)", "request_timeout")
BEARER = (("WWW-Authenticate", "Bearer"),)


class ClientConnection(asyncio.Protocol):
    """One client (TLS) connection and the exchange running on it."""

    __slots__ = (
        "_body_chunked",
        "_connect_task",
        "_continue",
        "_count_usage",
        "_discard",
        "_ex",
        "_gone",
        "_header_bytes",
        "_header_count",
        "_headers",
        "_keep_alive",
        "_last_activity",
        "_last_chunk_at",
        "_loop",
        "_parser",
        "_pending",
        "_pending_size",
        "_phase",
        "_pool",
        "_reading_blocks",
        "_request_done",
        "_request_model",
        "_resp_buffered",
        "_resp_chunked",
        "_resp_done",
        "_resp_head_buf",
        "_resp_headers",
        "_resp_in_chunk",
        "_resp_mode",
        "_resp_sink",
        "_retry_copy",
        "_rewrite_body",
        "_served",
        "_server",
        "_sse_pending",
        "_state",
        "_strip_usage",
        "_tail",
        "_tail_prev",
        "_transform_models",
        "_upstream_head",
        "_url",
        "_waiting_upstream",
        "closing",
        "peer",
        "transport",
        "upstream",
    )

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._loop = server.loop
        self._pool: UpstreamPool = server.pool
        self._state: ProxyState = server.state
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.peer = "-"
        self.closing = False
        self._parser = httptools.HttpRequestParser(self)
        self._last_activity = 0.0
        self._served = 0
        self._discard = False
        self._gone = False
        self._reading_blocks = 0
        self._connect_task: asyncio.Task[None] | None = None
        self._reset_request()

    def _reset_request(self) -> None:
        self._ex: Exchange | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._header_count = 0
        self._keep_alive = True
        self._continue = False
        self._body_chunked = False
        self._request_done = False
        self._pending: list[bytes] | None = None
        self._pending_size = 0
        self._retry_copy: list[bytes] | None = None
        self._upstream_head = b""
        self._waiting_upstream = False
        self._resp_head_buf = b""
        self._resp_headers: list[tuple[bytes, bytes]] | None = None
        # 0 head pending, 1 raw pass-through, 2 buffered (errors, /v1/models with an alias),
        # 3 event stream re-framed to cut the usage chunk airgate asked for
        self._resp_mode = 0
        self._resp_chunked = False
        self._resp_in_chunk = False
        self._resp_done = False
        self._resp_sink: list[bytes] | None = None   # decoded body pieces, modes 2 and 3
        self._resp_buffered = 0
        self._phase = PHASE_IDLE
        self._rewrite_body: list[bytes] | None = None  # request body held for rewrite_request
        self._strip_usage = False      # airgate added include_usage: cut the usage chunk
        self._count_usage = False
        self._transform_models = False
        self._request_model = ""
        self._sse_pending = b""
        self._tail = b""               # the last two reads of the answer, for read_usage
        self._tail_prev = b""
        self._last_chunk_at = 0.0

    # ======================================================================================
    # client side: asyncio.Protocol
    # ======================================================================================
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
        self._last_activity = self._loop.time()
        if len(self._server.connections) >= self._state.settings.server.max_connections:
            # Over [server] max_connections: say so and close, rather than let a flood of idle
            # connections exhaust file descriptors and memory.
            self._gone = self.closing = True
            self.transport.write(_error(
                503, "too many connections to airgate ([server] max_connections); retry "
                "shortly", "too_many_connections", type_="server_error",
                extra=(("Retry-After", "1"),)))
            self.transport.close()
            return
        self._server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        try:
            self._parser.feed_data(data)
        except _Reject as reject:
            self._fail_local(reject.response)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self._fail_local(cause.response if isinstance(cause, _Reject) else BAD_REQUEST)
        except httptools.HttpParserUpgrade:
            self._fail_local(_error(400, "protocol upgrades are not supported", "bad_request"))
        except httptools.HttpParserError:
            self._fail_local(BAD_REQUEST)

    def eof_received(self) -> bool:
        # A client that closed its side is gone. Act now: a TLS transport's close() waits for
        # the write buffer to drain and for the TLS shutdown (up to 30 s), and vLLM would go on
        # generating for a client that will never read it.
        self._client_gone()
        if self.transport is not None:
            self.transport.abort()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()

    def _client_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        self.closing = True
        self._server.connections.discard(self)
        if self._connect_task is not None:
            self._connect_task.cancel()
        ex = self._ex
        upstream = self.upstream
        self.upstream = None
        if ex is not None and not self._resp_done:
            # The client left mid-exchange: close vLLM's connection now so it aborts the
            # generation and frees the GPU slot (it only notices a real TCP close).
            if upstream is not None:
                upstream.discard()
                upstream = None
            if not ex.aborted:
                ex.aborted = (PHASE_STREAMING if self._resp_mode else
                              PHASE_WAITING if self._request_done else PHASE_REQUEST)
            if ex.status == 0:
                ex.status = 499
            self._finish_exchange()
        if upstream is not None:
            self._pool.give_back(upstream)

    def pause_writing(self) -> None:
        # The client reads slower than vLLM writes: stop reading vLLM until it catches up.
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    def pause_client_reading(self) -> None:
        self._reading_blocks += 1
        if self._reading_blocks == 1 and self.transport is not None:
            self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self._reading_blocks == 0:
            return
        self._reading_blocks -= 1
        if self._reading_blocks == 0 and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # ======================================================================================
    # request parsing: httptools callbacks
    # ======================================================================================
    def on_message_begin(self) -> None:
        if self._ex is not None:
            # A pipelined request while one is in flight: answer the first, then close; the
            # client retries the rest (RFC 9112 9.3.2). Kibana and OpenAI clients never pipeline.
            self._keep_alive = False
            self._discard = True
            return
        self._state = self._server.state
        self._ex = Exchange(self._loop.time(), time.time(), self.peer)
        self._phase = PHASE_HEAD
        self._server.observer_started(self._ex)

    def on_url(self, url: bytes) -> None:
        if self._discard:
            return
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._discard:
            return
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        server_settings = self._state.settings.server
        if (self._header_count > server_settings.max_headers
                or self._header_bytes > server_settings.max_header_size):
            raise _Reject(HEADERS_TOO_LARGE)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._discard:
            return
        self._phase = PHASE_BODY
        parser = self._parser
        ex = self._ex
        assert ex is not None
        method = parser.get_method()
        ex.method = method.decode("latin-1")
        ex.version = parser.get_http_version()
        self._keep_alive = parser.should_keep_alive()
        url = self._url
        path, _, query = url.partition(b"?")
        ex.path = path.decode("latin-1")
        state = self._state

        authorization = b""
        request_id = b""
        content_length = -1
        connection_tokens = b""
        forwarded: list[tuple[bytes, bytes]] = []
        for name, value in self._headers:
            if name in REQUEST_DROP:
                if name == b"authorization":
                    authorization = value
                elif name == b"x-request-id":
                    request_id = value
                elif name == b"content-length":
                    content_length = int(value)  # llhttp has checked it is one decimal number
                elif name == b"transfer-encoding":
                    if value.strip().lower() != b"chunked":
                        raise _Reject(_error(501, "only 'Transfer-Encoding: chunked' is "
                                             "supported", "not_implemented"))
                    self._body_chunked = True
                elif name == b"expect":
                    self._continue = value.strip().lower() == b"100-continue"
                elif name == b"host":
                    forwarded.append((b"x-forwarded-host", value))
                elif name == b"connection":
                    connection_tokens += b"," + value
                continue
            if name == b"user-agent":
                ex.user_agent = value.decode("latin-1")
            elif name == b"referer":
                ex.referer = value.decode("latin-1")
            forwarded.append((name, value))
        if connection_tokens:
            # headers named in Connection are hop-by-hop too
            listed = {item.strip().lower() for item in connection_tokens.split(b",")}
            forwarded = [(n, v) for n, v in forwarded if n not in listed]

        if not valid_request_id(request_id):
            request_id = new_request_id()
        ex.request_id = request_id.decode("latin-1")

        # Local routes answered by the core itself, without a token.
        if path == b"/healthz" and method == b"GET":
            raise _Reject(self._server.healthz_response(request_id))
        if ex.version != "1.1":
            # The body is passed through with HTTP/1.1 framing (chunked), which an HTTP/1.0
            # client cannot read, and nothing else is HTTP/1.x.
            raise _Reject(_error(505, f"HTTP/{printable(ex.version.encode())} is not "
                                 "supported: use HTTP/1.1", "http_version_not_supported"))

        if query and has_secret_param(query):
            # A secret in the URL ends up in every log on the way; refuse and never log it.
            self._server.observer_auth_failed("malformed")
            raise _Reject(_error(
                401, "credentials in the URL are refused: send 'Authorization: Bearer <token>'",
                "invalid_api_key", extra=BEARER))

        reject = self._server.throttle_check(self.peer)
        if reject is not None:
            raise _Reject(reject)
        if path == b"/metrics" and method == b"GET" and state.metrics_token is not None:
            # Its own token ([metrics] token_file), not a client token.
            raise _Reject(self._server.metrics_on_tls(authorization, self.peer))
        token_name = self._check_auth(authorization)
        ex.token_name = token_name

        # A request refused before this point counts under route "other": it was not served.
        route = state.routes.get((method, path))
        if route is None:
            raise _Reject(_error(
                404, f"{ex.method} {printable(path)} is not served here; airgate forwards only "
                f"{', '.join(state.settings.upstream.allow)}", "not_found"))
        ex.route = route
        if content_length > state.max_body:
            raise _Reject(_error(
                413, f"request body of {content_length} bytes is over the limit of "
                f"{state.max_body} bytes: raise [upstream] max_body", "request_too_large"))
        self._server.limits_acquire(ex)
        if not self._body_chunked and content_length <= RETRY_COPY_LIMIT:
            self._retry_copy = []
        usage_route = route in USAGE_ROUTES
        self._count_usage = state.count_usage and (usage_route or route == "/v1/embeddings")
        self._transform_models = bool(state.model_alias) and route == "/v1/models"
        # Bodies that may need rewriting are held whole (bounded) and sent with a new length.
        rewrite = ((state.count_usage or bool(state.model_alias)) and usage_route
                   and not self._body_chunked and 0 < content_length <= REWRITE_LIMIT)

        head = [method, b" ", url, b" HTTP/1.1\r\n", state.upstream_fixed_headers]
        for name, value in forwarded:
            head += (name, b": ", value, b"\r\n")
        head += (b"x-forwarded-for: ", self.peer.encode(), b"\r\nx-forwarded-proto: https\r\n",
                 b"x-request-id: ", request_id, b"\r\n")
        if self._body_chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        elif content_length >= 0 and not rewrite:
            head += (b"content-length: ", str(content_length).encode(), b"\r\n")
        if not rewrite:
            head.append(b"\r\n")
        self._upstream_head = b"".join(head)
        self._headers = []
        if self._continue and self.transport is not None:
            self.transport.write(CONTINUE_100)
        if rewrite:
            self._rewrite_body = []  # sent from on_message_complete
        else:
            self._start_upstream()

    def on_body(self, body: bytes) -> None:
        ex = self._ex
        if ex is None or self._discard:
            return
        ex.body_in += len(body)
        if ex.body_in > self._state.max_body:
            self._drop_upstream()  # vLLM got part of a body it must never finish reading
            raise _Reject(_error(
                413, f"request body is over the limit of {self._state.max_body} bytes: raise "
                "[upstream] max_body", "request_too_large"))
        if self._rewrite_body is not None:
            self._rewrite_body.append(body)
            return
        if self._body_chunked:
            data = b"%x\r\n%b\r\n" % (len(body), body)
        else:
            data = body
        self._send_upstream(data)

    def on_message_complete(self) -> None:
        if self._discard:
            return
        self._request_done = True
        if self._body_chunked:
            self._send_upstream(b"0\r\n\r\n")
        # Keep reading the client: that is how a hang-up is noticed while vLLM works.
        self._phase = PHASE_UPSTREAM
        held = self._rewrite_body
        if held is not None:
            self._rewrite_body = None
            state = self._state
            body, self._strip_usage, self._request_model = rewrite_request(
                b"".join(held), want_usage=state.count_usage, alias=state.model_alias,
                served=self._server.served_model())
            self._upstream_head += b"content-length: %d\r\n\r\n" % len(body)
            if self._retry_copy is not None and len(body) > RETRY_COPY_LIMIT:
                self._retry_copy = None
            self._start_upstream(body)

    # ======================================================================================
    # auth and local answers
    # ======================================================================================
    def _check_auth(self, authorization: bytes) -> str:
        if not authorization:
            reason = "missing"
            message = "missing bearer token: send 'Authorization: Bearer <token>'"
        else:
            scheme, _, token = authorization.partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                reason = "malformed"
                message = "malformed Authorization header: expected 'Bearer <token>'"
            else:
                name = self._state.tokens.lookup(token)
                if name is not None:
                    return name
                reason = "unknown"
                message = "invalid bearer token: check the API key in the client (Kibana connector)"
        self._server.observer_auth_failed(reason)
        self._server.throttle_failure(self.peer)
        raise _Reject(_error(401, message, "invalid_api_key", extra=BEARER))

    def _fail_local(self, response: bytes) -> None:
        """Answer from the proxy itself and close: the connection's framing can't be trusted
        past a rejected request (its body may still be arriving)."""
        ex = self._ex
        if ex is not None and ex.status == 0 and response:
            ex.status = int(response[9:12])
            ex.body_out = len(response) - response.find(b"\r\n\r\n") - 4  # as Nginx logs it
        self._keep_alive = False
        self._resp_done = True
        transport = self.transport
        if transport is not None and not self.closing:
            if response and not self._resp_mode:
                transport.write(response)
            self.closing = True
            transport.close()
        if ex is not None and ex is self._ex and not self._resp_mode:
            self._finish_exchange()

    # ======================================================================================
    # upstream: connect, send, receive
    # ======================================================================================
    def _drop_upstream(self) -> None:
        """Close vLLM's connection for good: its framing or its answer is not wanted."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.discard()

    def _start_upstream(self, body: bytes = b"") -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.reusable(self._loop.time(),
                                                          self._pool.idle_timeout):
            self._drop_upstream()
            upstream = None
        if upstream is None:
            upstream = self._pool.take_idle()
        if upstream is not None:
            self._pending = [body] if body else None
            self._attach(upstream)
            return
        status = self._state.model_status
        if status is not None:
            model = status()
            if model.state != "ready":
                self._upstream_unavailable("refused", model.message, model.retry_after)
                return
        self._pending = [body] if body else []
        self._waiting_upstream = True
        self._connect_task = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        ex = self._ex
        try:
            upstream = await self._pool.connect(UpstreamConnection)
        except asyncio.CancelledError:
            return
        except TimeoutError:
            self._connect_task = None
            self._upstream_unavailable("timeout", "vLLM did not accept a connection within "
                                       "[upstream] connect_timeout", 5)
            return
        except OSError as error:
            self._connect_task = None
            self._upstream_unavailable("refused", _refused_reason(error), 5)
            return
        self._connect_task = None
        if self.closing or ex is not self._ex:
            self._pool.give_back(upstream)
            return
        self._attach(upstream)

    def _attach(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        upstream.owner = self
        upstream.used += 1
        pending = self._pending
        self._pending = None
        self._waiting_upstream = False
        data = self._upstream_head
        if pending:
            data += b"".join(pending)
            if self._reading_blocks and self._pending_size > PENDING_HIGH_WATER:
                self.resume_client_reading()
            self._pending_size = 0
        if self._retry_copy is not None:
            self._retry_copy.append(data)
        assert upstream.transport is not None
        upstream.transport.write(data)

    def _send_upstream(self, data: bytes) -> None:
        if self._pending is not None:
            self._pending.append(data)
            self._pending_size += len(data)
            crossed = self._pending_size - len(data) <= PENDING_HIGH_WATER < self._pending_size
            if crossed:  # hold the client until vLLM's connection is there to take the bytes
                self.pause_client_reading()
            return
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        if self._retry_copy is not None:
            self._retry_copy.append(data)
        upstream.transport.write(data)

    def upstream_data(self, upstream: UpstreamConnection, data: bytes) -> None:
        self._last_activity = self._loop.time()
        mode = self._resp_mode
        try:
            if mode == 1:
                # The hot path: feed the parser (to find the end), write the bytes as read.
                upstream._parser.feed_data(data)
                transport = self.transport
                assert transport is not None
                transport.write(data)
                ex = self._ex
                assert ex is not None
                ex.body_out += len(data)
                self._tail_prev = self._tail
                self._tail = data
                if ex.streamed:
                    self._stream_tick(ex)
            else:
                if mode == 0:
                    self._resp_head_buf += data
                elif mode == 2:
                    self._resp_buffered += len(data)
                    if self._resp_buffered > MAX_ERROR_BODY:
                        self._resp_sink = None  # keep the start of an oversized error body
                upstream._parser.feed_data(data)
                if self._resp_mode == 3:
                    self._flush_events()
        except httptools.HttpParserError:
            self._bad_upstream_response("vLLM sent a response airgate could not parse")
            return
        if self._resp_done:
            self._upstream_complete(upstream)

    def upstream_headers_complete(self, upstream: UpstreamConnection) -> None:
        ex = self._ex
        assert ex is not None and self.transport is not None
        self._retry_copy = None  # answered: nothing to retry, let the request bytes go
        parser = upstream._parser
        status = parser.get_status_code()
        # Read now: llhttp forgets the message's keep-alive state once the message completes.
        upstream.keep_alive = parser.should_keep_alive()
        ex.status = status
        ex.ttfb = self._loop.time() - ex.start
        headers = self._resp_headers or []
        self._resp_headers = None
        is_stream = False
        out = [b"HTTP/1.1 %d %b\r\n" % (status, errors.REASONS.get(status, "Unknown").encode())]
        for name, value in headers:
            if name in RESPONSE_DROP:
                if name == b"transfer-encoding":
                    self._resp_chunked = True
                    out += (b"transfer-encoding: ", value, b"\r\n")
                elif name == b"content-length":
                    out += (b"content-length: ", value, b"\r\n")
                continue
            if name == b"content-type" and value.startswith(b"text/event-stream"):
                is_stream = True
            out += (name, b": ", value, b"\r\n")
        out += (b"x-request-id: ", ex.request_id.encode(), b"\r\n")
        if is_stream:
            ex.streamed = True
            out.append(b"cache-control: no-cache\r\nx-accel-buffering: no\r\n")
        if not self._keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if status >= 400 or self._transform_models:
            self._resp_mode = 2
            self._resp_sink = []
            self._resp_head_buf = b""
            return
        if self._strip_usage and is_stream and self._resp_chunked:
            # The body after the head arrives through on_body into the sink (same feed).
            self._resp_mode = 3
            self._resp_sink = []
            self._resp_head_buf = b""
            self.transport.write(b"".join(out))
            return
        head_end = self._resp_head_buf.find(b"\r\n\r\n")
        rest = self._resp_head_buf[head_end + 4:] if head_end >= 0 else b""
        self._resp_head_buf = b""
        self._resp_mode = 1
        ex.body_out += len(rest)
        self.transport.write(b"".join(out) + rest)
        if rest:
            self._tail = rest
            if is_stream:
                self._stream_tick(ex)

    def _stream_tick(self, ex: Exchange) -> None:
        """Time to first token and the gaps between tokens (vLLM writes one event per token)."""
        now = self._last_activity
        if ex.ttft is None:
            ex.ttft = now - ex.start
            ex.token_gaps = []
        elif ex.token_gaps is not None:
            ex.token_gaps.append(now - self._last_chunk_at)
        self._last_chunk_at = now

    def _flush_events(self) -> None:
        """Mode 3: write whole SSE events as our own chunks, minus the usage-only event."""
        sink = self._resp_sink
        ex = self._ex
        if not sink or ex is None or self.transport is None:
            return
        data = self._sse_pending + b"".join(sink)
        sink.clear()
        end = data.rfind(b"\n\n")
        if end < 0:
            self._sse_pending = data
            return
        events, self._sse_pending = data[:end + 2], data[end + 2:]
        events = cut_usage_event(events, ex)
        self._stream_tick(ex)
        if events:
            chunk = b"%x\r\n%b\r\n" % (len(events), events)
            ex.body_out += len(chunk)
            self.transport.write(chunk)

    def _upstream_complete(self, upstream: UpstreamConnection) -> None:
        """vLLM's answer ended: send a buffered error body, then ready the connection."""
        ex = self._ex
        assert ex is not None and self.transport is not None
        mode = self._resp_mode
        if mode == 1:
            if self._count_usage:
                read_usage(self._tail_prev + self._tail, ex)
        elif mode == 3:
            self._flush_events()
            self.transport.write(b"0\r\n\r\n")
        elif mode == 2:
            body = b"".join(self._resp_sink or ())
            if ex.status >= 400:
                response = errors.normalise_upstream_error(ex.status, body, ex.request_id,
                                                           self._keep_alive)
                if ex.status == 401:
                    ex.upstream_error = "bad_response"
            else:
                response = errors.response_bytes(
                    ex.status, models_with_alias(body, self._state.model_alias),
                    keep_alive=self._keep_alive, extra_headers=(("X-Request-Id", ex.request_id),))
            ex.body_out = len(response)
            self.transport.write(response)
        if self._count_usage and not ex.model:
            ex.model = self._request_model or self._server.served_model()
        upstream.idle_since = self._loop.time()
        if not self._keep_alive:
            assert self.transport is not None
            self.closing = True
            self.transport.close()
        self._finish_exchange()
        if not upstream.keep_alive:
            self._drop_upstream()

    def upstream_lost(self, upstream: UpstreamConnection, exc: Exception | None) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        if self._resp_done or self._ex is None:
            return
        ex = self._ex
        if self._resp_mode == 0 and self._retry_copy is not None and self._request_done:
            # vLLM closed the connection without a byte of answer: a pooled socket it had just
            # timed out, or an engine that died. We still hold the whole request (references,
            # not copies), so it goes once more on a new connection: a live vLLM answers it; a
            # dead one refuses the connection, and the client gets 503 + Retry-After instead
            # of a 502 while the launcher restarts it.
            data = b"".join(self._retry_copy)
            self._retry_copy = None
            self._pending = [data[len(self._upstream_head):]]
            self._pending_size = 0
            self._waiting_upstream = True
            self._connect_task = self._loop.create_task(self._connect())
            return
        if self._resp_mode == 0:
            # Twice without a byte of answer: the engine is going down or restarting (a dying
            # vLLM's listening socket still accepts for a moment). "Retry shortly" is what the
            # client should hear; the launcher's log says why.
            # Same state, same answer as a refused connection: one message for clients.
            self._upstream_unavailable(
                "reset", "vLLM closed the connection without answering (restarting or "
                "crashed; see the launcher's log)", 5)
            return
        # Mid-stream: vLLM died. End the client's stream cleanly at a chunk boundary with an
        # SSE error event (vLLM's own way of reporting errors after a 200), or cut it.
        ex.upstream_error = "reset"
        transport = self.transport
        if (transport is not None and not self.closing and ex.streamed and self._resp_chunked
                and (self._resp_mode == 3 or not self._resp_in_chunk)):
            event = (b'data: {"error":{"message":"the model server stopped in the middle of this '
                     b'answer","type":"server_error","param":null,"code":502}}\n\n'
                     b"data: [DONE]\n\n")
            transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
        self._cut_client()

    def _bad_upstream_response(self, message: str) -> None:
        ex = self._ex
        self._drop_upstream()
        if ex is None:
            return
        ex.upstream_error = "bad_response"
        if self._resp_mode == 0:
            self._fail_local(_error(502, message, "bad_gateway", type_="server_error"))
        else:
            self._cut_client()

    def _cut_client(self) -> None:
        """The answer has begun and cannot be finished: close the client's connection (the
        client sees a truncated body, never a second status line)."""
        self._resp_done = True
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        self._finish_exchange()

    def _upstream_unavailable(self, kind: str, reason: str, retry_after: int) -> None:
        ex = self._ex
        if ex is None or self.closing:
            return
        ex.upstream_error = kind
        retry_after = max(1, min(30, retry_after))
        if kind == "timeout":
            response = _error(504, reason, "upstream_timeout", type_="server_error")
        else:
            response = _error(
                503, f"the model server is not ready: {reason}; retry in {retry_after} s",
                "model_not_ready", type_="server_error",
                extra=(("Retry-After", str(retry_after)),))
        self._fail_local(response)

    # ======================================================================================
    # timers and bookkeeping
    # ======================================================================================
    @property
    def busy(self) -> bool:
        """An exchange is running on this connection (what a drain waits for)."""
        return self._phase != PHASE_IDLE and not self.closing

    def check_timeouts(self, now: float) -> None:
        """Called by the server's once-a-tick sweep: per-request work is only setting _phase,
        never creating or cancelling timers."""
        phase = self._phase
        settings = self._state.settings
        if phase == PHASE_HEAD:
            ex = self._ex
            if ex is not None and now - ex.start >= settings.server.header_timeout:
                ex.status = 408
                self._fail_local(REQUEST_TIMEOUT)
            return
        idle = now - self._last_activity
        if phase == PHASE_IDLE:
            limit = (settings.server.keepalive_timeout if self._served
                     else settings.server.header_timeout)
            if idle >= limit:
                self._fail_local(b"")
        elif phase == PHASE_BODY:
            if idle >= settings.server.header_timeout:
                self._fail_local(REQUEST_TIMEOUT)
        elif phase == PHASE_UPSTREAM and idle >= settings.upstream.read_timeout:
            self._upstream_read_timeout()

    def _upstream_read_timeout(self) -> None:
        ex = self._ex
        assert ex is not None
        ex.upstream_error = "timeout"
        self._drop_upstream()
        if self._resp_mode == 0:
            self._fail_local(_error(
                504, f"vLLM sent nothing for {self._state.settings.upstream.read_timeout:g} s "
                "([upstream] read_timeout)", "upstream_timeout", type_="server_error"))
        else:
            self._cut_client()

    def _finish_exchange(self) -> None:
        ex = self._ex
        if ex is None:
            return
        ex.end = self._loop.time()
        self._server.observer_finished(ex)
        if self.closing:
            self._ex = None
            return
        self._reset_request()
        self._served += 1
        self._last_activity = self._loop.time()


def _refused_reason(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "vLLM is not accepting connections yet (the model is loading or not started)"
    return f"cannot reach vLLM ({error.strerror or error})"
