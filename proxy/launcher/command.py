"""The exact command that starts vLLM, for docker, podman and a plain process.

Pure functions of the settings and the secret values, so the argv can be compared with the seed's
`docker run` line in tests and in `airgate launch --print`. Secrets never enter argv (argv is
world-readable in /proc, in `ps` and in shell history): for a container they go into an env file
that only the owner can read and that exists only while `run` reads it; for a process they go into
the child's environment.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.launcher.presets import merge_args, preset_flags, split_options
from proxy.settings import LauncherSettings

CONTAINER_PORT = 8000
CONTAINER_HF_HOME = "/root/.cache/huggingface"
CONFIG_LABEL = "airgate.config"
ENV_FILE_PLACEHOLDER = "<env-file>"
# The launcher owns these: --host/--port are how the proxy reaches vLLM, --model is the config's
# model key, and a key given as --api-key would sit in argv.
RESERVED_OPTIONS = {
    "--host": "the launcher listens on 127.0.0.1:launcher.port",
    "--port": "set launcher.port",
    "--model": "set launcher.model",
    "--api-key": "put the key in the file named by launcher.api_key_file",
}
SECRET_OPTIONS = {"--api-key", "--hf-token"}


class LaunchError(Exception):
    """A problem that stops a launch, with a message that names the fix."""


@dataclass(frozen=True)
class LaunchCommand:
    runtime: str
    argv: tuple[str, ...]
    # Environment added to the child's (process runtime only; containers get `-e` in argv).
    env: Mapping[str, str] = field(default_factory=dict)
    # Secret variables: the container's env file, or the process's environment.
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    config_hash: str = ""
    # argv[vllm_start:] are vLLM's options (after the image, or after `serve MODEL`).
    vllm_start: int = 0

    def argv_with_env_file(self, path: str) -> tuple[str, ...]:
        return tuple(path if arg == ENV_FILE_PLACEHOLDER else arg for arg in self.argv)

    def env_file_content(self) -> str:
        return "".join(f"{name}={value}\n" for name, value in self.secret_env.items())

    def masked(self) -> str:
        """The command for people: one option per line like the seed, secrets as ***."""
        argv = list(self.argv)
        for index in range(1, len(argv)):
            if argv[index - 1] in SECRET_OPTIONS:
                argv[index] = "***"
        start = self.vllm_start
        if self.runtime == "process":
            lines = [shlex.join(argv[:start])]
        else:  # docker run, its options one per line, the image, then vLLM's options
            lines = [shlex.join(argv[:3]), *_option_lines(argv[3:start - 1]), argv[start - 1]]
        lines += _option_lines(argv[start:])
        text = " \\\n    ".join(lines)
        if self.env:
            text += "\nenvironment: " + " ".join(f"{k}={v}" for k, v in self.env.items())
        if self.secret_env:
            where = "environment (secret)" if self.runtime == "process" \
                else "env file (mode 0600, deleted once read)"
            text += f"\n{where}: " + " ".join(f"{name}=***" for name in self.secret_env)
        return text + "\n"


def _option_lines(args: list[str]) -> list[str]:
    lines: list[list[str]] = []
    for arg in args:
        # "-v", "--ipc=host" start an option; "-1" or "0.90" are values.
        if (arg[:1] == "-" and arg[1:2].isalpha()) or arg[:2] == "--" or not lines:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return [shlex.join(tokens) for tokens in lines]


def _read_secret(key: str, path: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise LaunchError(f"launcher.{key} {path}: {error.strerror}: make it readable by the "
                          f"user airgate runs as, or set launcher.{key} = \"\"") from error
    if not value:
        raise LaunchError(f"launcher.{key} {path} is empty: write the secret into it")
    if "\n" in value or "\r" in value:
        raise LaunchError(f"launcher.{key} {path} holds several lines: keep only the secret")
    return value


def read_secrets(settings: LauncherSettings) -> dict[str, str]:
    """Secret environment variables from the files the settings name."""
    secrets: dict[str, str] = {}
    if settings.api_key_file:
        secrets["VLLM_API_KEY"] = _read_secret("api_key_file", settings.api_key_file)
    if settings.hf_token_file:
        token = _read_secret("hf_token_file", settings.hf_token_file)
        # huggingface_hub reads HF_TOKEN; older releases (and the seed) HUGGING_FACE_HUB_TOKEN.
        secrets["HF_TOKEN"] = token
        secrets["HUGGING_FACE_HUB_TOKEN"] = token
    return secrets


def check_extra_args(settings: LauncherSettings) -> None:
    for name, _ in split_options(settings.extra_args):
        if name in RESERVED_OPTIONS:
            raise LaunchError(f"launcher.extra_args must not contain {name}: "
                              f"{RESERVED_OPTIONS[name]}")


def gpu_ids(gpus: str) -> list[str] | None:
    """'all' -> None (every GPU); '2' -> ['0', '1'] (a count); '0,2' -> ['0', '2']."""
    value = gpus.strip().lower()
    if value in {"all", ""}:
        return None
    if value == "none":
        return []
    if value.isdigit() and "," not in value:
        return [str(index) for index in range(int(value))]
    return [part.strip() for part in value.split(",") if part.strip()]


def _number(value: float) -> str:
    # 0.9 -> "0.90" as the seed writes it; finer values keep their digits.
    return f"{value:.2f}" if round(value, 2) == value else repr(value)


def model_args(settings: LauncherSettings) -> list[str]:
    """vLLM's model arguments shared by every runtime (after the model name)."""
    args: list[str] = []
    if settings.served_model_name:
        args += ["--served-model-name", settings.served_model_name]
    args += ["--gpu-memory-utilization", _number(settings.gpu_memory_utilization),
             "--tensor-parallel-size", str(settings.tensor_parallel_size)]
    try:
        return args + list(preset_flags(settings.preset))
    except ValueError as error:
        raise LaunchError(str(error)) from None


