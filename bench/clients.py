"""Load generators: wrk (saturation), h2load --h1 (connection bursts), and asyncio clients on
aiohttp for what the others cannot do: an open-loop fixed rate with latency from the scheduled
send time, per-chunk arrival times of a stream, a client that hangs up mid-stream, and a big
prompt."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import uvloop

from bench import procs
from bench.contenders import Contender, Knobs
from bench.util import WORK

T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=120)


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(wrapped())


def _session(ssl_context: ssl.SSLContext | None, limit: int = 100) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, ssl=ssl_context if ssl_context else False,
                                     force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=TIMEOUT, auto_decompress=False)


# ---- wrk --------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(contender: Contender, knobs: Knobs, tokens: int, connections: int,
        duration: float) -> WrkResult:
    body = contender.body(knobs, tokens).decode()
    lines = ['wrk.method = "POST"', f"wrk.body = [[{body}]]"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in contender.headers(knobs).items()]
    script = WORK / f"wrk-{contender.name}.lua"
    script.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    done = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s", "-s",
         str(script), contender.url + "/v1/chat/completions"],
        capture_output=True, text=True, timeout=duration + 60, check=False)
    out = done.stdout
    found = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not found:
        raise RuntimeError(f"wrk: {out[-300:]} {done.stderr[-300:]}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0}[found.group(3)]
    seconds = float(found.group(2)) * scale or (time.monotonic() - started)
    errors = 0
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(non2xx.group(1))
    if socket := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(int(found.group(1)), seconds, errors)


# ---- h2load -----------------------------------------------------------------------------------

@dataclass
class BurstResult:
    ok: int
    errors: int
    seconds: float
    detail: str


def h2load_burst(contender: Contender, knobs: Knobs, tokens: int, clients: int) -> BurstResult:
    """`clients` connections opened at once, one streamed request on each (HTTP/1.1)."""
    body = WORK / f"burst-{contender.name}.json"
    body.write_bytes(contender.body(knobs, tokens, stream=True))
    argv = ["h2load", "--h1", "-n", str(clients), "-c", str(clients), "-t", "1", "-d", str(body),
            "-T", "60", "-N", "60"]
    for key, value in contender.headers(knobs).items():
        argv += ["-H", f"{key.lower()}: {value}"]
    started = time.monotonic()
    done = subprocess.run([*argv, contender.url + "/v1/chat/completions"], capture_output=True,
                          text=True, timeout=300, check=False)
    seconds = time.monotonic() - started
    out = done.stdout
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    summary = re.search(r"requests: .*", out)
    if not codes:
        return BurstResult(0, clients, seconds, (out + done.stderr)[-200:])
    ok = int(codes.group(1))
    return BurstResult(ok, clients - ok, seconds, summary.group(0) if summary else "")


# ---- asyncio clients --------------------------------------------------------------------------

@dataclass
class OpenLoopResult:
    latencies: list[float] = field(default_factory=list)  # s, from the scheduled send time
    errors: int = 0


async def open_loop(contender: Contender, ssl_context: ssl.SSLContext | None, rate: float,
                    duration: float, knobs: Knobs, tokens: int = 1) -> OpenLoopResult:
    """Sends at fixed times i/rate whatever the answers do; latency counts from the schedule,
    so a slow answer delays nobody's measurement (no coordinated omission)."""
    url = contender.url + "/v1/chat/completions"
    headers, body = contender.headers(knobs), contender.body(knobs, tokens)
    result = OpenLoopResult()
    async with _session(ssl_context) as session:
        for _ in range(3):  # warm connections
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

        async def one(scheduled: float) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        result.errors += 1
                        return
                result.latencies.append(time.monotonic() - scheduled)
            except (TimeoutError, aiohttp.ClientError, OSError):
                result.errors += 1

        start = time.monotonic() + 0.05
        tasks = []
        for i in range(int(rate * duration)):
            scheduled = start + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return result


def _carries_token(line: bytes) -> bool:
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return False  # [DONE]
    return bool((choices[0].get("delta") or {}).get("content"))


async def stream_arrivals(contender: Contender, ssl_context: ssl.SSLContext | None,
                          knobs: Knobs, tokens: int) -> list[float]:
    """On a warm connection: the arrival time (s after sending) of each `data:` event that
    carries a token (the role-only first chunk and [DONE] excluded)."""
    url = contender.url + "/v1/chat/completions"
    warm = Knobs()
    async with _session(ssl_context, limit=1) as session:
        async with session.post(url, data=contender.body(warm, 1),
                                headers=contender.headers(warm)) as response:
            await response.read()
        times: list[float] = []
        sent = time.monotonic()
        async with session.post(url, data=contender.body(knobs, tokens, stream=True),
                                headers=contender.headers(knobs)) as response:
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            async for line in response.content:
                if line.startswith(b"data: ") and _carries_token(line):
                    times.append(time.monotonic() - sent)
        return times


async def many_streams(contender: Contender, ssl_context: ssl.SSLContext | None, knobs: Knobs,
                       tokens: int, concurrency: int) -> tuple[int, int]:
    """`concurrency` streams at once on warm connections; returns (data events, errors)."""
    url = contender.url + "/v1/chat/completions"
    headers, body = contender.headers(knobs), contender.body(knobs, tokens, stream=True)
    events = errors = 0
    async with _session(ssl_context, limit=concurrency) as session:

        async def one() -> None:
            nonlocal events, errors
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if response.status != 200:
                        errors += 1
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            events += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                errors += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return events, errors


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def hang_up(contender: Contender, ssl_context: ssl.SSLContext | None, aborts: Path,
                  knobs: Knobs, wait: float) -> float | None:
    """Reads three chunks of a long stream, closes the connection, and returns the seconds
    until the stand-in recorded the abort (None: not within `wait`)."""
    url = contender.url + "/v1/chat/completions"
    seen = len(_lines(aborts))
    async with _session(ssl_context, limit=1) as session:
        response = await session.post(url, data=contender.body(knobs, 2000, stream=True),
                                      headers=contender.headers(knobs))
        got = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                got += 1
                if got >= 3:
                    break
        closed = time.monotonic()
        response.close()  # drops the connection (it is not returned to the pool)
    deadline = closed + wait
    while time.monotonic() < deadline:
        lines = _lines(aborts)
        if len(lines) > seen:
            return max(0.0, float(lines[seen].split()[0]) - closed)
        await asyncio.sleep(0.002)
    return None


@dataclass
class BigResult:
    status: int
    seconds: float
    rss_peak_growth: int


async def big_prompt(contender: Contender, ssl_context: ssl.SSLContext | None,
                     size: int) -> BigResult:
    """One non-streamed request whose prompt is `size` bytes (a single word, so the stand-in's
    context-length check passes), on a warm connection, sampling the proxy's RSS meanwhile."""
    url = contender.url + "/v1/chat/completions"
    knobs = Knobs()
    body = contender.body(knobs, 1, content="x" * size)
    pids = contender.pids()
    base = procs.rss_bytes(pids)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, procs.rss_bytes(pids))
            time.sleep(0.002)

    async with _session(ssl_context, limit=1) as session:
        async with session.post(url, data=contender.body(knobs, 1),
                                headers=contender.headers(knobs)) as response:
            await response.read()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        async with session.post(url, data=body, headers=contender.headers(knobs)) as response:
            await response.read()
            status = response.status
        seconds = time.monotonic() - started
        time.sleep(0.05)  # noqa: ASYNC251 - the sampler thread catches the tail
        stop.set()
        sampler.join()
    return BigResult(status, seconds, max(0, peak - base))
