"""The supervisor against the stand-in docker/podman: states, backoff, fatal, adoption, stop."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from fake_runtime.harness import (
    API_KEY,
    HF_TOKEN,
    FakeRuntime,
    install_fake_runtime,
    make_settings,
    supervise,
)

from proxy.launcher.command import build_command, read_secrets
from proxy.launcher.runtime import run_quiet
from proxy.launcher.status import read_state_file
from proxy.settings import LauncherSettings


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    runtime = install_fake_runtime(tmp_path, monkeypatch)
    yield runtime
    runtime.kill_all()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def cli(*argv: str) -> str:
    status, out = await run_quiet(*argv)
    assert status == 0, out
    return out


def assert_no_secret_in_argv(fake: FakeRuntime) -> None:
    for argv in fake.calls():
        for arg in argv:
            assert API_KEY not in arg and HF_TOKEN not in arg, argv


async def test_start_load_ready_and_clean_stop(tmp_path: Path, fake: FakeRuntime,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RUNTIME_LOAD_SECONDS", "0.4")
    settings = make_settings(tmp_path, fake)
    async with supervise(settings) as run:
        await run.watch.until("starting")
        loading = await run.watch.until(lambda s: s.state == "loading" and "50%" in s.message)
        assert loading.message == "loading model (loading weights 50%)"
        assert loading.progress == pytest.approx(0.55)
        ready = await run.watch.until("ready")
        assert ready.progress == 1.0 and ready.retry_after == 1
        assert ready.time_to_ready is not None and ready.time_to_ready > 0.3
        assert run.supervisor.status().health_latency is not None
        container = fake.container(settings.container_name)
        assert container is not None and container["status"] == "running"
        # The key reached vLLM through the env file: it guards /v1 with it.
        url = f"http://127.0.0.1:{settings.port}/v1/models"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                assert response.status == 401
            async with session.get(url, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
                assert resp.status == 200
        state = read_state_file(settings.state_file)
        assert state is not None and state["state"] == "ready"
        assert state["child"] == settings.container_name
        await run.finish()
    assert run.watch.states() == ["starting", "loading", "ready", "stopping", "stopped"]
    verbs = fake.verbs()
    assert verbs[:4] == ["version", "image", "inspect", "run"]
    assert sorted(verbs[4:6]) == ["logs", "wait"]  # started together
    stop_and_rm = [call for call in fake.calls() if call[0] in ("stop", "rm")]
    assert stop_and_rm == [["stop", "-t", "3", settings.container_name],
                           ["rm", "-f", settings.container_name]]
    assert not pid_alive(container["pid"])
    assert fake.container(settings.container_name) is None
    # The env file: 0600 in a 0700 directory while `run` read it, gone right after.
    run_record = next(r for r in fake.records() if r["argv"][0] == "run")
    # Exactly the command `airgate launch --print` shows, the env file's path filled in.
    recorded = run_record["argv"]
    env_file = recorded[recorded.index("--env-file") + 1]
    assert Path(env_file).parent == Path(settings.state_file).parent / "private"
    command = build_command(settings, read_secrets(settings), settings.runtime_command)
    assert recorded == list(command.argv_with_env_file(env_file)[1:])
    assert run_record["env_file"]["mode"] == "0o600"
    assert run_record["env_file"]["dir_mode"] == "0o700"
    assert run_record["env_file"]["names"] == ["VLLM_API_KEY", "HF_TOKEN",
                                               "HUGGING_FACE_HUB_TOKEN"]
    assert list((Path(settings.state_file).parent / "private").iterdir()) == []
    assert_no_secret_in_argv(fake)
    final = read_state_file(settings.state_file)
    assert final is not None and final["state"] == "stopped"


async def test_crash_backoff_restart(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.plan([{"exit_code": 137, "after": 0, "log": ["INFO loading weights"]}, {}])
    settings = make_settings(tmp_path, fake)
    async with supervise(settings) as run:
        backoff = await run.watch.until("backoff")
        assert backoff.message == \
            "restarting in 0.05 s after: exit 137: killed (SIGKILL) — out of memory?"
        assert backoff.last_exit_code == 137 and 1 <= backoff.retry_after <= 30
        ready = await run.watch.until("ready")
        assert ready.restarts == 1
        assert ready.last_exit_reason == "exit 137: killed (SIGKILL) — out of memory?"
    assert run.watch.states()[:6] == ["starting", "loading", "backoff", "starting", "loading",
                                      "ready"]
    # The dead container was removed before the second run took its name.
    calls = fake.calls()
    runs = [i for i, call in enumerate(calls) if call[0] == "run"]
    assert len(runs) == 2
    assert ["rm", "-f", settings.container_name] in calls[runs[0]:runs[1]]


async def test_backoff_grows_to_its_cap_then_fatal(tmp_path: Path, fake: FakeRuntime,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RUNTIME_EXIT_CODE", "1")
    monkeypatch.setenv("FAKE_RUNTIME_EXIT_AFTER", "0")
    monkeypatch.setenv("FAKE_RUNTIME_EXIT_LOG",
                       "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB")
    settings = make_settings(tmp_path, fake, backoff_initial=0.05, backoff_max=0.15,
                             max_quick_failures=5)
    async with supervise(settings) as run:
        fatal = await run.watch.until("fatal")
        delays = [s.message.split(" s after")[0] for s in run.watch.history
                  if s.state == "backoff"]
        assert delays == ["restarting in 0.05", "restarting in 0.1", "restarting in 0.15",
                          "restarting in 0.15"]
        reason = "exit 1: CUDA out of memory: lower gpu_memory_utilization or raise " \
                 "tensor_parallel_size"
        assert fatal.last_exit_reason == reason
        assert fatal.message.startswith("gave up after 5 failures in a row")
        assert fatal.retry_after == 30 and fatal.restarts == 4
        # Fatal holds until stopped: nothing is started again.
        assert fake.verbs().count("run") == 5
    assert run.watch.states()[-2:] == ["fatal", "stopped"]


async def test_a_stable_run_resets_the_backoff(tmp_path: Path, fake: FakeRuntime) -> None:
    quick = {"exit_code": 1, "after": 0}
    # Two quick failures, then a run that is ready past stable_after and then dies, then more.
    fake.plan([quick, quick, {"exit_code": 1, "after": 2.0}, quick, quick, {}])
    settings = make_settings(tmp_path, fake, stable_after=0.3, max_quick_failures=3,
                             backoff_initial=0.05, backoff_max=10)
    async with supervise(settings) as run:
        await run.watch.until("ready")
        # The sixth run: the stable one's death did not count, so no fatal came in between.
        await run.watch.until(lambda s: s.state == "ready" and s.restarts == 5)
        delays = [s.message.split(" s after")[0] for s in run.watch.history
                  if s.state == "backoff"]
        assert delays == ["restarting in 0.05", "restarting in 0.1", "restarting in 0.05",
                          "restarting in 0.05", "restarting in 0.1"]
        assert "fatal" not in run.watch.states()


async def test_adopts_a_running_container_with_the_same_config(
        tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake)
    # What an airgate that was killed leaves behind: the container it started, still running.
    command = build_command(settings, read_secrets(settings), settings.runtime_command)
    env_file = tmp_path / "adopt.env"
    env_file.write_text(command.env_file_content())
    await cli(*command.argv_with_env_file(str(env_file)))
    runs_before = fake.verbs().count("run")
    async with supervise(settings) as run:
        loading = await run.watch.until("loading")
        assert loading.message.startswith("adopted the running container")
        await run.watch.until("ready")
    assert fake.verbs().count("run") == runs_before == 1  # no second run, no model reload
    assert ["logs", "-f", "--tail", "200", settings.container_name] in fake.calls()
    assert ["rm", "-f", settings.container_name] in fake.calls()


@pytest.mark.parametrize("stale", ["other-config", "exited"])
async def test_a_stale_container_is_removed(tmp_path: Path, fake: FakeRuntime,
                                            stale: str) -> None:
    settings = make_settings(tmp_path, fake)
    older = make_settings(tmp_path, fake, container_name=settings.container_name,
                          port=settings.port, extra_args=("--max-model-len", "4096"))
    if stale == "exited":
        fake.plan([{"exit_code": 1, "after": 0}])
        older = settings
    command = build_command(older, {}, older.runtime_command)
    await cli(*command.argv)
    if stale == "exited":  # wait for the planned death (the fake's `wait` blocks until it)
        await cli(fake.binary(), "wait", settings.container_name)
    async with supervise(settings) as run:
        await run.watch.until("ready")
    calls = fake.calls()
    second_run = [i for i, call in enumerate(calls) if call[0] == "run"][1]
    assert ["rm", "-f", settings.container_name] in calls[:second_run]
    if stale == "other-config":
        assert ["stop", "-t", "3", settings.container_name] in calls[:second_run]


async def test_start_timeout_counts_as_a_failure(tmp_path: Path, fake: FakeRuntime,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RUNTIME_LOAD_SECONDS", "30")
    settings = make_settings(tmp_path, fake, start_timeout=1.0, max_quick_failures=1)
    async with supervise(settings) as run:
        fatal = await run.watch.until("fatal")
        assert fatal.last_exit_reason.startswith(
            "not ready after 1 s (start_timeout) while loading model (loading weights")
        container_pid = None
    assert ["stop", "-t", "3", settings.container_name] in fake.calls()
    assert fake.container(settings.container_name) is None
    del container_pid


async def test_stop_while_loading(tmp_path: Path, fake: FakeRuntime,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RUNTIME_LOAD_SECONDS", "30")
    settings = make_settings(tmp_path, fake)
    async with supervise(settings) as run:
        await run.watch.until(lambda s: s.state == "loading" and s.progress is not None)
        container = fake.container(settings.container_name)
        assert container is not None
        await run.finish()
    assert run.watch.states()[-2:] == ["stopping", "stopped"]
    assert not pid_alive(container["pid"])
    assert fake.container(settings.container_name) is None


async def test_port_in_use_is_reported_before_start(tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake, max_quick_failures=1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.port))
        squatter.listen()
        async with supervise(settings) as run:
            fatal = await run.watch.until("fatal")
    assert fatal.last_exit_reason.startswith(
        f"port {settings.port} on 127.0.0.1 is already in use: stop what listens there")
    assert fatal.last_exit_code is None
    assert "run" not in fake.verbs()


async def test_docker_run_failure_is_explained(tmp_path: Path, fake: FakeRuntime,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RUNTIME_MISSING_IMAGES", "vllm/vllm-openai:v0.9.1")
    settings = make_settings(tmp_path, fake, offline=False, max_quick_failures=1)
    async with supervise(settings) as run:
        fatal = await run.watch.until("fatal")
    assert fatal.last_exit_code == 125
    assert fatal.last_exit_reason.startswith("exit 125: the image is not on this host")


@pytest.mark.parametrize(("setup", "expected"), [
    ("broken", "version failed (Cannot connect to the Docker daemon"),
    ("missing-image", "image vllm/vllm-openai:v0.9.1 is not on this host and offline = true"),
    ("no-binary", "launcher.runtime_command"),
    ("unreadable-key", "launcher.api_key_file"),
    ("no-cache", "launcher.hf_cache"),
    ("gpus", "tensor_parallel_size = 2 but nvidia-smi sees 1 GPU(s)"),
])
async def test_prestart_checks_name_the_fix(tmp_path: Path, fake: FakeRuntime,
                                            monkeypatch: pytest.MonkeyPatch, setup: str,
                                            expected: str) -> None:
    overrides: dict[str, object] = {"max_quick_failures": 1}
    if setup == "broken":
        monkeypatch.setenv("FAKE_RUNTIME_BROKEN", "1")
    elif setup == "missing-image":
        monkeypatch.setenv("FAKE_RUNTIME_MISSING_IMAGES", "vllm/vllm-openai:v0.9.1")
    elif setup == "no-binary":
        overrides["runtime_command"] = str(tmp_path / "nowhere" / "docker")
    elif setup == "unreadable-key":
        overrides["api_key_file"] = str(tmp_path / "missing-key")
    elif setup == "no-cache":
        overrides["hf_cache"] = str(tmp_path / "no-cache")
    elif setup == "gpus":
        fake.fake_tool("nvidia-smi", "echo 0")
        overrides["tensor_parallel_size"] = 2
    settings: LauncherSettings = make_settings(tmp_path, fake, **overrides)
    async with supervise(settings) as run:
        fatal = await run.watch.until("fatal")
    assert expected in fatal.last_exit_reason
    assert "run" not in fake.verbs()


async def test_podman(tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake, runtime="podman", gpus="1")
    async with supervise(settings) as run:
        await run.watch.until("ready")
    records = fake.records()
    assert {r["prog"] for r in records} == {"podman"}
    run_argv = next(r["argv"] for r in records if r["argv"][0] == "run")
    assert run_argv[run_argv.index("--device") + 1] == "nvidia.com/gpu=0"
    assert "--gpus" not in run_argv
    assert [r["argv"][:2] for r in records if r["argv"][0] in ("stop", "rm")] == \
        [["stop", "-t"], ["rm", "-f"]]


async def test_listener_errors_do_not_stop_supervision(tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake)
    async with supervise(settings) as run:
        def broken(_status: object) -> None:
            raise RuntimeError("listener bug")
        run.supervisor.add_listener(broken)
        await run.watch.until("ready")
    state = read_state_file(settings.state_file)
    assert state is not None and state["state"] == "stopped"


async def test_cancelled_run_still_cleans_up(tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake)
    async with supervise(settings) as run:
        await run.watch.until("ready")
        run.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run.task
    assert fake.container(settings.container_name) is None


async def test_keep_running_leaves_the_container_for_the_next_airgate(
        tmp_path: Path, fake: FakeRuntime) -> None:
    settings = make_settings(tmp_path, fake)
    async with supervise(settings, keep_running=True) as run:
        await run.watch.until("ready")
    assert run.watch.states()[-2:] == ["ready", "stopped"]
    container = fake.container(settings.container_name)
    assert container is not None and pid_alive(container["pid"])
    assert not [call for call in fake.calls() if call[0] in ("stop", "rm")]
    async with supervise(settings) as run:  # a restarted airgate: adopts, no model reload
        loading = await run.watch.until("loading")
        assert loading.message.startswith("adopted")
        await run.watch.until("ready")
    assert fake.verbs().count("run") == 1
    assert not pid_alive(container["pid"])
