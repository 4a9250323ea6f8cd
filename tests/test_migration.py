"""Migrating from the seed guide's Nginx: `airgate import-nginx` on the seed's site config and on
both seed documents' `docker run` lines, then `airgate check` and `airgate serve` as separate
processes, and the result behaves like the Nginx site did: the same 301 on port 80, the seed's
token accepted, any other refused. Only the listen ports and vLLM's port are moved, with
AIRGATE_* environment overrides, so the test needs no root and no real vLLM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from conftest import free_port
from proxy.simulator import RunningSimulator, SimulatorConfig, start_simulator

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "tests" / "data" / "seeds"
DOMAIN = "llm.test.example"
SEED_TOKEN = "Seed-Token-3f9a1c7e-kept-from-nginx"
SEED_VLLM_KEY = "xxxx"  # the seeds' `--env VLLM_API_KEY=xxxx`, carried into vllm-api-key
LIVE = f"/etc/letsencrypt/live/{DOMAIN}"


def airgate(*args: str, cwd: Path, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRGATE_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def write_site(directory: Path) -> Path:
    """The seed's Nginx config with its placeholders filled in, and certificate files where
    it names them (moved from /etc/letsencrypt into the test directory)."""
    ca = trustme.CA()
    leaf = ca.issue_cert(DOMAIN)
    leaf.cert_chain_pems[0].write_to_path(str(directory / "fullchain.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    text = (SEEDS / "seed000-nginx-default.conf").read_text()
    for placeholder, value in (("/etc/letsencrypt/live/<yourdomainname.com>", str(directory)),
                               ("<yourdomainname.com>", DOMAIN),
                               ("<secret token>", SEED_TOKEN)):
        assert placeholder in text
        text = text.replace(placeholder, value)
    site = directory / "default.conf"
    site.write_text(text)
    return site


@dataclass
class Migrated:
    directory: Path
    config: Path
    settings: dict[str, Any]  # the TOML import-nginx wrote
    stderr: str


def import_seed(directory: Path, docker_command: str) -> Migrated:
    site = write_site(directory)
    result = airgate("import-nginx", str(site), "--docker-command", str(SEEDS / docker_command),
                     cwd=directory, env=clean_env())
    assert result.returncode == 0, result.stderr
    config = directory / "airgate.toml"
    config.write_text(result.stdout)
    return Migrated(directory, config, tomllib.loads(result.stdout), result.stderr)


@dataclass
class Served:
    https: int
    http: int
    env: dict[str, str]
    sim: RunningSimulator


@pytest.fixture(params=["seed000-docker-run.sh", "seed001-docker-run.sh"])
async def served(request: pytest.FixtureRequest, tmp_path: Path,
                 ) -> AsyncIterator[tuple[Migrated, Served]]:
    """The imported config run by `airgate serve` in front of a stand-in vLLM that serves the
    seed's model and insists on the seed's vLLM key."""
    migrated = import_seed(tmp_path, request.param)
    model = migrated.settings["launcher"]["model"]
    async with await start_simulator(SimulatorConfig(model=model, api_key=SEED_VLLM_KEY,
                                                     ttft=0.01, token_interval=0.005)) as sim:
        https, http = free_port(), free_port()
        env = clean_env(AIRGATE_LISTEN__HTTPS=f"127.0.0.1:{https}",
                        AIRGATE_LISTEN__HTTP=f"127.0.0.1:{http}",
                        AIRGATE_UPSTREAM__URL=sim.url, AIRGATE_LAUNCHER__PORT=str(sim.port),
                        AIRGATE_METRICS__LISTEN=f"127.0.0.1:{free_port()}")
        check = airgate("check", "--config", str(migrated.config), cwd=tmp_path, env=env)
        assert check.returncode == 0, check.stderr
        with (tmp_path / "serve.log").open("w") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.cli", "serve", "--config", str(migrated.config),
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                await wait_ready(https, tmp_path / "ca.pem")
            except TimeoutError:
                log_text = (tmp_path / "serve.log").read_text()
                raise AssertionError(f"airgate serve never became ready:\n{log_text}") from None
            yield migrated, Served(https, http, env, sim)
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=30)


def client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def wait_ready(port: int, ca: Path) -> None:
    """Until /healthz says ready: `airgate serve` listens and has seen vLLM."""
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(20):
        while True:
            try:
                async with session.get(f"https://127.0.0.1:{port}/healthz",
                                       server_hostname=DOMAIN) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.1)


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=client_context(tmp_path / "ca.pem"))
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


# --------------------------------------------------------------------------- the import itself


@pytest.mark.parametrize("docker_command", ["seed000-docker-run.sh", "seed001-docker-run.sh"])
def test_import_keeps_the_seeds_decisions_and_prints_no_secret(tmp_path: Path,
                                                               docker_command: str) -> None:
    migrated = import_seed(tmp_path, docker_command)
    listen = migrated.settings["listen"]
    assert listen == {"https": "0.0.0.0:443", "http": "0.0.0.0:80", "server_name": DOMAIN,
                      "cert": str(tmp_path / "fullchain.pem"),
                      "key": str(tmp_path / "privkey.pem")}
    assert migrated.settings["upstream"]["url"] == "http://127.0.0.1:8000"
    launcher = migrated.settings["launcher"]
    assert launcher["preset"] == "mistral" and launcher["tensor_parallel_size"] == 2
    assert (tmp_path / "vllm-api-key").read_text().strip() == SEED_VLLM_KEY
    assert (tmp_path / "tokens").stat().st_mode & 0o077 == 0
    written = migrated.config.read_text() + migrated.stderr + (tmp_path / "tokens").read_text()
    assert SEED_TOKEN not in written


def test_check_warns_that_the_seeds_secrets_are_placeholders(tmp_path: Path) -> None:
    """The seeds' `--env ...=xxxx` lands in the secret files; `airgate check` passes but says
    which files still hold the placeholder."""
    migrated = import_seed(tmp_path, "seed001-docker-run.sh")
    check = airgate("check", "--config", str(migrated.config), cwd=tmp_path, env=clean_env())
    assert check.returncode == 0, check.stderr
    for keys, name in (("upstream.api_key_file and launcher.api_key_file", "vllm-api-key"),
                       ("launcher.hf_token_file", "hf-token")):
        assert (f"airgate: warning: {keys}: the file '{tmp_path / name}' still holds a "
                "placeholder") in check.stderr
    assert "is valid" in check.stderr


# --------------------------------------------------------------------------- behaves like Nginx


async def redirect_location(port: int, target: str) -> tuple[str, str]:
    """(status line, Location) for `GET target` sent byte for byte (no client normalizes it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n"
                 .encode())
    head = (await reader.read()).decode(errors="replace").split("\r\n\r\n", 1)[0]
    writer.close()
    lines = head.split("\r\n")
    location = next((line.split(":", 1)[1].strip() for line in lines
                     if line.lower().startswith("location:")), "")
    return lines[0], location


