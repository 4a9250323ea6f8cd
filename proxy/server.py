"""Listeners and life cycle: start → serve → drain → stop, plus reload.

The TLS listener is served by the forwarding core (proxy.forward); aiohttp serves the small
things around it (the port-80 redirect, the metrics listener). Signal handlers only set events;
the work happens in the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from proxy import errors, systemd
from proxy.auth import FailureThrottle, TokenLimits
from proxy.exchange import Exchange, ExchangeObserver, NullObserver
from proxy.forward import PHASE_IDLE, ClientConnection
from proxy.memory import BurstTrimmer, limit_arenas
from proxy.settings import ConfigError, Settings, load_settings, parse_hostport
from proxy.state import ModelStatus, ProxyState, read_secret
from proxy.tls import TLSConfigError, build_server_context
from proxy.tokens import TokenFileError
from proxy.upstream import HealthChecker, UpstreamPool
from proxy.workers import announce_ready, run_workers, unix_metrics_socket, worker_identity

log = logging.getLogger("airgate")

LISTEN_BACKLOG = 2048  # as vLLM's uvicorn: a burst of clients must not overflow the queue
STARTUP_ERRORS = (ConfigError, TLSConfigError, TokenFileError, OSError)


class ProxyServer:
    """The proxy: build with settings, `await start()`, then `await stop()`.

    Tests run it in-process on port 0 and read `https_port`; `airgate serve` wraps it with
    signal handling (see `serve`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        model_status: Callable[[], ModelStatus] | None = None,
        observer: ExchangeObserver | None = None,
        metrics_app: web.Application | None = None,
        metrics_text: Callable[[], bytes] | None = None,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.model_status = model_status
        self.observer: ExchangeObserver = observer or NullObserver()
        self.state = ProxyState.build(settings, observer=self.observer, model_status=model_status)
        self.tls_context = build_server_context(settings.listen)
        self.pool = UpstreamPool(settings.upstream, self.loop)
        self.health = HealthChecker(settings.upstream, _upstream_authorization(settings))
        self.throttle = FailureThrottle(settings.auth)
        self.limits = TokenLimits(settings.auth)
        self.limits_enabled = self.limits.enabled  # read per request: a plain attribute
        self.connections: set[ClientConnection] = set()
        self.trimmer = BurstTrimmer()
        self.cut_on_drain = 0
        self.https_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._metrics_app = metrics_app
        self._metrics_text = metrics_text
        self._server: asyncio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._sweep_handle: asyncio.TimerHandle | None = None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self, sockets: list[socket.socket] | None = None, *,
                    metrics_sock: socket.socket | None = None) -> None:
        listen = self.settings.listen
        # The listening context only picks the current one per handshake, so a reload can swap
        # certificates for new connections without touching the listener.
        listener_context = build_server_context(listen)
        listener_context.sni_callback = self._pick_context
        sockets = list(sockets or [])
        tls_sock = sockets.pop(0) if sockets else None
        host, port = parse_hostport(listen.https)
        if tls_sock is None:
            tls_sock = bind_socket(host, port, reuse_port=self.settings.server.workers > 1)
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self), sock=tls_sock, ssl=listener_context,
            backlog=LISTEN_BACKLOG, ssl_handshake_timeout=listen.tls_handshake_timeout,
        )
        self.https_port = self._server.sockets[0].getsockname()[1]
        if listen.http:
            self.http_port = await self._start_app(self._redirect_app(), listen.http,
                                                   sockets.pop(0) if sockets else None)
        if self._metrics_app is not None and (self.settings.metrics.listen or metrics_sock):
            # a worker of several serves its metrics on a private socket; the parent adds up
            self.metrics_port = await self._start_app(self._metrics_app,
                                                      self.settings.metrics.listen, metrics_sock)
        self._tasks.append(self.loop.create_task(self.health.run()))
        self._schedule_sweep()
        log.info("listening on https://%s:%d (upstream %s)", host, self.https_port,
                 self.settings.upstream.url)

    async def _start_app(self, app: web.Application, where: str,
                         sock: socket.socket | None) -> int:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(runner, sock)
        else:
            host, port = parse_hostport(where)
            site = web.TCPSite(runner, host, port, reuse_port=self.settings.server.workers > 1)
        await site.start()
        server = cast(asyncio.Server, site._server)  # uvloop's Server is not asyncio's class
        name = server.sockets[0].getsockname()
        return name[1] if isinstance(name, tuple) else 0

    async def drain(self, grace: float) -> int:
        """Stop accepting; let running exchanges finish for up to `grace` s; cut the rest.
        Returns how many were cut."""
        if self._server is not None:
            self._server.close()
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.shutdown()
        deadline = self.loop.time() + grace
        while True:
            for conn in list(self.connections):
                if conn._phase == PHASE_IDLE and conn.transport is not None:
                    conn.closing = True
                    conn.transport.close()
            busy = [c for c in self.connections if c.busy]
            if not busy or self.loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05, max(0.0, deadline - self.loop.time())))
        cut = 0
        for conn in list(self.connections):
            if conn.busy:
                cut += 1
            if conn.transport is not None:
                conn.transport.abort()
        self.cut_on_drain += cut
        if cut:
            log.warning("drain timeout: cut %d running request(s)", cut)
        return cut

    async def stop(self, drain_timeout: float = 0.0) -> None:
        await self.drain(drain_timeout)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in self._runners:
            await runner.cleanup()
        self.pool.close()
        if self._server is not None:
            await self._server.wait_closed()

    def reload(self) -> bool:
        """Re-read tokens, certificate and key. Everything is built before anything is
        swapped; on any error the old state stays and the reason is logged."""
        try:
            settings = self.settings
            state = ProxyState.build(settings, observer=self.observer,
                                     model_status=self.model_status)
            context = build_server_context(settings.listen)
        except (TLSConfigError, TokenFileError, OSError, ValueError) as error:
            log.error("reload failed, keeping the running configuration: %s", error)
            return False
        self.state, self.tls_context = state, context
        log.info("reloaded: %d token(s), certificate %s", len(state.tokens.entries),
                 settings.listen.cert)
        return True

    def _pick_context(self, ssl_object: ssl.SSLObject, server_name: str | None,
                      context: ssl.SSLContext) -> None:
        if ssl_object.context is not self.tls_context:
            ssl_object.context = self.tls_context

    def _schedule_sweep(self) -> None:
        # Timeouts are enforced by one sweep over the connections, a few times a second, instead
        # of a timer per request (see ClientConnection.check_timeouts).
        shortest = min(self.settings.server.header_timeout, self.settings.upstream.read_timeout,
                       self.settings.server.keepalive_timeout)
        interval = max(0.05, min(1.0, shortest / 4))

        def sweep() -> None:
            now = self.loop.time()
            for conn in list(self.connections):
                if not conn.closing:
                    conn.check_timeouts(now)
            self.pool.prune()
            self.trimmer.observe(len(self.connections))
            self._sweep_handle = self.loop.call_later(interval, sweep)

        self._sweep_handle = self.loop.call_later(interval, sweep)

    # -- called by the forwarding core --------------------------------------------------------
    def observer_started(self, exchange: Exchange) -> None:
        self.observer.exchange_started(exchange)

    def observer_finished(self, exchange: Exchange) -> None:
        if exchange.holds_limit:
            exchange.holds_limit = False
            self.limits.release(exchange.token_name)
        self.observer.exchange_finished(exchange)

    def observer_auth_failed(self, reason: str) -> None:
        self.observer.auth_failed(reason)

    def throttle_check(self, peer: str) -> bytes | None:
        return self.throttle.check(peer, self.loop.time())

    def throttle_failure(self, peer: str) -> None:
        self.throttle.failure(peer, self.loop.time())

    def limits_acquire(self, exchange: Exchange) -> None:
        if not self.limits_enabled:
            return
        from proxy.forward import _Reject  # the core's own signal for "answer locally"

        refusal = self.limits.acquire(exchange.token_name, self.loop.time())
        if refusal is not None:
            raise _Reject(refusal)
        exchange.holds_limit = True

    def served_model(self) -> str:
        if self.health.served_model:
            return self.health.served_model
        launcher = self.settings.launcher
        return launcher.served_model_name or (launcher.model if self.model_status else "")

    def readiness(self) -> tuple[bool, str]:
        if self.model_status is not None:
            status = self.model_status()
            if status.state != "ready":
                return False, status.message
        readiness = self.health.readiness
        return readiness.ready, readiness.reason

    def healthz_response(self, request_id: bytes) -> bytes:
        ready, reason = self.readiness()
        body: dict[str, str] = {"status": "ready"} if ready else {
            "status": "not_ready", "reason": reason}
        return errors.response_bytes(
            200 if ready else 503, json.dumps(body).encode(), keep_alive=False,
            extra_headers=(("Cache-Control", "no-store"), ("X-Request-Id", request_id.decode())),
        )

    def metrics_on_tls(self, authorization: bytes, peer: str) -> bytes:
        token_store = self.state.metrics_token
        scheme, _, token = authorization.partition(b" ")
        if (token_store is None or scheme.lower() != b"bearer"
                or token_store.lookup(token.strip()) is None or self._metrics_text is None):
            self.observer_auth_failed("unknown" if authorization else "missing")
            self.throttle_failure(peer)
            return errors.json_error(401, "/metrics needs the metrics token ([metrics] "
                                     "token_file)", code="invalid_api_key", keep_alive=False,
                                     extra_headers=(("WWW-Authenticate", "Bearer"),))
        return errors.response_bytes(200, self._metrics_text(), keep_alive=False,
                                     content_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the port-80 listener -----------------------------------------------------------------
    def _redirect_app(self) -> web.Application:
        listen = self.settings.listen
        _, https_port = parse_hostport(listen.https)
        authority = listen.server_name if https_port in (443, 0) else (
            f"{listen.server_name}:{https_port}")

        async def redirect(request: web.Request) -> web.StreamResponse:
            # Nginx's `return 301 https://$server_name$request_uri`: the request target byte
            # for byte (HTTPMovedPermanently would normalise it through yarl).
            return web.Response(status=301, headers={
                "Location": f"https://{authority}{request.raw_path}"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        return app


def _upstream_authorization(settings: Settings) -> str:
    if not settings.upstream.api_key_file:
        return ""
    return f"Bearer {read_secret(settings.upstream.api_key_file)}"


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; with reuse_port several worker processes share the port and
    the kernel spreads connections across them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror} (is "
                      "another server on that port? ports below 1024 need "
                      "CAP_NET_BIND_SERVICE)") from error
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log.level.upper(), stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s", force=True,
    )


def install_uvloop() -> None:
    limit_arenas()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _status_line(settings: Settings, model_status: Callable[[], ModelStatus] | None) -> str:
    """What `systemctl status` shows: where we listen and, under `run`, how the model is."""
    line = f"STATUS=serving on {settings.listen.https}"
    if model_status is not None:
        status = model_status()
        line += "; model ready" if status.state == "ready" else f"; model {status.message}"
    return line


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: asyncio.Event | None = None,
    model_status: Callable[[], ModelStatus] | None = None,
    supervisor: Any = None,
    on_started: Callable[[ProxyServer], None] | None = None,
    sockets: list[socket.socket] | None = None,
    metrics_sock: socket.socket | None = None,
    host_metrics: bool = True,
) -> int:
    """Run the proxy until SIGTERM/SIGINT (or `shutdown_trigger`), then drain and stop.
    SIGHUP reloads tokens and certificates; SIGUSR1 reopens the access log (logrotate)."""
    from proxy.observability import build_observability

    loop = asyncio.get_running_loop()
    stop = shutdown_trigger or asyncio.Event()
    reload_requested = asyncio.Event()
    observability = build_observability(settings, model_status=model_status,
                                        supervisor=supervisor, host_metrics=host_metrics)
    for signum, event in ((signal.SIGTERM, stop), (signal.SIGINT, stop),
                          (signal.SIGHUP, reload_requested)):
        loop.add_signal_handler(signum, event.set)
    loop.add_signal_handler(signal.SIGUSR1, observability.reopen_logs)
    server = ProxyServer(settings, model_status=model_status, observer=observability.observer,
                         metrics_app=observability.metrics_app,
                         metrics_text=observability.metrics_text)
    try:
        await server.start(systemd.listen_sockets() if sockets is None else sockets,
                           metrics_sock=metrics_sock)
    except BaseException:
        await observability.close()
        raise
    if on_started is not None:
        on_started(server)
    systemd.notify("READY=1", _status_line(settings, model_status))
    if supervisor is not None:
        supervisor.add_listener(lambda _: systemd.notify(_status_line(settings, model_status)))
    watchdog = systemd.watchdog_interval()
    while not stop.is_set():
        waiters = [asyncio.ensure_future(stop.wait()),
                   asyncio.ensure_future(reload_requested.wait())]
        await asyncio.wait(waiters, timeout=watchdog, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if watchdog:
            systemd.notify("WATCHDOG=1")
        if reload_requested.is_set():
            reload_requested.clear()
            systemd.reloading()
            when = time.strftime("%H:%M:%S")
            if server.reload():
                systemd.notify("READY=1", f"STATUS=reloaded at {when}; serving on "
                               f"{settings.listen.https}")
            else:
                systemd.notify("READY=1", f"STATUS=reload at {when} FAILED (see the log); "
                               "still serving with the previous tokens and certificate")
    systemd.notify("STOPPING=1", "STATUS=draining running requests")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        loop.remove_signal_handler(signum)
    await server.stop(settings.server.drain_timeout)
    await observability.close()
    return 0


def _load(args: argparse.Namespace) -> Settings | None:
    try:
        return load_settings(args.config)
    except ConfigError as error:
        print(f"airgate: {error}", file=sys.stderr)
        return None


def serve_main(args: argparse.Namespace) -> int:
    """`airgate serve`: the proxy alone."""
    return _main(args, with_launcher=False)


def run_main(args: argparse.Namespace) -> int:
    """`airgate run`: the launcher and the proxy."""
    return _main(args, with_launcher=True)


def _main(args: argparse.Namespace, *, with_launcher: bool) -> int:
    settings = _load(args)
    if settings is None:
        return 2
    configure_logging(settings)
    if settings.server.workers > 1:  # the launcher runs once, in the parent
        return run_workers(settings, _worker_main(settings),
                           _launcher_task(settings) if with_launcher else None)
    install_uvloop()
    try:
        return asyncio.run(run_all(settings) if with_launcher else serve(settings))
    except STARTUP_ERRORS as error:
        print(f"airgate: {error}", file=sys.stderr)
        return 1


def _worker_main(settings: Settings) -> Callable[[int, Path, list[socket.socket]], int]:
    def main(index: int, runtime_dir: Path, inherited: list[socket.socket]) -> int:
        identity = worker_identity()
        install_uvloop()

        def started(server: ProxyServer) -> None:
            if identity is not None:
                announce_ready(identity[1])

        try:
            # vLLM's relayed metrics, GPU and build info: from the first worker only
            return asyncio.run(serve(
                settings, sockets=inherited, on_started=started, host_metrics=index == 0,
                metrics_sock=unix_metrics_socket(runtime_dir, index)))
        except STARTUP_ERRORS as error:
            print(f"airgate: worker {index}: {error}", file=sys.stderr)
            return 1

    return main


def _launcher_task(settings: Settings) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def supervise(stop: asyncio.Event) -> None:
        from proxy.launcher.supervisor import Supervisor

        await Supervisor(settings.launcher).run(stop)

    return supervise


async def run_all(settings: Settings, shutdown_trigger: asyncio.Event | None = None) -> int:
    """`airgate run`: the launcher and the proxy in one process; the proxy answers 503 with
    the launcher's progress until the model is ready."""
    from proxy.launcher.supervisor import Supervisor

    supervisor = Supervisor(settings.launcher)
    stop = shutdown_trigger or asyncio.Event()
    supervising = asyncio.ensure_future(supervisor.run(stop))
    try:
        await serve(settings, shutdown_trigger=stop, model_status=supervisor.status,
                    supervisor=supervisor)
    finally:
        stop.set()
        await supervising
    return 0
