"""Life cycle under systemd: `airgate serve` as a real process with a stand-in notify socket.

What systemd sees: READY=1 once listening; RELOADING=1 + MONOTONIC_USEC, then READY=1 around a
SIGHUP; STOPPING=1 on SIGTERM; WATCHDOG=1 when WATCHDOG_USEC asks for it; listeners taken from
LISTEN_FDS. And what clients see: a drain lets running streams finish and refuses new
connections, its timeout cuts and counts; a reload swaps tokens and certificates without
dropping an open connection, and a broken file keeps the old state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from conftest import (
    KIBANA_TEST_BODY,
    TLSFiles,
    Tokens,
    children_of,
    sse_events,
    write_config,
)
from proxy.server import serve
from proxy.settings import load_settings
from proxy.simulator import RunningSimulator
from proxy.tokens import append_token

AIRGATE = Path(sys.executable).with_name("airgate")
def airgate_argv(*args: str) -> list[str]:
    # The installed entry point, exactly what the units run (uvloop included).
    return [str(AIRGATE), *args]
CHAT = "/v1/chat/completions"
STARTUP = 20.0  # seconds for a cold interpreter to import and listen


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET: a unix datagram socket in the abstract
    namespace (no path-length or cleanup trouble), read from the test's event loop."""

    def __init__(self) -> None:
        self.name = f"@airgate-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def next(self, limit: float = 5.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), limit)
        message = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
        self.messages.append(message)
        return message

    async def wait_for(self, key: str, limit: float = 5.0) -> dict[str, str]:
        """The next message carrying `key` (other messages, e.g. WATCHDOG=1, are kept)."""
        deadline = time.monotonic() + limit
        while True:
            message = await self.next(max(0.01, deadline - time.monotonic()))
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


@dataclass
class Airgate:
    """An `airgate serve` child process and what it said."""

    process: asyncio.subprocess.Process
    notify: NotifySocket
    config: Path
    lines: list[str] = field(default_factory=list)
    port: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()
        self._changed.set()

    async def wait_line(self, pattern: str, limit: float = 5.0) -> re.Match[str]:
        """The first stderr line matching `pattern`, waiting for it if needed."""
        async def search() -> re.Match[str]:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    found = re.search(pattern, line)
                    if found:
                        return found
                seen = len(self.lines)
                if self.process.returncode is not None and self._reader is not None \
                        and self._reader.done():
                    raise AssertionError(f"exited before {pattern!r}:\n" + self.log)
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(search(), limit)
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r}:\n{self.log}") from None

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, limit: float = 10.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), limit)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, limit)
        return code


