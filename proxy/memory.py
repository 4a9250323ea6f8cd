"""Giving memory back after a burst.

A burst of a thousand streams allocates TLS buffers, parsers and socket buffers by the
thousand; once they are freed, glibc keeps most of that heap mapped (fragmented arenas), so the
process's RSS ratchets up burst after burst although nothing is alive. `malloc_trim(0)` hands
the free pages back to the kernel. It costs a few milliseconds, so it runs only when the number
of open connections has fallen well below a recent peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8
TRIM_AFTER_PEAK = 64          # connections: below this, a burst is not worth trimming after


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only; musl has none
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def limit_arenas(count: int = 2) -> None:
    """Fewer malloc arenas: the loop is one thread; extra arenas only hold freed memory."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, count)


class BurstTrimmer:
    """Call `observe(open_connections)` now and then (the server's sweep does); it trims once
    the count has dropped to a quarter of the peak seen since the last trim."""

    __slots__ = ("peak", "trims")

    def __init__(self) -> None:
        self.peak = 0
        self.trims = 0

    def observe(self, open_connections: int) -> bool:
        if open_connections > self.peak:
            self.peak = open_connections
            return False
        if self.peak < TRIM_AFTER_PEAK or open_connections > self.peak // 4:
            return False
        self.peak = open_connections
        if _LIBC is None:
            return False
        _LIBC.malloc_trim(0)
        self.trims += 1
        return True
