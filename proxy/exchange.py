"""One request/response exchange as the forwarding core saw it.

The core fills one of these per request (a slotted object, no dicts) and hands it to the
observers (metrics, access log) once, when the exchange ends. Nothing here holds a token,
a key or a body.
"""

from __future__ import annotations

from typing import Protocol

# Where a client hang-up happened, for the abort metric.
PHASE_REQUEST = "request"          # while sending its request (headers or body)
PHASE_WAITING = "waiting"          # request sent, no byte of the answer yet
PHASE_STREAMING = "streaming"      # part of the answer already delivered


class Exchange:
    __slots__ = (
        "aborted",
        "body_in",
        "body_out",
        "client_addr",
        "completion_tokens",
        "end",
        "finish_reason",
        "holds_limit",
        "method",
        "model",
        "path",
        "prompt_tokens",
        "referer",
        "request_id",
        "route",
        "start",
        "start_wall",
        "status",
        "streamed",
        "token_gaps",
        "token_name",
        "ttfb",
        "ttft",
        "upstream_error",
        "user_agent",
        "version",
    )

    def __init__(self, start: float, start_wall: float, client_addr: str) -> None:
        self.start = start                  # loop.time() when the request began
        self.start_wall = start_wall        # time.time(), for log timestamps
        self.end = start
        self.client_addr = client_addr
        self.method = ""
        self.path = ""                      # path only: a query string may carry a secret
        self.version = "1.1"
        self.route = ""                     # allowlist route, "" for local answers
        self.token_name = ""                # NAME from the tokens file, "" if none matched
        self.status = 0
        self.body_in = 0
        self.body_out = 0
        self.ttfb: float | None = None      # seconds to the first byte from vLLM
        self.ttft: float | None = None      # seconds to the first token (streams)
        self.token_gaps: list[float] | None = None
        self.aborted = ""                   # phase of a client hang-up, "" if none
        self.upstream_error = ""            # refused | timeout | reset | bad_response
        self.request_id = ""
        self.user_agent = ""
        self.referer = ""
        self.streamed = False
        self.model = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason = ""
        self.holds_limit = False            # counted in the per-token concurrency limit

    @property
    def duration(self) -> float:
        return self.end - self.start


class ExchangeObserver(Protocol):
    def exchange_started(self, exchange: Exchange) -> None: ...
    def exchange_finished(self, exchange: Exchange) -> None: ...
    def auth_failed(self, reason: str) -> None: ...


class NullObserver:
    def exchange_started(self, exchange: Exchange) -> None:
        pass

    def exchange_finished(self, exchange: Exchange) -> None:
        pass

    def auth_failed(self, reason: str) -> None:
        pass
