"""`airgate run` with the launcher's `process` runtime supervising a real `vllm serve`:
loading -> ready, a killed engine is restarted, and clients get 503 + Retry-After meanwhile."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from e2e_support import (
    MODEL_DIR,
    REPO,
    SERVED_NAME,
    TOKEN_NAME,
    VLLM_ARGS,
    Airgate,
    airgate_config,
    chat_body,
    free_port,
    new_token,
    parent_pid,
    processes_matching,
    start_airgate,
    vllm_command,
    wait_for,
)

LOAD_TIMEOUT = 300.0


def _launcher_missing() -> str | None:
    server = REPO / "proxy" / "server.py"
    launcher = REPO / "proxy" / "launcher"
    if not server.exists() or "def run_main" not in server.read_text():
        return "`airgate run` (proxy.server.run_main) is not implemented yet"
    if not any("class Supervisor" in p.read_text() for p in launcher.glob("*.py")):
        return "the launcher's Supervisor (proxy/launcher/) is not implemented yet"
    return None


pytestmark = [
    pytest.mark.skipif(_launcher_missing() is not None, reason=_launcher_missing() or ""),
    pytest.mark.timeout(LOAD_TIMEOUT + 120),  # a model load; the suite's default is 120 s
]


def engine_processes(port: int) -> list[int]:
    """The `vllm serve` the launcher started on `port`: its API server (whose parent is not
    itself a vLLM process) first, then every descendant (EngineCore, Worker)."""
    serving = {pid for pid, _ in processes_matching(str(Path(vllm_command()[1]).name), "serve",
                                                    str(port))}
    roots = [pid for pid in serving if parent_pid(pid) not in serving]
    found = list(roots)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            try:
                ancestor = parent_pid(pid)
                while ancestor > 1 and ancestor not in roots:
                    ancestor = parent_pid(ancestor)
            except (OSError, ValueError, IndexError):
                continue
            if ancestor in roots and pid not in found:
                found.append(pid)
    return found


def ask(gate: Airgate) -> httpx2.Response | None:
    try:
        with gate.client(timeout=30) as client:
            return client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
    except httpx2.TransportError:
        return None  # airgate's own listener is not up yet


def assert_unavailable(response: httpx2.Response) -> None:
    assert response.status_code == 503, response.text
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 30
    assert isinstance(response.json()["error"]["message"], str)


@pytest.fixture(scope="module")
def launched(pki: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Airgate, int]]:
    workdir = tmp_path_factory.mktemp("launcher")
    key_file = workdir / "vllm.key"
    key_file.write_text("vllm-" + secrets.token_urlsafe(16) + "\n")
    key_file.chmod(0o600)
    tokens = workdir / "tokens"
    token = new_token(tokens, TOKEN_NAME)
    hf_cache = workdir / "hf-cache"
    hf_cache.mkdir()
    vllm_port, https_port, metrics_port = free_port(), free_port(), free_port()
    launcher = {
        "runtime": "process",
        "vllm_command": vllm_command(),
        "model": str(MODEL_DIR),
        "served_model_name": SERVED_NAME,
        "preset": "",
        "port": vllm_port,
        "api_key_file": str(key_file),
        # served_model_name comes from its own key; everything else vLLM needs here.
        "extra_args": list(VLLM_ARGS[2:]),
        "state_file": str(workdir / "launcher.json"),
        # Not used by a local model directory, but the launcher checks that it exists.
        "hf_cache": str(hf_cache),
        "start_timeout": LOAD_TIMEOUT,
        "backoff_initial": 1.0,
        "health_interval": 0.5,
    }
    config = airgate_config(workdir, pki, upstream_port=vllm_port, api_key_file=key_file,
                            tokens_file=tokens, https_port=https_port,
                            metrics_port=metrics_port, launcher=launcher)
    gate = start_airgate(workdir, pki, "run", config, https_port, metrics_port, token,
                         ready_timeout=0)
    yield gate, vllm_port
    gate.service.stop(grace=60)
    leftovers = engine_processes(vllm_port)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"vLLM processes outlived `airgate run`: {leftovers}"


def test_loading_then_ready(launched: tuple[Airgate, int]) -> None:
    gate, port = launched
    seen_loading: list[httpx2.Response] = []

    def ready() -> bool | None:
        response = ask(gate)
        if response is None or response.status_code == 503:
            if response is not None:
                seen_loading.append(response)
            return None
        assert response.status_code == 200, response.text
        return True

    wait_for("the model to load under `airgate run`", ready, LOAD_TIMEOUT, interval=0.5,
             alive=gate.service.died)
    # vLLM has no HTTP server while it loads (~30 s here): airgate must have said so.
    assert seen_loading, "no 503 seen while the model was loading"
    assert_unavailable(seen_loading[0])
    assert engine_processes(port), "no vLLM process found for the launcher's port"


def test_killed_engine_is_restarted(launched: tuple[Airgate, int]) -> None:
    gate, port = launched
    assert (first := ask(gate)) is not None and first.status_code == 200
    victims = engine_processes(port)
    assert victims, "no vLLM process to kill"
    for pid in victims:  # like the OOM killer: the whole engine at once
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    during: list[httpx2.Response] = []

    def back() -> bool | None:
        response = ask(gate)
        assert response is not None, "airgate's listener went away with the engine"
        if response.status_code == 200:
            return True
        during.append(response)
        return None

    wait_for("the engine to be restarted", back, LOAD_TIMEOUT, interval=0.5,
             alive=gate.service.died)
    assert during, "no request was answered while the engine restarted"
    for response in during:
        assert_unavailable(response)
    new = engine_processes(port)
    assert new and not set(new) & set(victims)
    print(f"engine back after {time.monotonic() - killed_at:.1f}s, {len(during)} x 503")
