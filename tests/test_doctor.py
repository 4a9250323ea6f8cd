"""`airgate doctor`, run as an operator would (a subprocess), against the real proxy in front of
the stand-in vLLM: all PASS on a good setup, and one FAIL naming the fix for each broken part."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import StartProxy, TLSFiles, Tokens, free_port
from proxy.doctor import covers, doctor_main, name_matches
from proxy.server import ProxyServer
from proxy.simulator import RunningSimulator

ROOT = Path(__file__).resolve().parent.parent
SERVER_NAME = "llm.example.com"  # the session certificate (conftest `tls`) covers it
LINE = re.compile(r"^(PASS|FAIL|SKIP) ([^:]+): (.*)$")


@dataclass
class Report:
    returncode: int
    output: str
    checks: dict[str, tuple[str, str, str]]  # name -> (status, detail, fix)

    def status(self, name: str) -> str:
        return self.checks[name][0]

    def failed(self) -> list[str]:
        return [name for name, (status, _, _) in self.checks.items() if status == "FAIL"]


def parse(output: str) -> dict[str, tuple[str, str, str]]:
    checks: dict[str, tuple[str, str, str]] = {}
    name = ""
    for line in output.splitlines():
        match = LINE.match(line)
        if match:
            status, name, detail = match.groups()
            checks[name] = (status, detail, "")
        elif line.startswith("     fix: ") and name:
            status, detail, _ = checks[name]
            checks[name] = (status, detail, line.removeprefix("     fix: "))
    return checks


def doctor_env(token: str | None, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRGATE_")}
    if token is not None:
        env["AIRGATE_TOKEN"] = token
    return {**env, **extra}


async def run_doctor(config: Path, token: str | None, **env: str) -> Report:
    """`python -m proxy.cli doctor --config F` without blocking the proxy on this loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "doctor", "--config", str(config), cwd=ROOT,
        env=doctor_env(token, **env), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode is not None
    text = out.decode()
    return Report(process.returncode, text, parse(text))


async def wait_ready(server: ProxyServer) -> None:
    """Until the proxy's health check has seen vLLM (and learnt the model an alias stands for)."""
    async with asyncio.timeout(5):
        while not server.readiness()[0]:  # noqa: ASYNC110 - the health checker sets no event
            await asyncio.sleep(0.05)


async def start_gate(start_proxy: StartProxy, upstream_url: str, tmp_path: Path,
                     wait: bool = True, **sections: dict[str, Any]) -> Path:
    """The proxy on fixed free ports (so the config the doctor reads names the live ports);
    returns the config file it was started from."""
    listen = {"https": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}",
              "server_name": SERVER_NAME, **sections.pop("listen", {})}
    launcher = {"model": "sim-model", **sections.pop("launcher", {})}
    server = await start_proxy(upstream_url, listen=listen, launcher=launcher, **sections)
    if wait:
        await wait_ready(server)
    return tmp_path / "airgate.toml"  # conftest's make_settings writes the config here


def issue_cert(tls: TLSFiles, directory: Path, *names: str, days: int | None = None) -> str:
    not_after = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    leaf = tls.ca.issue_cert(*names, not_after=not_after)
    path = directory / f"{names[0]}-{days}.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


# --------------------------------------------------------------------------- a good setup


async def test_good_setup_passes_every_check(simulator: RunningSimulator,
                                             start_proxy: StartProxy, tokens: Tokens,
                                             tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path)
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 0, report.output
    assert set(report.checks) == {
        "certificate readable", "certificate matches key", "certificate not expiring",
        "certificate covers server_name", "https listener", "http redirect", "vLLM ready",
        "vLLM serves the model", "Kibana connector test", "streaming", "tool calling",
        "wrong token refused"}
    assert {status for status, _, _ in report.checks.values()} == {"PASS"}, report.output
    assert "301 -> https://llm.example.com:" in report.checks["http redirect"][1]
    assert "usage (prompt" in report.checks["Kibana connector test"][1]
    assert "ready for Kibana" in report.output


async def test_model_alias_is_what_the_connector_sends(simulator: RunningSimulator,
                                                       start_proxy: StartProxy, tokens: Tokens,
                                                       tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path,
                              upstream={"model_alias": "default"},
                              launcher={"model": "some/hf-model-id"})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 0, report.output
    assert "'default' points at 'sim-model'" in report.checks["vLLM serves the model"][1]
    assert "from 'default'" in report.checks["Kibana connector test"][1]


