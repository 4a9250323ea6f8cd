"""Children that die with airgate: the kernel SIGTERMs them when their parent dies
(PR_SET_PDEATHSIG), so even a SIGKILLed airgate (the OOM killer, a hard stop) leaves no worker
holding the port and no vLLM holding the GPUs."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> Callable[[], None] | None:
    """Call in the parent before forking; call what it returns in the child (a subprocess
    preexec_fn, or first thing after os.fork()). None where the kernel has no such option."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no imports in the child
    parent = os.getpid()

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return in_child