@pytest.mark.parametrize("target", ["/", "/v1/chat/completions?api-version=2024-10-21&a=b",
                                    "/app/kibana#/home"])
async def test_port_80_answers_301_like_nginx(served: tuple[Migrated, Served],
                                              target: str) -> None:
    _, live = served
    status, location = await redirect_location(live.http, target)
    assert status.split()[1] == "301"
    # Nginx: `return 301 https://$server_name$request_uri`. The HTTPS port shows only because
    # this test moved the listener off 443.
    assert location == f"https://{DOMAIN}:{live.https}{target}"


@pytest.mark.parametrize("target", ["/v1/models?next=%2Fv1%2Fchat", "/a/../v1/models"])
async def test_port_80_keeps_the_request_uri_byte_for_byte(served: tuple[Migrated, Served],
                                                           target: str) -> None:
    _, live = served
    _, location = await redirect_location(live.http, target)
    assert location == f"https://{DOMAIN}:{live.https}{target}"


async def test_the_seeds_token_is_accepted_and_another_refused(
        served: tuple[Migrated, Served], session: aiohttp.ClientSession) -> None:
    migrated, live = served
    url = f"https://127.0.0.1:{live.https}/v1/chat/completions"
    body = {"model": migrated.settings["launcher"]["model"],
            "messages": [{"role": "user", "content": "Hello world"}]}
    async with session.post(url, json=body, server_hostname=DOMAIN,
                            headers={"Authorization": f"Bearer {SEED_TOKEN}"}) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["usage"]["total_tokens"] > 0
    # vLLM got its own key from the docker command's VLLM_API_KEY, never the client's token.
    seen = [r for r in live.sim.stats.requests if r.path == "/v1/chat/completions"]
    assert seen[-1].headers["authorization"] == f"Bearer {SEED_VLLM_KEY}"
    for wrong in (f"Bearer {SEED_TOKEN}x", "Bearer secret token", ""):
        headers = {"Authorization": wrong} if wrong else {}
        async with session.post(url, json=body, server_hostname=DOMAIN,
                                headers=headers) as response:
            assert response.status == 401, wrong


async def test_doctor_passes_on_the_migrated_setup(served: tuple[Migrated, Served]) -> None:
    migrated, live = served
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "doctor", "--config", str(migrated.config),
        cwd=migrated.directory, env={**live.env, "AIRGATE_TOKEN": SEED_TOKEN},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    report = out.decode()
    assert process.returncode == 0, report
    assert "FAIL" not in report and "SKIP" not in report, report
