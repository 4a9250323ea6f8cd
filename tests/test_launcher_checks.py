"""Checks before a start (each names its fix), and the Retry-After the launcher suggests."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from fake_runtime.harness import make_settings

from proxy.launcher import checks
from proxy.launcher.command import LaunchError
from proxy.launcher.status import LauncherStatus, retry_after


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory first on PATH, for stand-in nvidia-smi and friends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def nvidia_smi(bin_dir: Path, script: str) -> None:
    path = bin_dir / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


async def test_gpu_count(tmp_path: Path, tools: Path) -> None:
    nvidia_smi(tools, 'echo 0; echo 1')
    await checks.check_gpus(make_settings(tmp_path, tensor_parallel_size=2))
    await checks.check_gpus(make_settings(tmp_path, tensor_parallel_size=2, gpus="1,0"))
    with pytest.raises(LaunchError, match=r"tensor_parallel_size = 4 but nvidia-smi sees 2 GPU"
                                          r"\(s\): set launcher.tensor_parallel_size to at most 2"):
        await checks.check_gpus(make_settings(tmp_path, tensor_parallel_size=4))
    with pytest.raises(LaunchError, match=r"names GPU.s. 3 but nvidia-smi sees only 0, 1"):
        await checks.check_gpus(make_settings(tmp_path, gpus="0,3"))
    with pytest.raises(LaunchError, match=r"launcher.gpus = '1' gives 1 GPU.s. but "
                                          r"tensor_parallel_size = 2"):
        await checks.check_gpus(make_settings(tmp_path, gpus="1", tensor_parallel_size=2))


async def test_gpu_driver_trouble(tmp_path: Path, tools: Path) -> None:
    nvidia_smi(tools, 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the '
                      'NVIDIA driver." >&2; exit 9')
    with pytest.raises(LaunchError, match=r"nvidia-smi failed .*couldn't communicate.*: check "
                                          r"the NVIDIA driver"):
        await checks.check_gpus(make_settings(tmp_path))


async def test_without_nvidia_tools_the_gpu_check_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    await checks.check_gpus(make_settings(tmp_path, tensor_parallel_size=8))


async def test_runtime_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match=r"podman not found on PATH: install it, set "
                                          r"launcher.runtime_command"):
        checks.find_binary(make_settings(tmp_path, runtime="podman"))
    with pytest.raises(LaunchError, match="not an executable file"):
        checks.find_binary(make_settings(tmp_path, runtime_command=str(tmp_path)))
    assert checks.find_binary(make_settings(tmp_path, runtime="process")) == ""
    with pytest.raises(LaunchError, match=r"launcher.vllm_command 'vllm' not found: install "
                                          r"vLLM \(pip install vllm\)"):
        await checks.check_runtime(make_settings(tmp_path, runtime="process",
                                                 vllm_command=("vllm",)), "")


def test_port_check(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is already in use"):
            checks.check_port(port)
    checks.check_port(port)  # free again


def test_retry_after() -> None:
    now = time.time()
    assert retry_after(LauncherStatus(state="ready"), 0) == 1
    assert retry_after(LauncherStatus(state="loading"), 0) == 10  # no progress known yet
    # 60 s for the first 50%: about 60 s to go, capped at 30 for clients that retry.
    half = LauncherStatus(state="loading", progress=0.5, started_at=now - 60)
    assert retry_after(half, 0) == 30
    nearly = LauncherStatus(state="loading", progress=0.9, started_at=now - 18)
    assert retry_after(nearly, 0) == 2
    assert retry_after(LauncherStatus(state="backoff"), 4.2) == 5
    assert retry_after(LauncherStatus(state="backoff"), -3) == 1
    assert retry_after(LauncherStatus(state="fatal"), 0) == 30
