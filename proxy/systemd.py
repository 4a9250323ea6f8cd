"""systemd integration without libsystemd: sd_notify over $NOTIFY_SOCKET and the listening
sockets of socket activation ($LISTEN_FDS). Both are no-ops outside systemd."""

from __future__ import annotations

import os
import socket
import time

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send `READY=1`, `STATUS=...` etc.; returns False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            return False
    return True


def reloading() -> bool:
    # systemd wants the time of the reload start to order it against READY=1 (Type=notify-reload)
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, or None when it asked for none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, in the unit's order (empty if none)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    sockets = [socket.socket(fileno=SD_LISTEN_FDS_START + index) for index in range(count)]
    for sock in sockets:
        sock.setblocking(False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # children (vLLM) must not think the sockets are theirs
    return sockets
