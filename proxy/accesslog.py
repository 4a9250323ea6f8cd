"""Access logs: one line per exchange, in Nginx's combined format or as ECS-style JSON.

`combined` is what Elastic's Nginx integration parses (its ingest pipeline's grok, see
tests/test_accesslog.py) with the request time in seconds right after the byte count, where that
grok reads `nginx.access.response_time`, and the token NAME where Nginx writes `$remote_user`:

10.0.0.5 - kibana [12/Mar/2025:14:03:07 +0100] "POST /v1/completions HTTP/1.1" 200 51 2.413 "-" "-"

Lines are formatted on the event loop (a few µs) and written by one thread, so a slow or full
disk never stalls the loop: lines are handed over in batches (one thread wake-up per
FLUSH_INTERVAL, not one per request, like Nginx's `access_log ... buffer= flush=`), and past
MAX_BACKLOG unwritten lines new ones are dropped and counted rather than piling up in memory.
`reopen()` (SIGUSR1, logrotate's convention) makes the thread open the file again by name.

Never in a line: tokens, keys, bodies, query strings (a query may carry a secret; the path and
the referer are logged without theirs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quote  # the C one when available
from typing import Final

from proxy.exchange import Exchange

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1     # seconds a line may wait before the thread writes it
MAX_BACKLOG = 100_000    # lines handed over but not written yet; more are dropped
FILE_MODE = 0o640        # client addresses and token names: not for every local user

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# As Nginx escapes variables in access logs: '"', '\' and bytes outside printable ASCII become
# \xHH, so a client can't forge a second line or break the quoting the grok relies on.
_ESCAPE: Final = {c: f"\\x{c:02X}" for c in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))}

Formatter = Callable[[Exchange], str]


def _escaped(value: str) -> str:
    return value.translate(_ESCAPE) if value else "-"


class _LocalTime:
    """Nginx's $time_local (`12/Mar/2025:14:03:07 +0100`), formatted once per second.
    Month names are fixed English, as the grok's HTTPDATE wants, whatever the locale."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            tm = time.localtime(second)
            offset = tm.tm_gmtoff // 60
            sign = "+" if offset >= 0 else "-"
            hours, minutes = divmod(abs(offset), 60)
            self._text = (f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:"
                          f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
                          f"{sign}{hours:02d}{minutes:02d}")
            self._second = second
        return self._text


def combined_formatter() -> Formatter:
    local_time = _LocalTime()

    def format_combined(ex: Exchange) -> str:
        duration = ex.end - ex.start
        # $time_local is when the line is written, the end of the exchange, as with Nginx.
        when = local_time(ex.start_wall + duration)
        request = f"{ex.method} {ex.path.translate(_ESCAPE)} HTTP/{ex.version}" if ex.method \
            else "-"
        referer = ex.referer.partition("?")[0]
        return (f'{ex.client_addr} - {ex.token_name or "-"} [{when}] "{request}" {ex.status} '
                f'{ex.body_out} {duration:.3f} "{_escaped(referer)}" '
                f'"{_escaped(ex.user_agent)}"\n')

    return format_combined


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def _str(value: str) -> str:
    """A JSON string, or null for "": ASCII only, so every byte a client sent is \\u-escaped."""
    return _quote(value) if value else "null"


def _num(value: float | None) -> str:
    return "null" if value is None else repr(value)


def format_json(ex: Exchange) -> str:
    """One ECS-style object (nested, as ECS documents are); missing values are null.

    Written as a template rather than json.dumps of nested dicts: a third of the cost
    (tests/test_metrics_bench.py), and the shape is fixed anyway."""
    duration = ex.end - ex.start
    status = ex.status
    return (
        f'{{"@timestamp":"{_iso(ex.start_wall + duration)}",'
        f'"event":{{"kind":"event","category":["web"],"type":["access"],'
        f'"dataset":"airgate.access","start":"{_iso(ex.start_wall)}",'
        f'"duration":{int(duration * 1e9)},'
        f'"outcome":"{"success" if 0 < status < 400 else "failure"}"}},'
        f'"source":{{"ip":{_str(ex.client_addr)}}},'
        f'"user":{{"name":{_str(ex.token_name)}}},'
        f'"url":{{"path":{_str(ex.path)}}},'
        f'"user_agent":{{"original":{_str(ex.user_agent)}}},'
        f'"http":{{"version":{_str(ex.version)},'
        f'"request":{{"id":{_str(ex.request_id)},"method":{_str(ex.method)},'
        f'"body":{{"bytes":{ex.body_in}}},'
        f'"referrer":{_str(ex.referer.partition("?")[0])}}},'
        f'"response":{{"status_code":{status},"body":{{"bytes":{ex.body_out}}}}}}},'
        f'"airgate":{{"route":{_str(ex.route)},'
        f'"streamed":{"true" if ex.streamed else "false"},'
        f'"ttfb":{_num(ex.ttfb)},"ttft":{_num(ex.ttft)},"model":{_str(ex.model)},'
        f'"prompt_tokens":{ex.prompt_tokens},"completion_tokens":{ex.completion_tokens},'
        f'"finish_reason":{_str(ex.finish_reason)},'
        f'"client_abort":{"true" if ex.aborted else "false"},'
        f'"abort_phase":{_str(ex.aborted)},'
        f'"upstream_error":{_str(ex.upstream_error)}}}}}\n')


