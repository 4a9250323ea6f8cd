"""Reading vLLM's output: load progress, crash explanations; the state file and its rendering."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from proxy.launcher.commands import format_status
from proxy.launcher.diagnose import LoadProgress, explain_exit
from proxy.launcher.status import LauncherStatus, read_state_file, write_state_file


def test_progress_from_vllm_output() -> None:
    progress = LoadProgress()
    assert progress.describe() == "loading model"
    assert not progress.feed("INFO 06-01 12:00:00 [config.py:1] This model supports tools")
    assert progress.feed("model-00001-of-00002.safetensors:  40%|████      | 2.0G/4.9G [00:30<]")
    assert progress.describe() == "loading model (downloading weights 40%)"
    assert progress.value == pytest.approx(0.12)
    lines = [f"Loading safetensors checkpoint shards: {pct:3d}% Completed | {n}/2 [00:01<00:01]"
             for n, pct in ((0, 0), (1, 50), (2, 100))]
    values = []
    for line in lines:
        progress.feed(f"INFO 06-01 12:00:01 [loader.py:42] {line}")
        values.append(progress.value)
    assert progress.describe() == "loading model (loading weights 100%)"
    assert values == sorted(values) and values[-1] == pytest.approx(0.8)
    # tqdm of a second file restarts at 0%: the overall value never goes back.
    progress.feed("model-00002-of-00002.safetensors:  10%|█         |")
    assert progress.value == pytest.approx(0.8)
    progress.feed("Capturing CUDA graph shapes:  50%|█████     | 33/67 [00:05<00:05]")
    assert progress.describe() == "loading model (capturing CUDA graphs 50%)"
    progress.feed("INFO:     Application startup complete.")
    assert progress.value == pytest.approx(0.99)


@pytest.mark.parametrize(("code", "tail", "expected"), [
    (137, [], "exit 137: killed (SIGKILL) — out of memory?"),
    (1, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"],
     "exit 1: CUDA out of memory: lower gpu_memory_utilization or raise tensor_parallel_size"),
    (1, ["ValueError: No available memory for the cache blocks. Try increasing "
         "`gpu_memory_utilization` when initializing the engine."],
     "exit 1: not enough GPU memory for the KV cache"),
    (1, ["huggingface_hub.errors.GatedRepoError: 401 Client Error."],
     "exit 1: the model is gated or private: set hf_token_file"),
    (1, ["huggingface_hub.errors.LocalEntryNotFoundError: Cannot find the requested files"],
     "exit 1: the model is not in the Hugging Face cache and the launcher is offline"),
    (125, ["docker: Error response from daemon: could not select device driver \"\" with "
           "capabilities: [[gpu]]."], "exit 125: no GPU visible to vLLM"),
    (125, ["docker: Error response from daemon: Conflict. The container name is in use"],
     "exit 125: the container runtime could not create the container: docker: Error response"),
    (127, [], "exit 127: command not found"),
    (2, ["usage: vllm serve", "vllm serve: error: unrecognized arguments: --bogus"],
     "exit 2: vLLM rejected its arguments"),
    (1, ["INFO starting", "RuntimeError: Engine core initialization failed.", "INFO bye"],
     "exit 1: failed: RuntimeError: Engine core initialization failed."),
    (0, [], "exit 0: exited by itself with status 0"),
    (-9, [], "exit -9: killed (SIGKILL) — out of memory?"),
    (129, [], "exit 129: killed by SIGHUP"),
    (None, [], "exit ?: ended (status unknown)"),
])
def test_crash_explanations(code: int | None, tail: list[str], expected: str) -> None:
    assert explain_exit(code, tail).startswith(expected)


def test_oom_killer() -> None:
    assert explain_exit(137, [], oom_killed=True) == \
        "exit 137: killed by the kernel's OOM killer: the host is short of memory"


def test_state_file_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "run" / "launcher.json"
    status = LauncherStatus(state="loading", progress=0.5, message="loading model (x 50%)",
                            since=1.0, restarts=2)
    write_state_file(str(path), status, {"child_pid": 42})
    data = read_state_file(str(path))
    assert data is not None and data["state"] == "loading" and data["child_pid"] == 42
    assert LauncherStatus.from_json(data) == status
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == ["launcher.json"]  # no temp left behind
    assert read_state_file(str(tmp_path / "none.json")) is None
    (tmp_path / "bad.json").write_text("{half")
    assert read_state_file(str(tmp_path / "bad.json")) is None


def test_status_rendering() -> None:
    now = time.time()
    ready = LauncherStatus(state="ready", message="ready", since=now - 90, restarts=1,
                           last_exit_reason="exit 137: killed (SIGKILL) — out of memory?",
                           ready_at=now - 3700, time_to_ready=75, runtime="docker",
                           model="m", child="airgate-vllm", pid=os.getpid())
    text, code = format_status(json.loads(json.dumps(ready.to_json())), now)
    assert code == 0
    assert "state:    ready since 1m 30s — ready" in text
    assert "uptime:   1h 1m 40s ready, loaded in 1m 15s" in text
    assert "restarts: 1" in text and "last exit: exit 137: killed" in text
    loading = LauncherStatus(state="loading", progress=0.42, message="loading model",
                             since=now, started_at=now - 5, pid=os.getpid())
    text, code = format_status(loading.to_json(), now)
    assert code == 1 and "progress: 42%" in text and "uptime:   5s since start" in text
    fatal = LauncherStatus(state="fatal", message="gave up", since=now, pid=os.getpid())
    assert format_status(fatal.to_json(), now)[1] == 2
    gone = LauncherStatus(state="ready", since=now, pid=2**22 + 12345)
    text, code = format_status(gone.to_json(), now)
    assert code == 3 and "launcher: not running" in text
