"""Abuse limits around authentication: failed-token throttling per client address, and
per-token concurrency and rate limits. All answers are OpenAI-shaped JSON 429s with
Retry-After, so SDKs (which honour it) back off instead of hammering.
"""

from __future__ import annotations

import math
from collections import deque

from proxy import errors
from proxy.settings import AuthSettings

MAX_TRACKED_ADDRESSES = 100_000  # bound memory under a spray of addresses


def too_many(message: str, retry_after: float, code: str) -> bytes:
    seconds = max(1, math.ceil(retry_after))
    return errors.json_error(
        429, f"{message}; retry in {seconds} s", "rate_limit_error", code,
        extra_headers=(("Retry-After", str(seconds)),), keep_alive=False,
    )


class FailureThrottle:
    """After `fail_limit` failed attempts within `fail_window` seconds an address is refused
    for `block_seconds`, even with a right token: guessing must cost the guesser time."""

    __slots__ = ("_blocked", "_failures", "_settings")

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def check(self, address: str, now: float) -> bytes | None:
        if not self._blocked:
            return None
        until = self._blocked.get(address)
        if until is None:
            return None
        if now >= until:
            del self._blocked[address]
            self._failures.pop(address, None)
            return None
        return too_many("too many failed authentication attempts from this address",
                        until - now, "auth_throttled")

    def failure(self, address: str, now: float) -> None:
        settings = self._settings
        if settings.fail_limit == 0:
            return
        window = self._failures.get(address)
        if window is None:
            if len(self._failures) >= MAX_TRACKED_ADDRESSES:
                self._prune(now)
            window = self._failures[address] = deque()
        window.append(now)
        while window and now - window[0] > settings.fail_window:
            window.popleft()
        if len(window) >= settings.fail_limit:
            if len(self._blocked) >= MAX_TRACKED_ADDRESSES:
                # A spray of addresses (IPv6 makes them cheap) must not grow this without bound:
                # forget the blocks that have run out; if all are live, the oldest go first.
                self._prune_blocked(now)
            self._blocked[address] = now + settings.block_seconds

    def _prune_blocked(self, now: float) -> None:
        for address in [a for a, until in self._blocked.items() if now >= until]:
            del self._blocked[address]
        while len(self._blocked) >= MAX_TRACKED_ADDRESSES:
            del self._blocked[next(iter(self._blocked))]  # dicts keep insertion order

    def _prune(self, now: float) -> None:
        window = self._settings.fail_window
        for address in [a for a, w in self._failures.items() if not w or now - w[-1] > window]:
            del self._failures[address]
        if len(self._failures) >= MAX_TRACKED_ADDRESSES:
            self._failures.clear()


class TokenLimits:
    """Per-token concurrency and requests-per-minute (a sliding window of start times)."""

    __slots__ = ("_active", "_recent", "_settings")

    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._active: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._settings.max_concurrent or self._settings.requests_per_minute)

    def acquire(self, name: str, now: float) -> bytes | None:
        settings = self._settings
        if settings.max_concurrent and self._active.get(name, 0) >= settings.max_concurrent:
            return too_many(f"token {name!r} already has {settings.max_concurrent} requests "
                            "running ([auth] max_concurrent)", 1, "concurrency_limit")
        if settings.requests_per_minute:
            recent = self._recent.setdefault(name, deque())
            while recent and now - recent[0] >= 60.0:
                recent.popleft()
            if len(recent) >= settings.requests_per_minute:
                return too_many(f"token {name!r} is over {settings.requests_per_minute} "
                                "requests per minute ([auth] requests_per_minute)",
                                60.0 - (now - recent[0]), "rate_limit")
            recent.append(now)
        self._active[name] = self._active.get(name, 0) + 1
        return None

    def release(self, name: str) -> None:
        count = self._active.get(name, 0)
        if count > 1:
            self._active[name] = count - 1
        else:
            self._active.pop(name, None)
