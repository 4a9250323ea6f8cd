"""Reading the guide's `docker run` line: the tables of docker's and vLLM's options (and what
becomes of each), and the command split into words (with shlex, as a shell
would), each keeping its line number.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from proxy.migrate.common import HF_TOKEN_FILE, VLLM_KEY_FILE, ImportFailure

DOCKER_FLAGS = frozenset({
    "-d", "--detach", "-i", "--interactive", "-t", "--tty", "--rm", "--privileged", "--init",
    "-P", "--publish-all", "--read-only", "--no-healthcheck", "--oom-kill-disable", "-q",
    "--quiet", "--sig-proxy", "--disable-content-trust",
})
DOCKER_VALUE_OPTIONS = frozenset({
    "--name", "-v", "--volume", "-e", "--env", "--env-file", "-p", "--publish", "--ipc",
    "--gpus", "--shm-size", "--runtime", "--network", "--net", "--restart", "--mount", "-u",
    "--user", "-w", "--workdir", "--entrypoint", "--device", "--ulimit", "--cpus", "-m",
    "--memory", "-l", "--label", "-h", "--hostname", "--add-host", "--log-driver", "--log-opt",
    "--security-opt", "--cap-add", "--cap-drop", "--platform", "--pull", "--cidfile",
    "--memory-swap", "--cpuset-cpus", "--pid", "--uts", "--userns", "--stop-signal",
    "--stop-timeout", "--tmpfs", "--dns", "--group-add", "--expose", "--sysctl",
    "--volumes-from", "-a", "--attach", "--link", "--ip", "--network-alias", "--cgroupns",
    "--pids-limit", "--health-cmd", "--health-interval", "--health-retries", "--health-timeout",
})
SHORT_VALUE_OPTIONS = frozenset({"-e", "-v", "-p", "-u", "-w", "-m", "-l", "-h", "-a"})
HF_TOKEN_VARIABLES = frozenset({"HUGGING_FACE_HUB_TOKEN", "HF_TOKEN"})
OFFLINE_VARIABLES = frozenset({"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"})
DOCKER_OPTION_REASONS: dict[str, str] = {
    "--ipc": "the launcher decides the container's IPC and shared-memory settings",
    "--shm-size": "the launcher decides the container's IPC and shared-memory settings",
    "--runtime": "the launcher requests GPUs with --gpus ([launcher] gpus)",
    "--restart": "the launcher restarts vLLM itself ([launcher] backoff_*)",
    "-d": "the launcher runs and supervises the container itself",
    "--detach": "the launcher runs and supervises the container itself",
    "--rm": "the launcher runs and supervises the container itself",
    "-i": "the launcher runs and supervises the container itself",
    "-t": "the launcher runs and supervises the container itself",
    "--network": "the launcher publishes vLLM on 127.0.0.1 only ([launcher] port)",
    "--net": "the launcher publishes vLLM on 127.0.0.1 only ([launcher] port)",
    "--env-file": "not read; put VLLM_API_KEY and the Hugging Face token in the files named by "
                  "[launcher] api_key_file and hf_token_file",
    "--entrypoint": "the launcher runs the image's own vLLM entrypoint",
}
# The tool-calling flag sets the launcher knows by name (see [launcher] preset).
PRESETS: dict[str, dict[str, str]] = {
    "mistral": {"--tool-call-parser": "mistral", "--tokenizer-mode": "mistral",
                "--config-format": "mistral", "--load-format": "mistral",
                "--enable-auto-tool-choice": ""},
    "hermes": {"--tool-call-parser": "hermes", "--enable-auto-tool-choice": ""},
    "llama3": {"--tool-call-parser": "llama3_json", "--enable-auto-tool-choice": ""},
}
VLLM_SECRET_OPTIONS = {"--api-key": VLLM_KEY_FILE, "--hf-token": HF_TOKEN_FILE}


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    line: int


def strip_doc_callout(line: str) -> str:
    """Drop the `<1>` markers the docs put after a line (`--gpus all \\ <2>`)."""
    head, sep, tail = line.rstrip().rpartition(" <")
    if sep and tail.endswith(">") and tail[:-1].isdigit():
        return head.rstrip()
    return line.rstrip()


def is_command_start(line: str) -> bool:
    words = line.split()
    return bool(words) and words[0] in {"docker", "podman", "sudo", "nvidia-docker"}


def docker_words(path: Path, text: str) -> list[Word]:
    """The words of the first `docker run` command in `text`, each with its line number.

    Backslash-newline continues the command, as in a shell; fences, prompts and comment lines
    around it are skipped. Each physical line is split with shlex on its own so that every word
    keeps its line for the report."""
    words: list[Word] = []
    started = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = strip_doc_callout(raw).lstrip()
        line = line.removeprefix("$ ")
        if not started and not is_command_start(line):
            continue
        started = True
        continues = line.endswith("\\")
        try:
            parts = shlex.split(line[:-1] if continues else line)
        except ValueError as error:
            raise ImportFailure(f"{path}:{number}: {error}: keep each quoted value on one line"
                                ) from error
        for part in parts:
            if part.startswith("#"):
                break  # a shell comment runs to the end of the line
            words.append(Word(part, number))
        if not continues:
            break
    if not words:
        raise ImportFailure(f"{path}: no `docker run ...` command found; pass a file holding "
                            "the guide's command")
    return words


def split_option(text: str) -> tuple[str, str | None]:
    """'--env=A=B' -> ('--env', 'A=B'); '-eA=B' -> ('-e', 'A=B'); '--rm' -> ('--rm', None)."""
    if text.startswith("--"):
        name, sep, value = text.partition("=")
        return name, (value if sep else None)
    if len(text) > 2 and text[:2] in SHORT_VALUE_OPTIONS:
        return text[:2], text[2:].removeprefix("=")
    return text, None


def is_flag_cluster(text: str) -> bool:
    """'-it', '-dit': single-letter docker flags written together."""
    return len(text) > 2 and text[0] == "-" and text[1] != "-" and set(text[1:]) <= set("dit")
