"""Reading vLLM's output: how far the model load is, and why a run ended.

vLLM prints tqdm bars while it downloads weights, loads checkpoint shards and captures CUDA
graphs; nothing else tells how far a 30-minute load has come, so the launcher reads them. When a
run ends, its exit status and last lines are turned into a sentence an operator can act on,
instead of "exited with 1".
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

# "Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01, ...]",
# "model-00001-of-00004.safetensors:  45%|████▌     | 2.2G/4.9G [...]",
# "Capturing CUDA graph shapes:  80%|████████  | 54/67 [...]"
_BAR = re.compile(r"(?P<desc>[^:|\r\n]{1,120}):\s+(?P<pct>\d{1,3})%")

# (phase, words in the bar's description, overall progress at the phase's 0% and 100%).
# Downloading comes first and is skipped entirely in an air gap, so it gets a small share.
_PHASES: tuple[tuple[str, tuple[str, ...], float, float], ...] = (
    ("downloading weights", (".safetensors", ".bin", ".pt", "fetching", "download"), 0.0, 0.3),
    ("loading weights", ("checkpoint shards", "loading"), 0.3, 0.8),
    ("capturing CUDA graphs", ("cuda graph", "cudagraph"), 0.85, 0.97),
)
# Milestones without a bar: (words, overall progress, phase text).
_MILESTONES: tuple[tuple[str, float, str], ...] = (
    ("model loading took", 0.8, "profiling memory"),
    ("loading weights took", 0.8, "profiling memory"),
    ("init engine (profile, create kv cache", 0.97, "starting the API server"),
    ("starting vllm api server", 0.98, "starting the API server"),
    ("application startup complete", 0.99, "starting the API server"),
)


@dataclass(frozen=True)
class Failure:
    """Why a run ended (or could not start), in words."""

    code: int | None
    reason: str
    ready_for: float = 0.0  # seconds the run had been ready before it failed


_LEVELS = {"ERROR": logging.ERROR, "CRITICAL": logging.ERROR, "WARNING": logging.WARNING}


def log_level(line: str) -> int:
    """vLLM's own level of an output line ("WARNING 06-01 12:00:00 ..."), INFO if none."""
    return _LEVELS.get(line.split(" ", 1)[0], logging.INFO)


@dataclass
class LoadProgress:
    """Progress of one model load, fed line by line; `value` never goes backwards."""

    value: float | None = None
    phase: str = ""
    phase_percent: int | None = None

    def feed(self, line: str) -> bool:
        """Read one output line; True when the value or the phase changed."""
        lowered = line.lower()
        match = _BAR.search(line)
        if match:
            desc = match.group("desc").strip().lower()
            percent = min(100, int(match.group("pct")))
            for phase, words, low, high in _PHASES:
                if any(word in desc for word in words):
                    return self._update(low + (high - low) * percent / 100, phase, percent)
            return False
        for marker, value, phase in _MILESTONES:
            if marker in lowered:
                return self._update(value, phase, None)
        return False

    def _update(self, value: float, phase: str, percent: int | None) -> bool:
        before = (self.value, self.phase, self.phase_percent)
        self.value = value if self.value is None else max(self.value, value)
        self.phase, self.phase_percent = phase, percent
        return before != (self.value, self.phase, self.phase_percent)

    def describe(self) -> str:
        if not self.phase:
            return "loading model"
        if self.phase_percent is None:
            return f"loading model ({self.phase})"
        return f"loading model ({self.phase} {self.phase_percent}%)"


# Known causes in the last lines of output: (regular expression, explanation). First match wins,
# so the most specific come first.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), text) for pattern, text in (
        (r"CUDA out of memory|torch\.OutOfMemoryError|CUDA error: out of memory",
         "CUDA out of memory: lower gpu_memory_utilization or raise tensor_parallel_size"),
        (r"No available memory for the cache blocks|larger than the maximum number of tokens "
         r"that can be stored in KV cache|insufficient .*KV cache",
         "not enough GPU memory for the KV cache: raise gpu_memory_utilization, or add "
         "--max-model-len N (smaller) to extra_args"),
        (r"GatedRepoError|Cannot access gated repo|401 Client Error",
         "the model is gated or private: set hf_token_file to a Hugging Face token that has "
         "access"),
        (r"OfflineModeIsEnabled|LocalEntryNotFoundError|outgoing traffic has been disabled|"
         r"couldn't connect to 'https://huggingface.co'|offline mode is enabled",
         "the model is not in the Hugging Face cache and the launcher is offline: copy it into "
         "hf_cache (airgate bundle / unbundle), or set offline = false"),
        (r"RepositoryNotFoundError|is not a local folder and is not a valid model identifier",
         "model not found: check launcher.model"),
        (r"No CUDA GPUs are available|could not select device driver|nvidia-container-cli|"
         r"unresolvable CDI devices|no NVIDIA driver",
         "no GPU visible to vLLM: check the NVIDIA driver and container toolkit (nvidia-smi, "
         "nvidia-ctk), and launcher.gpus"),
        (r"driver version is insufficient|NVIDIA driver on your system is too old",
         "the NVIDIA driver is too old for this vLLM image: update the driver or pin an "
         "older image"),
        (r"NCCL error|NCCL WARN",
         "NCCL error between GPUs: check tensor_parallel_size against the GPUs (and --ipc=host)"),
        (r"address already in use|port is already allocated",
         "the port is already in use: stop whatever listens on launcher.port or change it"),
        (r"Unable to find image|image not known|No such image|manifest unknown",
         "the image is not on this host: load it (airgate unbundle, docker load) or fix "
         "launcher.image"),
        (r"unrecognized arguments|error: argument|invalid choice",
         "vLLM rejected its arguments: check launcher.preset and extra_args against this "
         "vLLM version"),
    )
)

_STATUS_TEXT = {
    0: "exited by itself with status 0 (vLLM should not)",
    125: "the container runtime could not create the container",
    126: "the command inside the container could not be executed",
    127: "command not found (check the image's entrypoint or launcher.vllm_command)",
    134: "aborted (SIGABRT)",
    137: "killed (SIGKILL) — out of memory?",
    139: "crashed (SIGSEGV, segmentation fault)",
    143: "terminated (SIGTERM)",
}
_ERROR_LINE = re.compile(r"error|exception|fatal|failed", re.IGNORECASE)


def _status_text(code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return "killed by the kernel's OOM killer: the host is short of memory"
    if code is None:
        return "ended (status unknown)"
    if code < 0:  # a process killed by a signal, as asyncio reports it
        code = 128 - code
    if code in _STATUS_TEXT:
        return _STATUS_TEXT[code]
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"killed by {name}"
    return "failed"


def explain_exit(code: int | None, tail: Iterable[str], *, oom_killed: bool = False) -> str:
    """'exit 137: killed (SIGKILL) — out of memory?' or the cause found in the last lines."""
    lines = [line.strip() for line in tail if line.strip()]
    prefix = f"exit {code}" if code is not None else "exit ?"
    text = "\n".join(lines)
    for pattern, cause in _CAUSES:
        if pattern.search(text):
            return f"{prefix}: {cause}"
    reason = _status_text(code, oom_killed)
    if reason in {"failed", _STATUS_TEXT[125], _STATUS_TEXT[0]}:
        # Say what the program said last: vLLM ends a failure with the exception's line.
        errors = [line for line in lines if _ERROR_LINE.search(line)]
        last = (errors or lines or [""])[-1]
        if last:
            reason += f": {last[:300]}"
    return f"{prefix}: {reason}"
