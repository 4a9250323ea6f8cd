"""What the forwarding core consults per request, built once from Settings.

Reload (SIGHUP) builds a whole new ProxyState and swaps it in with one assignment; requests
already running keep the state they started with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from proxy.exchange import ExchangeObserver, NullObserver
from proxy.settings import Settings
from proxy.tokens import TokenStore, digest


class ModelStatus(Protocol):
    """What the launcher tells the proxy (see proxy.launcher.supervisor.LauncherStatus)."""

    @property
    def state(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def retry_after(self) -> int: ...


def read_secret(path: str) -> str:
    """A secret file's content without the trailing newline (editors add one)."""
    with open(path, encoding="utf-8") as handle:
        return handle.read().strip()


@dataclass(frozen=True, slots=True)
class ProxyState:
    settings: Settings
    tokens: TokenStore
    # (method, path) -> route name, from [upstream] allow
    routes: dict[tuple[bytes, bytes], str]
    # Headers added to every upstream request: Host, and vLLM's own key when configured.
    upstream_fixed_headers: bytes
    max_body: int
    count_usage: bool = True
    model_alias: str = ""
    observer: ExchangeObserver = field(default_factory=NullObserver)
    model_status: Callable[[], ModelStatus] | None = None
    metrics_token: TokenStore | None = None

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        observer: ExchangeObserver | None = None,
        model_status: Callable[[], ModelStatus] | None = None,
    ) -> ProxyState:
        tokens = TokenStore.load(settings.auth.tokens_file)
        routes: dict[tuple[bytes, bytes], str] = {}
        for entry in settings.upstream.allow:
            method, _, path = entry.partition(" ")
            routes[(method.encode(), path.encode())] = path
        host, port = settings.upstream.hostport
        fixed = f"Host: {host}:{port}\r\n".encode()
        if settings.upstream.api_key_file:
            key = read_secret(settings.upstream.api_key_file)
            fixed += f"Authorization: Bearer {key}\r\n".encode()
        metrics_token = None
        if settings.metrics.token_file:
            secret = read_secret(settings.metrics.token_file)
            metrics_token = TokenStore(((digest(secret), "metrics"),))
        return cls(
            settings=settings,
            tokens=tokens,
            routes=routes,
            upstream_fixed_headers=fixed,
            max_body=int(settings.upstream.max_body),
            count_usage=settings.metrics.usage,
            model_alias=settings.upstream.model_alias,
            observer=observer or NullObserver(),
            model_status=model_status,
            metrics_token=metrics_token,
        )