def _gpu_flags(runtime: str, gpus: str) -> list[str]:
    ids = gpu_ids(gpus)
    if ids == []:
        return []
    if runtime == "podman":
        # Podman reaches NVIDIA GPUs through CDI (nvidia-ctk cdi generate); SELinux labels
        # would otherwise deny the container the device nodes (NVIDIA's CDI instructions).
        names = ["all"] if ids is None else ids
        flags = [token for name in names for token in ("--device", f"nvidia.com/gpu={name}")]
        return [*flags, "--security-opt", "label=disable"]
    if ids is None:
        return ["--gpus", "all"]
    # Docker parses --gpus as CSV, so a list of ids must be quoted inside the value.
    return ["--gpus", f'"device={",".join(ids)}"']


def config_hash(argv: list[str], env: Mapping[str, str], secrets: Mapping[str, str]) -> str:
    # Secrets take part so that a changed API key is not "adopted" into a container that still
    # expects the old one. The label shows only a digest, and whoever can read labels can read
    # the container's environment anyway.
    blob = json.dumps({"argv": argv, "env": dict(env), "secrets": dict(sorted(secrets.items()))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_command(settings: LauncherSettings, secrets: Mapping[str, str],
                  binary: str) -> LaunchCommand:
    """The launch command for settings.runtime; `binary` is the docker/podman executable."""
    check_extra_args(settings)
    public_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if settings.offline else {}
    if settings.runtime == "process":
        env = {"HF_HOME": settings.hf_cache, **public_env}
        ids = gpu_ids(settings.gpus)
        if ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        base = ["serve", settings.model, "--host", "127.0.0.1", "--port", str(settings.port)]
        argv = [*settings.vllm_command, *merge_args(base + model_args(settings),
                                                    settings.extra_args)]
        digest = config_hash(argv, env, secrets)
        start = len(settings.vllm_command) + 2
        return LaunchCommand("process", tuple(argv), env, dict(secrets), digest, start)

    head = [binary, "run", "-d", "--name", settings.container_name]
    options = [*_gpu_flags(settings.runtime, settings.gpus),
               "-v", f"{settings.hf_cache}:{CONTAINER_HF_HOME}",
               "--ipc=host",
               "-p", f"127.0.0.1:{settings.port}:{CONTAINER_PORT}"]
    for name, value in public_env.items():
        options += ["-e", f"{name}={value}"]
    if secrets:
        options += ["--env-file", ENV_FILE_PLACEHOLDER]
    if settings.offline:
        # Air gap: a missing image must fail at once, not hang on a registry that can't be reached.
        options += ["--pull", "never"]
    vllm = merge_args(["--model", settings.model, *model_args(settings)], settings.extra_args)
    tail = [settings.image, *vllm]
    digest = config_hash([settings.runtime, *head[2:], *options, *tail], {}, secrets)
    argv = [*head, "--label", f"{CONFIG_LABEL}={digest}", *options, *tail]
    start = len(argv) - len(vllm)
    return LaunchCommand(settings.runtime, tuple(argv), {}, dict(secrets), digest, start)
