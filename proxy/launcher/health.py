"""One probe of vLLM's `/health`, the launcher's only test of readiness.

A raw HTTP/1.1 request on a fresh loopback connection: there is nothing to pool (one probe every
few seconds), and no client session whose lifetime would have to be managed. vLLM answers 200
with an empty body once the engine is up; while the model loads nothing listens at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


async def probe_health(port: int, limit: float, host: str = "127.0.0.1") -> float | None:
    """Seconds the 200 answer took, or None: refused, timed out, or another status."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Connection: close\r\n\r\n".encode("ascii"))
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
    parts = status_line.split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200":
        return time.monotonic() - started
    return None
