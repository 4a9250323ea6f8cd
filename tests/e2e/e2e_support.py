"""Helpers shared by the e2e fixtures and tests: processes, polling, SSE and metrics parsing."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("AIRGATE_E2E_CACHE", REPO / ".e2e-cache"))
VLLM_VENV = Path(os.environ.get("AIRGATE_E2E_VLLM_VENV", CACHE / "vllm-venv"))
MODEL_DIR = Path(os.environ.get("AIRGATE_E2E_MODEL_DIR", CACHE / "tinymodel"))
NODE_DIR = Path(os.environ.get("AIRGATE_E2E_NODE_DIR", CACHE / "node"))
SHIM = HERE / "vllm_shim.py"
SERVED_NAME = "tiny"
MAX_MODEL_LEN = 2048
# Everything vLLM needs beyond model/host/port/key; shared by the fixture and the launcher test.
VLLM_ARGS: tuple[str, ...] = (
    "--served-model-name", SERVED_NAME,
    "--max-model-len", str(MAX_MODEL_LEN),
    "--dtype", "float32",
    "--enforce-eager",  # compiling costs ~20 s more and gains nothing here
    "--kv-cache-memory-bytes", str(64 * 1024 * 1024),  # ~1.5 GB RSS instead of most of RAM
    "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
)

T = TypeVar("T")


def vllm_command() -> list[str]:
    """The command that provides `serve` (the launcher's `vllm_command`)."""
    return [str(VLLM_VENV / "bin" / "python"), str(SHIM)]


def vllm_env(api_key: str) -> dict[str, str]:
    env = dict(os.environ)
    # Overrides --kv-cache-memory-bytes when set (in whole GiB): must stay unset.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(VLLM_API_KEY=api_key, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2,
             alive: Callable[[], str | None] | None = None) -> T:
    """Poll `check` until it returns something other than None; `alive` returns a reason to
    give up early (a process that died)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if alive is not None and (reason := alive()) is not None:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Service:
    """A server process started in its own session, so its whole process group (vLLM's engine
    children included) can be stopped together."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> Service:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env or os.environ),
                                    cwd=cwd, start_new_session=True)
        return cls(name, proc, log)

    def died(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        return f"{self.name} exited with {code}; log {self.log}:\n{tail(self.log)}"

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the group, SIGKILL what is left after `grace`; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader (vLLM's EngineCore)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode


@dataclass(frozen=True)
class Vllm:
    """A real `vllm serve` on loopback, reached directly (for comparison and its metrics)."""

    url: str
    key: str
    key_file: Path
    model: str
    service: Service

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, headers=self.headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        return scrape(f"{self.url}/metrics")


@dataclass(frozen=True)
class Airgate:
    """`airgate serve` (or `airgate run`) with trustme certificates, in front of vLLM."""

    url: str
    token: str
    token_name: str
    ca_file: Path
    ssl_context: ssl.SSLContext
    metrics_url: str
    service: Service
    config: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs: Any) -> httpx2.Client:
        options: dict[str, Any] = {"base_url": self.url, "headers": self.headers,
                                   "verify": self.ssl_context, "timeout": 60}
        options.update(kwargs)
        return httpx2.Client(**options)


# ------------------------------------------------------------------ SSE, as clients parse it
@dataclass
class StreamResult:
    status: int
    headers: httpx2.Headers
    events: list[dict[str, Any]]  # parsed `data: {...}` events, [DONE] excluded
    times: list[float]  # seconds from request start to each event's arrival
    done: bool  # `data: [DONE]` seen
    raw_lines: list[str]

    @property
    def text(self) -> str:
        return "".join((e["choices"][0]["delta"].get("content") or "") for e in self.events
                       if e.get("choices"))


def stream_chat(client: httpx2.Client, body: dict[str, Any]) -> StreamResult:
    """POST a streamed chat completion and record each SSE event with its arrival time."""
    t0 = time.monotonic()
    events: list[dict[str, Any]] = []
    times: list[float] = []
    lines: list[str] = []
    done = False
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            lines.append(line)
            # Kibana's parser keeps only `data: ` lines; everything else must be ignorable.
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            events.append(json.loads(data))
            times.append(time.monotonic() - t0)
        return StreamResult(response.status_code, response.headers, events, times, done, lines)


def chat_body(content: str = "Hello world", **extra: Any) -> dict[str, Any]:
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], **extra}


