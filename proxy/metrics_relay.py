"""vLLM's own metrics, relayed on airgate's endpoint so that one scrape target gives proxy,
launcher and engine.

At scrape time the relay fetches `[upstream] url + /metrics` with a short timeout
(`[metrics] upstream_timeout`). Only vLLM's `vllm:` families are relayed, byte for byte; its
`process_*`/`python_*` families describe vLLM's API server process and would collide with
airgate's own families of the same names (a duplicate family makes Prometheus reject the whole
scrape). A vLLM that does not answer (loading, dead, slow) makes `airgate_upstream_metrics_up`
0 instead of failing the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024   # vLLM's page is ~100 KiB; a runaway answer must not eat memory
_PREFIXES = (b"vllm:", b"# HELP vllm:", b"# TYPE vllm:")


def vllm_families(text: bytes) -> bytes:
    """The lines of Prometheus text `text` that belong to `vllm:` families, unchanged."""
    kept = [line for line in text.split(b"\n") if line.startswith(_PREFIXES)]
    return b"\n".join(kept) + b"\n" if kept else b""


class VllmRelay:
    """Fetches vLLM's metrics; concurrent scrapes share one fetch."""

    def __init__(self, upstream_url: str, timeout: float) -> None:
        self.url = upstream_url.rstrip("/") + "/metrics"
        self.timeout = timeout
        self.text = b""            # vLLM's families from the last fetch that worked
        self.up = False            # whether the last fetch worked
        self.fetched_at = 0.0      # time.monotonic() of the last fetch that worked
        self._session: aiohttp.ClientSession | None = None
        self._fetching: asyncio.Task[bool] | None = None

    async def fetch(self) -> bool:
        """Refresh `text` and `up`; True when vLLM answered."""
        task = self._fetching
        if task is None or task.done():
            task = self._fetching = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(task)  # one scraper giving up must not cancel the others'

    def refresh_soon(self) -> None:
        """Start a fetch without waiting for it (for callers that can't await)."""
        if self._fetching is None or self._fetching.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to refresh with
                self._fetching = asyncio.ensure_future(self._fetch())

    async def _fetch(self) -> bool:
        if self._session is None or self._session.closed:
            # Our own session: a total timeout is what we want here (unlike the proxy's
            # forwarding, nothing here may take long). A new connection per fetch: vLLM closes
            # idle keep-alive connections after 5 s, about a scrape interval, and a GET sent
            # into one it is closing fails; a loopback connect per scrape costs nothing.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.get(self.url, headers={"Accept": "text/plain"}) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status,
                        message=f"HTTP {response.status}")
                body = await response.content.read(MAX_BODY)
        except (TimeoutError, aiohttp.ClientError, OSError) as error:
            if self.up:
                log.info("vLLM's /metrics did not answer (%s): airgate_upstream_metrics_up 0",
                         error or type(error).__name__)
            self.up = False
            self.text = b""
            return False
        self.text = vllm_families(body)
        self.up = True
        self.fetched_at = time.monotonic()
        return True

    async def close(self) -> None:
        task = self._fetching
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
