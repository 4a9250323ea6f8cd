"""The upstream side: keep-alive connections to vLLM and vLLM's readiness.

vLLM (uvicorn) closes an idle keep-alive connection 5 s after its last answer. A pooled socket
older than that may already be half-closed by vLLM, and a POST written into it is lost, so an
idle connection is only reused if its last answer ended less than `pool_idle_timeout` (default
4 s) ago. New connections are capped (`max_connecting`) so a burst of clients cannot overflow
vLLM's accept queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from proxy.settings import UpstreamSettings

if TYPE_CHECKING:
    from proxy.upstream_connection import UpstreamConnection

log = logging.getLogger(__name__)

HEALTH_USER_AGENT = "airgate-health"  # tells vLLM's logs (and the tests) who is asking


class UpstreamPool:
    __slots__ = ("_connecting", "_host", "_idle", "_loop", "_port", "connect_timeout",
                 "idle_timeout", "open_count")

    def __init__(self, settings: UpstreamSettings, loop: asyncio.AbstractEventLoop) -> None:
        self._host, self._port = settings.hostport
        self._loop = loop
        self._idle: deque[UpstreamConnection] = deque()
        self._connecting = asyncio.Semaphore(settings.max_connecting)
        self.idle_timeout = settings.pool_idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.open_count = 0

    def take_idle(self) -> UpstreamConnection | None:
        """A fresh idle connection, most recently used first, or None."""
        idle = self._idle
        now = self._loop.time()
        while idle:
            conn = idle.pop()
            if conn.reusable(now, self.idle_timeout):
                return conn
            conn.close()
        return None

    def give_back(self, conn: UpstreamConnection) -> None:
        if conn.reusable(self._loop.time(), self.idle_timeout):
            conn.owner = None
            self._idle.append(conn)
        else:
            conn.close()

    def prune(self) -> None:
        """Close idle connections past their reuse time and drop the ones vLLM closed, so a
        burst's thousand idle sockets are not kept until the next request happens by."""
        now = self._loop.time()
        if not self._idle:
            return
        keep: deque[UpstreamConnection] = deque()
        for conn in self._idle:
            if conn.reusable(now, self.idle_timeout):
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep

    async def connect(self, factory: Callable[[], UpstreamConnection]) -> UpstreamConnection:
        """Open a new connection; raises OSError (refused, unreachable) or TimeoutError."""
        async with self._connecting:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self._loop.create_connection(factory, self._host, self._port)
        return protocol

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str
    checked_at: float


class HealthChecker:
    """Polls vLLM's /health. vLLM has no HTTP server at all while it loads, so "connection
    refused" means "loading" (or not started), not "broken"."""

    def __init__(self, settings: UpstreamSettings, authorization: str = "") -> None:
        self._url = settings.url + "/health"
        self._models_url = settings.url + "/v1/models"
        self._headers = {"Authorization": authorization} if authorization else {}
        # The model vLLM serves (first of /v1/models), learnt once it is ready: the target of
        # [upstream] model_alias and the model label of usage metrics.
        self.served_model = ""
        self._interval = settings.health_interval
        self._timeout = aiohttp.ClientTimeout(total=settings.connect_timeout)
        self.readiness = Readiness(False, "not checked yet", 0.0)
        self._changed = asyncio.Event()

    async def check_once(self, session: aiohttp.ClientSession) -> Readiness:
        try:
            async with session.get(self._url, timeout=self._timeout) as response:
                if response.status == 200:
                    result = Readiness(True, "ready", time.time())
                else:
                    result = Readiness(False, f"vLLM /health answered {response.status}: the "
                                       "engine is not healthy", time.time())
        except aiohttp.ClientConnectorError:
            result = Readiness(False, "vLLM is not accepting connections (still loading, or "
                               "not started)", time.time())
        except (TimeoutError, aiohttp.ClientError) as error:
            result = Readiness(False, f"vLLM /health failed: {type(error).__name__}", time.time())
        if result.ready and not self.readiness.ready:
            await self._learn_model(session)
        if result.ready != self.readiness.ready:
            log.info("upstream %s", "ready" if result.ready else f"not ready: {result.reason}")
        self.readiness = result
        return result

    async def _learn_model(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(self._models_url, headers=self._headers,
                                   timeout=self._timeout) as response:
                listing = await response.json()
            self.served_model = str(listing["data"][0]["id"])
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, IndexError,
                TypeError) as error:
            log.warning("could not read the served model from vLLM's /v1/models: %r", error)

    async def run(self) -> None:
        # force_close: a health check must not hold one of vLLM's connections between polls
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         headers={"User-Agent": HEALTH_USER_AGENT}) as session:
            while True:
                await self.check_once(session)
                await asyncio.sleep(self._interval)