async def test_without_a_token_the_proxy_checks_are_skipped_with_the_fix(
        simulator: RunningSimulator, start_proxy: StartProxy, tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path)
    report = await run_doctor(config, None)
    assert report.returncode == 0, report.output  # nothing failed
    status, _, fix = report.checks["Kibana connector test"]
    assert status == "SKIP" and "--token-file" in fix and "AIRGATE_TOKEN" in fix
    assert report.status("streaming") == report.status("tool calling") == "SKIP"
    assert report.status("wrong token refused") == "PASS"  # needs no token
    assert "no request went through the proxy" in report.output


async def test_a_preset_without_tools_skips_the_tool_check(simulator: RunningSimulator,
                                                           start_proxy: StartProxy,
                                                           tokens: Tokens,
                                                           tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path, launcher={"preset": "none"})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 0, report.output
    assert report.status("tool calling") == "SKIP"
    assert "does not enable tool calling" in report.checks["tool calling"][1]


# --------------------------------------------------------------------------- broken setups


async def test_certificate_not_covering_server_name_fails_with_the_fix(
        simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
        tmp_path: Path) -> None:
    cert = issue_cert(tls, tmp_path, "other.example.org")
    config = await start_gate(start_proxy, simulator.url, tmp_path,
                              listen={"cert": cert, "key": cert})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 1
    assert report.failed() == ["certificate covers server_name"], report.output
    _, detail, fix = report.checks["certificate covers server_name"]
    assert "'llm.example.com' is not among the certificate's names: other.example.org" in detail
    assert "certbot certonly -d llm.example.com" in fix and "server_name" in fix


async def test_certificate_expiring_within_21_days_fails_with_the_fix(
        simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens, tls: TLSFiles,
        tmp_path: Path) -> None:
    cert = issue_cert(tls, tmp_path, SERVER_NAME, days=5)
    config = await start_gate(start_proxy, simulator.url, tmp_path,
                              listen={"cert": cert, "key": cert})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 1
    assert report.failed() == ["certificate not expiring"], report.output
    _, detail, fix = report.checks["certificate not expiring"]
    assert "expires in 4 day(s)" in detail or "expires in 5 day(s)" in detail
    assert "certbot renew" in fix and "systemctl reload airgate" in fix


async def test_vllm_down_fails_with_the_fix(start_proxy: StartProxy, tokens: Tokens,
                                            tmp_path: Path) -> None:
    config = await start_gate(start_proxy, f"http://127.0.0.1:{free_port()}", tmp_path,
                              wait=False)
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 1
    assert report.failed() == ["vLLM ready"], report.output
    _, detail, fix = report.checks["vLLM ready"]
    assert "nothing answers at http://127.0.0.1:" in detail
    assert "airgate status" in fix and "airgate run --config" in fix
    assert report.checks["Kibana connector test"][1].startswith("needs vLLM serves the model")


async def test_wrong_model_name_fails_naming_the_served_models(
        simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
        tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path,
                              launcher={"model": "mistralai/Mistral-Small-3.2-24B-Instruct-2506"})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 1
    assert report.failed() == ["vLLM serves the model"], report.output
    _, detail, fix = report.checks["vLLM serves the model"]
    assert "vLLM serves 'sim-model', not 'mistralai/Mistral-Small" in detail
    assert 'served_model_name = "sim-model"' in fix and "model_alias" in fix


async def test_wrong_token_fails_the_connector_test_with_the_fix(
        simulator: RunningSimulator, start_proxy: StartProxy, tokens: Tokens,
        tmp_path: Path) -> None:
    config = await start_gate(start_proxy, simulator.url, tmp_path)
    report = await run_doctor(config, "ag-not-a-token-of-this-proxy")
    assert report.returncode == 1
    assert report.failed() == ["Kibana connector test"], report.output
    _, detail, fix = report.checks["Kibana connector test"]
    assert detail.startswith("airgate answered 401")
    assert f"$AIRGATE_TOKEN is not in {tokens.path}" in fix
    assert f"airgate token new kibana --file {tokens.path}" in fix
    assert report.status("streaming") == "SKIP"


