"""One keep-alive HTTP/1.1 connection to vLLM, owned by one client connection at a time.

Its parser callbacks hand what they find to the owning ClientConnection (proxy/forward.py),
which holds the response state; this side only routes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from proxy.forward import ClientConnection


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to vLLM. It parses responses only to find where each
    ends (and to read the head); the bytes go to the owning client connection untouched."""

    __slots__ = ("_parser", "closed", "idle_since", "keep_alive", "owner", "transport", "used")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.owner: ClientConnection | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.closed = False
        self.keep_alive = True
        self.used = 0

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:  # vLLM spoke while idle: nothing to deliver it to, drop the socket
            self.close()
            return
        owner.upstream_data(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client_reading()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client_reading()

    # -- httptools response callbacks: routed to the owning client connection ----------------
    def on_header(self, name: bytes, value: bytes) -> None:
        owner = self.owner
        if owner is not None:
            if owner._resp_headers is None:
                owner._resp_headers = []
            owner._resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.owner is not None:
            self.owner.upstream_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        # Only answers that are buffered (errors, /v1/models with an alias) or re-framed
        # (streams with airgate's usage chunk to cut) collect the decoded body; the rest pass
        # through as raw bytes in ClientConnection.upstream_data.
        owner = self.owner
        if owner is not None:
            sink = owner._resp_sink
            if sink is not None:
                sink.append(body)

    def on_message_complete(self) -> None:
        if self.owner is not None:
            self.owner._resp_done = True

    def on_chunk_header(self) -> None:
        if self.owner is not None:
            self.owner._resp_in_chunk = True

    def on_chunk_complete(self) -> None:
        if self.owner is not None:
            self.owner._resp_in_chunk = False

    # -- helpers -------------------------------------------------------------------------------
    def reusable(self, now: float, idle_timeout: float) -> bool:
        return not self.closed and now - self.idle_since < idle_timeout

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def discard(self) -> None:
        """Close without handing anything more to the owner (it has given up on us)."""
        self.owner = None
        self.close()
