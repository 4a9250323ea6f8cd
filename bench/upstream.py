"""The stand-in vLLM for the benchmark: proxy.simulator's app (vLLM wire format, backlog 2048),
run in N processes that share one port by SO_REUSEPORT, each writing the monotonic time of
every aborted generation to a file so the harness can tell when "vLLM" saw a client's close.

`python -m bench.upstream --port P --workers N --aborts FILE` (CLOCK_MONOTONIC is system-wide,
so the harness compares these times with its own).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from proxy.simulator import SimulatorConfig, start_simulator


async def _serve(port: int, aborts: Path) -> None:
    config = SimulatorConfig(model="sim-model", ttft=0.0, token_interval=0.0)
    running = await start_simulator(config, "127.0.0.1", port, reuse_port=True)
    stats, finished = running.stats, running.stats._finished
    log = aborts.open("a", buffering=1)

    def record(tokens: int, reason: str) -> None:
        if reason == "abort":
            log.write(f"{time.monotonic():.6f} {os.getpid()}\n")
        finished(tokens, reason)

    stats._finished = record  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.close()
    log.close()


def _child(port: int, aborts: Path) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(port, aborts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--aborts", type=Path, required=True)
    args = parser.parse_args()
    reserve = socket.socket()
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserve.bind(("127.0.0.1", args.port))
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            reserve.close()
            code = 0
            try:
                _child(args.port, args.aborts)
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    reserve.close()

    def stop(signum: int, frame: object) -> None:
        for child in pids:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in pids:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