async def test_vllm_key_refused_fails_with_the_fix(tokens: Tokens, start_proxy: StartProxy,
                                                    tmp_path: Path) -> None:
    from proxy.simulator import SimulatorConfig, start_simulator

    key_file = tmp_path / "vllm-api-key"
    key_file.write_text("not-the-key\n")
    async with await start_simulator(SimulatorConfig(api_key="the-key")) as sim:
        config = await start_gate(start_proxy, sim.url, tmp_path, wait=False,
                                  upstream={"api_key_file": str(key_file)})
        report = await run_doctor(config, tokens.kibana)
    assert report.failed() == ["vLLM serves the model"], report.output
    assert "api_key_file" in report.checks["vLLM serves the model"][2]


async def test_nothing_listening_fails_the_listener_check(simulator: RunningSimulator,
                                                          tokens: Tokens, tls: TLSFiles,
                                                          tmp_path: Path) -> None:
    from conftest import write_config

    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"https": f"127.0.0.1:{free_port()}", "http": "", "server_name": SERVER_NAME,
                   "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
        "upstream": {"url": simulator.url},
        "launcher": {"model": "sim-model"}})
    report = await run_doctor(config, tokens.kibana)
    assert report.returncode == 1
    assert report.failed() == ["https listener"], report.output
    assert "airgate serve --config" in report.checks["https listener"][2]
    assert report.status("http redirect") == "SKIP"


async def test_token_file_and_ca_arguments(simulator: RunningSimulator, start_proxy: StartProxy,
                                           tokens: Tokens, tls: TLSFiles, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--token-file` and `--ca`, read with getattr until proxy/cli.py defines them."""
    config = await start_gate(start_proxy, simulator.url, tmp_path)
    token_file = tmp_path / "kibana-token"
    token_file.write_text(tokens.kibana + "\n")
    args = argparse.Namespace(config=config, token_file=token_file, ca=tls.ca_pem)
    assert await asyncio.to_thread(doctor_main, args) == 0
    out = capsys.readouterr().out
    assert f"certificate trusted by --ca {tls.ca_pem}" in out
    assert "FAIL" not in out and "SKIP" not in out, out
    missing = argparse.Namespace(config=config, token_file=tmp_path / "nope", ca=None)
    assert doctor_main(missing) == 2
    assert "--token-file cannot be read" in capsys.readouterr().err


# --------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """`airgate demo` on a free port; (its config file, its token). The demo writes its files
    into a fresh directory under $TMPDIR and does not print where, so TMPDIR is pointed at an
    empty directory here."""
    temp = tmp_path_factory.mktemp("demo")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--port", str(free_port())], cwd=ROOT,
        env={**doctor_env(None), "TMPDIR": str(temp)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    token = ""
    for line in process.stdout:
        token = token or next(iter(re.findall(r"token \(shown once\): (\S+)", line)), "")
        if line.startswith("Access log:"):
            break
    (config,) = temp.glob("airgate-demo-*/airgate.toml")
    yield config, token
    process.send_signal(signal.SIGINT)
    process.wait(timeout=15)


def test_doctor_passes_against_the_demo(demo: tuple[Path, str]) -> None:
    config, token = demo
    # The demo's config does not name its model yet ([launcher] model keeps its default):
    # the override stands in for the line proxy/demo.py should write.
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "doctor", "--config", str(config)], cwd=ROOT,
        env=doctor_env(token, AIRGATE_LAUNCHER__MODEL="demo-model"), capture_output=True,
        text=True, timeout=90)
    checks = parse(result.stdout)
    assert result.returncode == 0, result.stdout
    assert checks["http redirect"][0] == "SKIP"  # the demo has no port-80 listener
    assert [name for name, (status, _, _) in checks.items() if status != "PASS"] == [
        "http redirect"]


def test_demo_config_names_the_model_it_serves(demo: tuple[Path, str]) -> None:
    config, token = demo
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "doctor", "--config", str(config)], cwd=ROOT,
        env=doctor_env(token), capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("llm.example.com", "llm.example.com", True),
    ("LLM.Example.com", "llm.example.com.", True),
    ("*.example.com", "llm.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.llm.example.com", False),
    ("*.example.com", ".example.com", False),
    ("llm.example.com", "llm.example.org", False),
])
def test_wildcard_names_match_one_label(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def test_ip_server_names_match_ip_entries_only() -> None:
    assert covers(["localhost", "127.0.0.1"], "127.0.0.1")
    assert not covers(["*.0.0.1"], "127.0.0.1")
    assert covers(["::1"], "0:0::1")