_REOPEN: Final = object()
_STOP: Final = object()


class AccessLog:
    """An ExchangeObserver that writes one line per finished exchange.

    `path` "" is standard output (systemd sends it to the journal). A file is opened here, at
    start-up, so that a bad path fails the start instead of silently losing the log."""

    def __init__(self, kind: str, path: str = "", *, flush_interval: float = FLUSH_INTERVAL,
                 max_backlog: int = MAX_BACKLOG) -> None:
        if kind == "combined":
            self._format = combined_formatter()
        elif kind == "json":
            self._format = format_json
        else:
            raise ValueError(f"access log format {kind!r}: expected combined or json")
        self.path = path
        self.flush_interval = flush_interval
        self.max_backlog = max_backlog
        self._dropped = 0               # lines refused for a full backlog (the loop's count)
        self._failed = 0                # lines lost to failed writes (the thread's count)
        self._pending: list[str] = []
        self._handed = 0                # lines handed to the thread (the loop's count)
        self._written = 0               # lines the thread is done with (the thread's count)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._fd: int | None = self._open() if path else None
        self._thread = threading.Thread(target=self._run, name="airgate-access-log",
                                        daemon=True)
        self._thread.start()

    # -- ExchangeObserver ---------------------------------------------------------------------
    def exchange_started(self, exchange: Exchange) -> None:
        pass

    def exchange_finished(self, exchange: Exchange) -> None:
        pending = self._pending
        if self._handed + len(pending) - self._written >= self.max_backlog:
            self._dropped += 1
            return
        pending.append(self._format(exchange))
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside a loop (benchmarks, scripts): write now
                self._hand_over()
                return
            self._flush_handle = loop.call_later(self.flush_interval, self._hand_over)

    def auth_failed(self, reason: str) -> None:
        pass  # the refused exchange itself gets its line, with its 401

    @property
    def dropped(self) -> int:
        """Lines lost so far: backlog full, or the write failed."""
        return self._dropped + self._failed

    # -- control, from the loop's thread ------------------------------------------------------
    def reopen(self) -> None:
        """Open the file again by name (after logrotate renamed it); lines before this call
        go to the old file, lines after it to the new one."""
        self._hand_over()
        self._queue.put(_REOPEN)

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything so far and wait until it is written (tests, shutdown)."""
        self._hand_over()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._hand_over()
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _hand_over(self) -> None:
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush_handle = None
        batch = self._pending
        if batch:
            self._pending = []
            self._handed += len(batch)
            self._queue.put(batch)

    # -- the writer thread --------------------------------------------------------------------
    # With `[server] workers` > 1 every worker appends to the same file or journal pipe, so a
    # line must never be split between two write() calls: a file gets each batch in one
    # O_APPEND write (no buffered writer cutting it at 8 KiB), a pipe gets pieces of whole lines
    # up to PIPE_BUF, the size Linux writes to a pipe without interleaving.
    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                       FILE_MODE)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                break
            if item is _REOPEN:
                self._reopen_file()
            elif isinstance(item, threading.Event):
                item.set()
            elif isinstance(item, list):
                self._write(item)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, lines: list[str]) -> None:
        try:
            if self.path:
                if self._fd is None:
                    raise OSError(f"{self.path} is not open")
                data = "".join(lines).encode("utf-8", "backslashreplace")
                while data:
                    data = data[os.write(self._fd, data):]
            else:
                # Looked up per batch: tests (and anything else) may replace sys.stdout.
                stream = sys.stdout
                for piece in _whole_lines(lines, select.PIPE_BUF):
                    stream.write(piece)
                    stream.flush()
        except (OSError, ValueError) as error:  # ValueError: a closed stream
            self._failed += len(lines)
            log.error("access log %s: %s; %d line(s) lost", self.path or "<stdout>", error,
                      len(lines))
        finally:
            self._written += len(lines)

    def _reopen_file(self) -> None:
        if not self.path:
            return
        try:
            new = self._open()
        except OSError as error:  # as Nginx: keep writing to the old file rather than nowhere
            log.error("cannot reopen access log %s: %s; still writing to the old file",
                      self.path, error)
            return
        old, self._fd = self._fd, new
        if old is not None:
            os.close(old)


def _whole_lines(lines: list[str], limit: int) -> list[str]:
    """`lines` joined into pieces of at most `limit` characters (a longer line alone)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces
