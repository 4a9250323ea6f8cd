"""The `process` runtime, for real: the stand-in vLLM (proxy.simulator) is the supervised child."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fake_runtime.harness import API_KEY, HF_TOKEN, make_settings, supervise

from proxy.launcher.command import build_command, read_secrets
from proxy.launcher.status import LauncherStatus, write_state_file
from proxy.settings import LauncherSettings

SIMULATOR = (sys.executable, "-m", "proxy.simulator")


@pytest.fixture(autouse=True)
def _no_gpu_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A real nvidia-smi (on a GPU machine) would be consulted; these tests are about processes.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 0\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield


def process_settings(tmp_path: Path, **overrides: object) -> LauncherSettings:
    values: dict[str, object] = {"runtime": "process", "vllm_command": SIMULATOR,
                                 "extra_args": ("--load-seconds", "0.3")}
    values.update(overrides)
    return make_settings(tmp_path, **values)


def python_command(code: str) -> tuple[str, ...]:
    """A `vllm_command` that runs `code` (the launcher appends `serve MODEL ...` as argv)."""
    return (sys.executable, "-c", code)


def read_proc(pid: int, name: str) -> list[bytes]:
    return Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


async def test_process_runtime_for_real(tmp_path: Path) -> None:
    settings = process_settings(tmp_path)
    async with supervise(settings) as run:
        loading = await run.watch.until(lambda s: s.state == "loading" and "%" in s.message)
        assert loading.message.startswith("loading model (loading weights")
        ready = await run.watch.until("ready")
        pid = int(ready.child)
        cmdline = read_proc(pid, "cmdline")
        assert cmdline[:6] == [part.encode() for part in (*SIMULATOR, "serve",
                                                           settings.model, "--host")]
        assert API_KEY.encode() not in b" ".join(cmdline)
        assert HF_TOKEN.encode() not in b" ".join(cmdline)
        environ = read_proc(pid, "environ")
        assert f"VLLM_API_KEY={API_KEY}".encode() in environ
        assert b"HF_HUB_OFFLINE=1" in environ
        assert os.getpgid(pid) == pid  # its own process group, for stopping its workers too
        url = f"http://127.0.0.1:{settings.port}/v1/models"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                assert resp.status == 200
        await run.finish()
    assert run.watch.states() == ["starting", "loading", "ready", "stopping", "stopped"]
    assert not alive(pid)


@pytest.mark.parametrize(("code", "reason"), [
    ("print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB', "
     "flush=True); raise SystemExit(1)",
     "exit 1: CUDA out of memory: lower gpu_memory_utilization or raise tensor_parallel_size"),
    ("import os; os.kill(os.getpid(), 9)", "exit 137: killed (SIGKILL) — out of memory?"),
])
async def test_process_crash_is_explained(tmp_path: Path, code: str, reason: str) -> None:
    settings = process_settings(tmp_path, vllm_command=python_command(code), extra_args=(),
                                max_quick_failures=2)
    async with supervise(settings) as run:
        backoff = await run.watch.until("backoff")
        assert backoff.last_exit_reason == reason
        fatal = await run.watch.until("fatal")
    assert fatal.restarts == 1 and fatal.last_exit_reason == reason


class WorkerPid(logging.Handler):
    """Catches the "worker PID" line the test's stand-in prints, as it reaches airgate's log."""

    def __init__(self, pid: asyncio.Future[int]) -> None:
        super().__init__()
        self.pid = pid

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if " worker " in text and not self.pid.done():
            self.pid.set_result(int(text.rsplit(" ", 1)[1]))


async def test_stop_escalates_to_sigkill_for_the_whole_group(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="airgate.vllm")
    # vLLM's main process may hang in shutdown; its tensor-parallel workers are its children.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print('worker', w.pid, flush=True); time.sleep(60)")
    settings = process_settings(tmp_path, vllm_command=python_command(code), extra_args=(),
                                stop_timeout=0.5)
    handler = WorkerPid(asyncio.get_running_loop().create_future())
    logging.getLogger("airgate.vllm").addHandler(handler)
    try:
        async with supervise(settings) as run:
            loading = await run.watch.until("loading")
            worker = await asyncio.wait_for(handler.pid, 10)
            main = int(loading.child)
            await run.finish()
    finally:
        logging.getLogger("airgate.vllm").removeHandler(handler)
    assert not alive(main) and not alive(worker)


async def test_a_killed_airgates_process_is_replaced(tmp_path: Path) -> None:
    settings = process_settings(tmp_path, extra_args=())
    command = build_command(settings, read_secrets(settings), "")
    # What a SIGKILLed airgate leaves (were PR_SET_PDEATHSIG not there): vLLM on the port, and
    # its pid in the state file.
    orphan = await asyncio.create_subprocess_exec(
        *command.argv, env={**os.environ, **command.env, **command.secret_env},
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert orphan.stdout is not None
    while b"Uvicorn running" not in await orphan.stdout.readline():
        pass
    write_state_file(settings.state_file, LauncherStatus(state="ready", runtime="process",
                                                         pid=2**22 + 1), {"child_pid": orphan.pid})
    async with supervise(settings) as run:
        ready = await run.watch.until("ready")
        assert int(ready.child) != orphan.pid
    await asyncio.wait_for(orphan.wait(), 5)  # it was stopped (SIGTERM, as for a clean stop)