# ------------------------------------------------------------------ Prometheus text
def parse_metrics(text: str) -> dict[str, float]:
    """'name{label="v",...}' -> value, with labels sorted; plus bare-name sums."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def scrape(url: str, verify: ssl.SSLContext | bool = True) -> dict[str, float]:
    response = httpx2.get(url, timeout=10, verify=verify)
    response.raise_for_status()
    return parse_metrics(response.text)


def sum_matching(values: Mapping[str, float], predicate: Callable[[str], bool]) -> float:
    return sum(v for k, v in values.items() if "{" in k and predicate(k))


def processes_matching(*needles: str) -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of live processes whose argv contains every needle."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(any(n in a for a in argv) for n in needles):
            yield int(entry.name), argv


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


# ------------------------------------------------------------------ starting the servers
AIRGATE_BIN = Path(sys.executable).with_name("airgate")
VLLM_START_TIMEOUT = float(os.environ.get("AIRGATE_E2E_VLLM_TIMEOUT", "300"))
TOKEN_NAME = "kibana"


def _require_cache() -> None:
    stamp = VLLM_VENV / ".airgate-e2e-installed"
    if not stamp.exists() or not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"no vLLM cache at {VLLM_VENV} / {MODEL_DIR}: run tests/e2e/setup_vllm.sh "
                    f"(or `make e2e`, which runs it)", pytrace=False)


def start_vllm(workdir: Path, port: int | None = None) -> Vllm:
    _require_cache()
    port = port or free_port()
    key = "vllm-" + secrets.token_urlsafe(16)
    key_file = workdir / "vllm.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    # The key goes in through the environment, never argv (visible in `ps`).
    argv = [*vllm_command(), "serve", str(MODEL_DIR), "--host", "127.0.0.1",
            "--port", str(port), *VLLM_ARGS]
    service = Service.start("vllm", argv, workdir / "vllm.log", env=vllm_env(key), cwd=workdir)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool | None:
        try:
            return httpx2.get(f"{url}/health", timeout=2).status_code == 200 or None
        except httpx2.TransportError:
            return None  # no HTTP server at all while the model loads

    try:
        wait_for("vLLM /health", healthy, VLLM_START_TIMEOUT, interval=0.25, alive=service.died)
    except BaseException:
        service.stop()
        raise
    return Vllm(url=url, key=key, key_file=key_file, model=SERVED_NAME, service=service)


def new_token(tokens_file: Path, name: str) -> str:
    """`airgate token new NAME --file F` prints the token once on stdout."""
    out = subprocess.run([str(AIRGATE_BIN), "token", "new", name, "--file", str(tokens_file)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.search(r"\bag-[A-Za-z0-9_\-]+", out)
    token = match.group(0) if match else out.strip().splitlines()[-1].strip()
    assert token, f"`airgate token new` printed no token: {out!r}"
    return token


def airgate_config(workdir: Path, pki: dict[str, Path], *, upstream_port: int,
                   api_key_file: Path, tokens_file: Path, https_port: int, metrics_port: int,
                   launcher: dict[str, object] | None = None) -> Path:
    def toml(value: object) -> str:
        return json.dumps(value)  # JSON strings, numbers and arrays are valid TOML

    sections: dict[str, dict[str, object]] = {
        "listen": {"https": f"127.0.0.1:{https_port}", "http": "", "server_name": "localhost",
                   "cert": str(pki["cert"]), "key": str(pki["key"])},
        "auth": {"tokens_file": str(tokens_file)},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}",
                     "api_key_file": str(api_key_file), "read_timeout": 120},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "log": {"access": "combined"},
    }
    if launcher is not None:
        sections["launcher"] = launcher
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in keys.items()) + "\n"
                   for name, keys in sections.items())
    path = workdir / "airgate.toml"
    path.write_text(text)
    return path


def ssl_context(pki: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def start_airgate(workdir: Path, pki: dict[str, Path], command: str, config: Path,
                  https_port: int, metrics_port: int, token: str,
                  ready_timeout: float = 60.0) -> Airgate:
    """Start `airgate serve|run --config F` and wait until GET /healthz answers 200 ready."""
    service = Service.start(f"airgate {command}",
                            [str(AIRGATE_BIN), command, "--config", str(config)],
                            workdir / f"airgate-{command}.log", cwd=workdir)
    context = ssl_context(pki)
    url = f"https://127.0.0.1:{https_port}"
    gate = Airgate(url=url, token=token, token_name=TOKEN_NAME, ca_file=pki["ca"],
                   ssl_context=context, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
                   service=service, config=config)
    if ready_timeout <= 0:
        return gate

    def ready() -> bool | None:
        try:
            response = httpx2.get(f"{url}/healthz", verify=context, timeout=2)
        except httpx2.TransportError:
            return None
        return (response.status_code == 200 and response.json() == {"status": "ready"}) or None

    try:
        wait_for(f"airgate {command} /healthz ready", ready, ready_timeout, alive=service.died)
    except AssertionError:
        service.stop()
        log = tail(service.log)
        if "No module named 'proxy." in log:
            pytest.skip(f"`airgate {command}` is not implemented yet:\n{log}")
        raise
    return gate


