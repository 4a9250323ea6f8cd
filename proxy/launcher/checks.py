"""Checks before a launch, each failing with a message that names the fix.

A vLLM that cannot start usually says so after minutes of loading, deep in a traceback; these
checks catch the common causes in a second: no runtime, a daemon that does not answer, fewer
GPUs than tensor_parallel_size, an unreadable secret file, a port someone else holds.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
from pathlib import Path

from proxy.launcher import offline
from proxy.launcher.command import LaunchCommand, LaunchError, build_command, gpu_ids, read_secrets
from proxy.launcher.runtime import run_quiet
from proxy.settings import LauncherSettings


def find_binary(settings: LauncherSettings) -> str:
    """The docker/podman executable: launcher.runtime_command, or found on PATH."""
    if settings.runtime == "process":
        return ""
    if settings.runtime_command:
        path = settings.runtime_command
        if not os.access(path, os.X_OK) or Path(path).is_dir():
            raise LaunchError(f"launcher.runtime_command {path} is not an executable file: "
                              f"fix the path, or set it to \"\" to find {settings.runtime} on PATH")
        return path
    found = shutil.which(settings.runtime)
    if found is None:
        raise LaunchError(f"{settings.runtime} not found on PATH: install it, set "
                          f"launcher.runtime_command to its path, or use runtime = \"process\"")
    return found


async def check_runtime(settings: LauncherSettings, binary: str) -> None:
    """The runtime answers (`docker version` reaches the daemon); the vLLM command exists."""
    if settings.runtime == "process":
        program = settings.vllm_command[0] if settings.vllm_command else ""
        if not program or not (shutil.which(program) or os.access(program, os.X_OK)):
            raise LaunchError(f"launcher.vllm_command {program!r} not found: install vLLM "
                              f"(pip install vllm) or give the full path of its `vllm` command")
        return
    status, out = await run_quiet(binary, "version", limit=20)
    if status != 0:
        last = out.strip().splitlines()[-1] if out.strip() else f"status {status}"
        fix = ("start it: systemctl start docker, and make sure this user may use it "
               "(docker group)") if settings.runtime == "docker" else \
            "check `podman info` as the user airgate runs as"
        raise LaunchError(f"{binary} version failed ({last}): {fix}")
    if settings.offline:
        status, out = await run_quiet(binary, "image", "inspect", settings.image, limit=20)
        if status != 0:
            raise LaunchError(f"image {settings.image} is not on this host and offline = true "
                              f"never pulls: load it (airgate unbundle, {settings.runtime} load "
                              f"-i FILE) or fix launcher.image")


async def check_gpus(settings: LauncherSettings) -> None:
    """With nvidia-smi present: at least tensor_parallel_size GPUs are visible."""
    tp = settings.tensor_parallel_size
    ids = gpu_ids(settings.gpus)
    if ids is not None and ids and len(ids) < tp:
        raise LaunchError(f"launcher.gpus = {settings.gpus!r} gives {len(ids)} GPU(s) but "
                          f"tensor_parallel_size = {tp}: list more GPUs or lower "
                          f"tensor_parallel_size")
    smi = shutil.which("nvidia-smi")
    if smi is None or ids == []:
        return  # no NVIDIA tools on this host (or no GPUs asked for): vLLM will tell
    status, out = await run_quiet(smi, "--query-gpu=index", "--format=csv,noheader", limit=30)
    if status != 0:
        raise LaunchError(f"nvidia-smi failed ({out.strip()[:200]}): check the NVIDIA driver "
                          f"(is the kernel module loaded? reboot after a driver update)")
    visible = [line.strip() for line in out.splitlines() if line.strip()]
    if len(visible) < tp:
        raise LaunchError(f"tensor_parallel_size = {tp} but nvidia-smi sees {len(visible)} "
                          f"GPU(s): set launcher.tensor_parallel_size to at most {len(visible)}")
    missing = [gpu for gpu in ids or [] if gpu not in visible]
    if missing:
        raise LaunchError(f"launcher.gpus names GPU(s) {', '.join(missing)} but nvidia-smi "
                          f"sees only {', '.join(visible)}: fix launcher.gpus")


def check_files(settings: LauncherSettings) -> dict[str, str]:
    """Secret files are readable (returns their values) and the model cache exists."""
    secrets = read_secrets(settings)
    cache = Path(settings.hf_cache)
    # A model given as a local directory (process runtime) does not need the cache.
    if not cache.is_dir() and not Path(settings.model).is_dir():
        raise LaunchError(f"launcher.hf_cache {cache} is not a directory: create it "
                          f"(mkdir -p {cache}) and put the model there, or fix the path")
    return secrets


def check_port(port: int) -> None:
    """Nothing listens on 127.0.0.1:port (vLLM would fail only after loading the model)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: a port with connections in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot bind 127.0.0.1:{port}: {error.strerror}") from error
            raise LaunchError(f"port {port} on 127.0.0.1 is already in use: stop what listens "
                              f"there (ss -ltnp 'sport = :{port}'; an old vLLM container? "
                              f"docker ps) or change launcher.port") from error


async def check_all(settings: LauncherSettings, binary: str) -> LaunchCommand:
    """Every check that does not depend on what is running, then the command they allow."""
    await check_runtime(settings, binary)
    await check_gpus(settings)
    # offline: the model must already be in hf_cache (the image was checked with the runtime);
    # scan_cache_dir reads the disk, so off the loop
    await asyncio.to_thread(offline.check_model, settings)
    return build_command(settings, check_files(settings), binary)