def child_env(notify: NotifySocket, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_", "AIRGATE_"))}
    env.update(NOTIFY_SOCKET=notify.name, PYTHONUNBUFFERED="1", **extra)
    return env


StartAirgate = Callable[..., Awaitable[Airgate]]


@pytest.fixture
async def start_airgate(
    tmp_path: Path, tls: TLSFiles, tokens: Tokens, simulator: RunningSimulator
) -> AsyncIterator[StartAirgate]:
    """Start `airgate serve --config F` (F written from `sections`), wait until it listens."""
    started: list[Airgate] = []

    async def start(*, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
                    argv: list[str] | None = None, wait_ready: bool = True,
                    **sections: dict[str, Any]) -> Airgate:
        config: dict[str, dict[str, Any]] = {
            "listen": {"https": "127.0.0.1:0", "http": "", "server_name": "localhost",
                       "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
            "auth": {"tokens_file": str(tokens.path)},
            "upstream": {"url": simulator.url, "health_interval": 0.5},
            "metrics": {"listen": ""},
            "log": {"access": "off"},
        }
        for section, values in sections.items():
            config.setdefault(section, {}).update(values)
        path = write_config(tmp_path / f"airgate-{len(started)}.toml", config)
        notify = NotifySocket()
        command = [arg.replace("{config}", str(path)) for arg in
                   argv or airgate_argv("serve", "--config", "{config}")]
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env or child_env(notify), pass_fds=pass_fds)
        gate = Airgate(process, notify, path)
        gate._reader = asyncio.ensure_future(gate._read())
        started.append(gate)
        if wait_ready:
            found = await gate.wait_line(r"listening on https://[^:]+:(\d+)", STARTUP)
            gate.port = int(found.group(1))
        return gate

    yield start
    for gate in started:
        if gate.process.returncode is None:
            gate.process.kill()
            await gate.process.wait()
        if gate._reader is not None:
            gate._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gate._reader
        gate.notify.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def server_certificate(port: int, context: ssl.SSLContext) -> bytes:
    """The DER certificate a new handshake presents."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                              server_hostname="localhost")
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    assert der is not None
    return bytes(der)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_real_command_with_uvloop_serves(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    # Exactly what the systemd unit runs: the installed entry point on uvloop. (The in-process
    # tests once ran only on asyncio's loop, and every TLS connection failed under uvloop.)
    gate = await start_airgate(argv=[str(AIRGATE), "serve", "--config", "{config}"])
    async with client.get(f"https://127.0.0.1:{gate.port}/v1/models",
                          headers=auth(tokens.kibana)) as resp:
        assert resp.status == 200
        await resp.read()
    async with client.post(f"https://127.0.0.1:{gate.port}{CHAT}", headers=auth(tokens.kibana),
                           json={**KIBANA_TEST_BODY, "stream": True}) as resp:
        assert sse_events(await resp.read())[-1] == "[DONE]"
    assert "Traceback" not in gate.log


# ---- sd_notify ------------------------------------------------------------------------------

async def test_ready_reloading_ready_stopping_in_order(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    gate = await start_airgate()
    ready = await gate.notify.wait_for("READY")
    assert ready["READY"] == "1" and ready.get("STATUS")
    # READY=1 means listening: a request right after it is served.
    async with client.get(f"https://127.0.0.1:{gate.port}/v1/models",
                          headers=auth(tokens.kibana)) as resp:
        assert resp.status == 200

    before = monotonic_usec()
    gate.signal(signal.SIGHUP)
    reloading = await gate.notify.wait_for("RELOADING")
    assert reloading["RELOADING"] == "1"
    # systemd orders RELOADING against its own clock: CLOCK_MONOTONIC, in microseconds.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    again = await gate.notify.wait_for("READY")
    assert again["READY"] == "1"
    await gate.wait_line("reloaded: 2 token")

    gate.signal(signal.SIGTERM)
    stopping = await gate.notify.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert await gate.exit_code() == 0
    order = [key for message in gate.notify.messages for key in message
             if key in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"]


async def test_watchdog_pings_when_asked(start_airgate: StartAirgate) -> None:
    notify = NotifySocket()
    # 0.4 s period: airgate pings every 0.2 s (half the period, as sd_watchdog_enabled advises).
    gate = await start_airgate(env=child_env(notify, WATCHDOG_USEC="400000"))
    gate.notify.close()
    gate.notify = notify
    await notify.wait_for("READY")
    start = time.monotonic()
    for _ in range(3):
        assert (await notify.wait_for("WATCHDOG", limit=1.0))["WATCHDOG"] == "1"
    assert time.monotonic() - start < 1.5


async def test_watchdog_pings_with_workers(start_airgate: StartAirgate) -> None:
    notify = NotifySocket()
    gate = await start_airgate(env=child_env(notify, WATCHDOG_USEC="400000"),
                               server={"workers": 2})
    gate.notify.close()
    gate.notify = notify
    await notify.wait_for("READY", limit=STARTUP)
    assert (await notify.wait_for("WATCHDOG", limit=1.0))["WATCHDOG"] == "1"


async def test_workers_exit_when_their_parent_is_killed(start_airgate: StartAirgate) -> None:
    # SIGKILL (the OOM killer, a hard stop) cannot be forwarded: the workers must not go on
    # serving unsupervised and holding the port.
    notify = NotifySocket()
    gate = await start_airgate(env=child_env(notify), server={"workers": 2})
    gate.notify.close()
    gate.notify = notify
    await notify.wait_for("READY", limit=STARTUP)  # sent once every worker listens
    workers = children_of(gate.process.pid)
    assert len(workers) == 2
    gate.process.kill()
    await gate.process.wait()
    deadline = time.monotonic() + 10
    while _running(workers):
        assert time.monotonic() < deadline, "workers outlived their killed parent"
        await asyncio.sleep(0.05)


def _running(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (a zombie waiting for init to reap it does not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


async def test_no_watchdog_pings_for_another_pid(start_airgate: StartAirgate) -> None:
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables
    # must not ping for it.
    notify = NotifySocket()
    gate = await start_airgate(env=child_env(notify, WATCHDOG_USEC="200000", WATCHDOG_PID="1"))
    gate.notify.close()
    gate.notify = notify
    await notify.wait_for("READY")
    with pytest.raises(TimeoutError):
        await notify.wait_for("WATCHDOG", limit=0.5)


async def test_ready_status_for_run_says_the_model_is_loading(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `airgate run` is `serve` with the launcher's status: the READY=1 STATUS= line (what
    # `systemctl status` shows) must tell the operator the model is still loading.
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.name)

    @dataclass(frozen=True)
    class Loading:
        state: str = "loading"
        message: str = "loading the model: 40% of weights"
        retry_after: int = 10

    stop = asyncio.Event()
    serving = asyncio.ensure_future(serve(make_settings(), shutdown_trigger=stop,
                                          model_status=Loading))
    try:
        ready = await notify.wait_for("READY")
    finally:
        stop.set()
        await serving
        notify.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            asyncio.get_running_loop().remove_signal_handler(signum)
    assert "loading" in ready["STATUS"]


# ---- socket activation ----------------------------------------------------------------------

def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_socket_activation_uses_passed_listeners_in_order(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    https, http = listening_socket(), listening_socket()
    try:
        notify = NotifySocket()
        fds = (https.fileno(), http.fileno())
        assert min(fds) > 4  # else the dup2 calls below would clobber one another
        # systemd's contract: fds 3, 4, ... in the unit's order, LISTEN_PID = the service's pid.
        # exec keeps the wrapper's pid, so its own pid is airgate's. (dash cannot redirect
        # fds above 9, hence Python rather than `sh -c 'LISTEN_PID=$$ exec ...'`.)
        wrapper = (f"import os, sys; os.dup2({fds[0]}, 3); os.dup2({fds[1]}, 4); "
                   f"os.close({fds[0]}); os.close({fds[1]}); "
                   "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2'); "
                   "os.execv(sys.argv[1], sys.argv[1:])")
        gate_config: dict[str, Any] = {"listen": {"https": "127.0.0.1:1", "http": "127.0.0.1:2"}}
        # Addresses 1 and 2 would fail to bind (and need root): being served proves the passed
        # sockets were used.
        gate = await start_airgate(env=child_env(notify), pass_fds=fds, wait_ready=False,
                                   argv=[sys.executable, "-c", wrapper,
                                         *airgate_argv("serve", "--config", "{config}")],
                                   **gate_config)
        try:
            await notify.wait_for("READY", limit=STARTUP)
        except TimeoutError:
            raise AssertionError(gate.log) from None
        https_port, http_port = https.getsockname()[1], http.getsockname()[1]
        async with client.get(f"https://127.0.0.1:{https_port}/v1/models",
                              headers=auth(tokens.kibana)) as resp:
            assert resp.status == 200
        async with aiohttp.ClientSession() as plain, plain.get(
                f"http://127.0.0.1:{http_port}/v1/models", allow_redirects=False) as resp:
            assert resp.status == 301
        gate.signal(signal.SIGTERM)
        assert await gate.exit_code() == 0
        notify.close()
    finally:
        https.close()
        http.close()


# ---- SIGTERM: drain -------------------------------------------------------------------------

async def open_stream(client: aiohttp.ClientSession, port: int, token: str,
                      tokens_: int, interval: float) -> aiohttp.ClientResponse:
    headers = {**auth(token), "x-sim-tokens": str(tokens_), "x-sim-interval": str(interval)}
    resp = await client.post(f"https://127.0.0.1:{port}{CHAT}", headers=headers,
                             json={**KIBANA_TEST_BODY, "stream": True})
    assert resp.status == 200
    await resp.content.readline()  # the stream is running
    return resp


async def refused(port: int, within: float = 2.0) -> bool:
    """True once a new TCP connection to `port` is refused (closing a listener is not
    synchronous with the STOPPING=1 that announces it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await asyncio.sleep(0.02)
    return False


async def test_sigterm_drain_lets_running_stream_finish_and_refuses_new(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    gate = await start_airgate(server={"drain_timeout": 10})
    await gate.notify.wait_for("READY")
    resp = await open_stream(client, gate.port, tokens.kibana, 12, 0.1)
    gate.signal(signal.SIGTERM)
    await gate.notify.wait_for("STOPPING")
    assert await refused(gate.port)
    events = sse_events(await resp.read())  # the stream that outlived the signal completes
    assert events[-1] == "[DONE]"
    # the role chunk was read above; the 12 tokens follow
    assert len([e for e in events[:-1] if json.loads(e)["choices"]]) == 12
    assert await gate.exit_code() == 0
    assert "cut" not in gate.log


async def test_drain_timeout_cuts_and_counts(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession,
    simulator: RunningSimulator,
) -> None:
    gate = await start_airgate(server={"drain_timeout": 0.5})
    await gate.notify.wait_for("READY")
    resp = await open_stream(client, gate.port, tokens.kibana, 200, 0.05)
    gate.signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await gate.exit_code() == 0
    assert 0.4 < time.monotonic() - signalled < 5
    await gate.wait_line(r"drain timeout: cut 1 running request")
    raw = b""
    with contextlib.suppress(aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        raw = await resp.read()
    assert b"[DONE]" not in raw
    # The cut reaches vLLM as a closed connection: it aborts the generation.
    await simulator.stats.wait_aborted(1)


async def test_sigint_drains_like_sigterm(start_airgate: StartAirgate) -> None:
    gate = await start_airgate()
    await gate.notify.wait_for("READY")
    gate.signal(signal.SIGINT)
    await gate.notify.wait_for("STOPPING")
    assert await gate.exit_code() == 0


async def test_sigusr1_does_not_kill_the_proxy(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    # logrotate's postrotate sends SIGUSR1 (Nginx's "reopen logs"); DESIGN.md promises the same.
    # Without a handler, SIGUSR1 terminates the process.
    gate = await start_airgate()
    await gate.notify.wait_for("READY")
    gate.signal(signal.SIGUSR1)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gate.process.wait(), 0.5)
    assert gate.process.returncode is None, f"died with {gate.process.returncode}"
    async with client.get(f"https://127.0.0.1:{gate.port}/v1/models",
                          headers=auth(tokens.kibana)) as resp:
        assert resp.status == 200


# ---- SIGHUP: reload -------------------------------------------------------------------------

async def reload(gate: Airgate) -> None:
    gate.signal(signal.SIGHUP)
    await gate.notify.wait_for("RELOADING")
    await gate.notify.wait_for("READY")


async def test_reload_swaps_tokens(
    start_airgate: StartAirgate, tokens: Tokens, client: aiohttp.ClientSession
) -> None:
    gate = await start_airgate()
    await gate.notify.wait_for("READY")
    url = f"https://127.0.0.1:{gate.port}/v1/models"
    # Rotate: a new token for kibana, the old one removed; written whole, then renamed, as an
    # editor or `install` does.
    staging = tokens.path.with_suffix(".new")
    new_kibana = append_token(staging, "kibana")
    ops_line = next(line for line in tokens.path.read_text().splitlines()
                    if line.startswith("ops "))
    staging.write_text(staging.read_text() + ops_line + "\n")
    staging.replace(tokens.path)
    async with client.get(url, headers=auth(new_kibana)) as resp:
        assert resp.status == 401  # not before the reload
    await reload(gate)
    for token, status in ((new_kibana, 200), (tokens.kibana, 401), (tokens.ops, 200)):
        async with client.get(url, headers=auth(token)) as resp:
            assert resp.status == status, token
    assert new_kibana not in gate.log and tokens.kibana not in gate.log


@pytest.fixture
def renewed(tmp_path: Path) -> tuple[trustme.CA, Path]:
    """A certificate from another CA, so which one a handshake presents is unambiguous."""
    ca = trustme.CA()
    path = tmp_path / "renewed.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(path))
    return ca, path


async def test_reload_serves_renewed_certificate_and_keeps_open_connection(
    start_airgate: StartAirgate, tls: TLSFiles, tokens: Tokens, tmp_path: Path,
    renewed: tuple[trustme.CA, Path],
) -> None:
    cert = tmp_path / "live.pem"
    cert.write_bytes(tls.cert_pem.read_bytes())
    gate = await start_airgate(listen={"cert": str(cert), "key": str(cert)})
    await gate.notify.wait_for("READY")
    old = await server_certificate(gate.port, tls.client_context)

    # A keep-alive connection opened before the renewal...
    connector = aiohttp.TCPConnector(ssl=tls.client_context, limit=1)
    async with aiohttp.ClientSession(connector=connector) as before:
        url = f"https://127.0.0.1:{gate.port}/v1/models"
        async with before.get(url, headers=auth(tokens.kibana)) as resp:
            assert resp.status == 200
            await resp.read()
        new_ca, renewed_pem = renewed
        cert.write_bytes(renewed_pem.read_bytes())
        await reload(gate)
        # ...goes on, on the same connection (limit=1 and no new handshake needed).
        async with before.get(url, headers=auth(tokens.kibana)) as resp:
            assert resp.status == 200
        assert connector._acquired == set() and len(connector._conns) == 1  # one pooled conn

    new_context = ssl.create_default_context()
    new_ca.configure_trust(new_context)
    new = await server_certificate(gate.port, new_context)
    assert new != old
    with pytest.raises(ssl.SSLCertVerificationError):
        await server_certificate(gate.port, tls.client_context)


@pytest.mark.parametrize("broken", ["certificate", "tokens"])
async def test_reload_with_broken_file_keeps_old_state_and_logs_why(
    start_airgate: StartAirgate, tls: TLSFiles, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession, broken: str,
) -> None:
    cert = tmp_path / "live.pem"
    cert.write_bytes(tls.cert_pem.read_bytes())
    gate = await start_airgate(listen={"cert": str(cert), "key": str(cert)})
    await gate.notify.wait_for("READY")
    old = await server_certificate(gate.port, tls.client_context)
    if broken == "certificate":  # e.g. a renewal caught half-written
        cert.write_text(cert.read_text()[:300])
    else:
        tokens.path.write_text("kibana not-a-digest\n")
    await reload(gate)
    await gate.wait_line(r"reload failed, keeping the running configuration: .*"
                         + ("listen.cert" if broken == "certificate" else r"tokens:1"))
    assert await server_certificate(gate.port, tls.client_context) == old
    async with client.get(f"https://127.0.0.1:{gate.port}/v1/models",
                          headers=auth(tokens.kibana)) as resp:
        assert resp.status == 200
    assert gate.process.returncode is None


async def test_failed_reload_shows_in_status(
    start_airgate: StartAirgate, tokens: Tokens
) -> None:
    gate = await start_airgate()
    await gate.notify.wait_for("READY")
    tokens.path.write_text("garbage\n")
    gate.signal(signal.SIGHUP)
    await gate.notify.wait_for("RELOADING")
    ready = await gate.notify.wait_for("READY")
    assert "fail" in ready.get("STATUS", "").lower()


async def test_startup_failure_exits_nonzero_without_ready(
    start_airgate: StartAirgate, tmp_path: Path
) -> None:
    # systemd must see a failed start (Restart=on-failure), not a READY=1.
    missing = str(tmp_path / "missing.pem")
    gate = await start_airgate(wait_ready=False, listen={"cert": missing, "key": missing})
    assert await gate.exit_code() == 1
    assert "listen.cert" in gate.log
    with pytest.raises(TimeoutError):
        await gate.notify.next(limit=0.2)


async def test_config_from_credentials_directory(
    start_airgate: StartAirgate, tls: TLSFiles, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    # LoadCredential=vllm-api-key:... + api_key_file = "credential:vllm-api-key"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tokens").write_text(tokens.path.read_text())
    notify = NotifySocket()
    gate = await start_airgate(
        env=child_env(notify, CREDENTIALS_DIRECTORY=str(credentials)),
        auth={"tokens_file": "credential:tokens"})
    gate.notify.close()
    gate.notify = notify
    async with client.get(f"https://127.0.0.1:{gate.port}/v1/models",
                          headers=auth(tokens.kibana)) as resp:
        assert resp.status == 200
    # Without the directory the error names the fix.
    with pytest.raises(Exception, match="LoadCredential=tokens"):
        load_settings(gate.config)
