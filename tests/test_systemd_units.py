"""The systemd units in deploy/systemd: they verify, and they say what the lifecycle needs.

`systemd-analyze verify` checks syntax, directives and that ExecStart= is executable; it runs
on copies whose ExecStart points at a stub, since `airgate` is not installed system-wide here.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.settings import ServerSettings

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
SERVICES = ("airgate.service", "airgate-proxy.service", "airgate-launcher.service")
INSTALLED = "/usr/local/bin/airgate"


def parse(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}} (keys repeat in units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    return values[-1]


def seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", value):
        total += float(number) * {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "": 1}[unit]
    return total


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(path).exists():
        pytest.skip("systemd-analyze is not installed (apt install systemd) - units not verified")
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze cannot run here: {probe.stderr.strip()}")
    return path


def staged(tmp_path: Path, dropin: tuple[str, str] | None = None) -> Path:
    """Copies of the units with ExecStart on an executable stub; optionally a drop-in."""
    stub = tmp_path / "airgate"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in UNITS.iterdir():
        if unit.suffix in (".service", ".socket"):
            text = unit.read_text().replace(INSTALLED, str(stub))
            (tmp_path / unit.name).write_text(text)
    if dropin is not None:
        target, source = dropin
        directory = tmp_path / f"{target}.d"
        directory.mkdir()
        shutil.copy(UNITS / source, directory / source)
    return tmp_path


def verify(analyze: str, directory: Path, *names: str) -> None:
    result = subprocess.run(
        [analyze, "verify", *(f"./{name}" for name in names)], cwd=directory,
        capture_output=True, text=True, check=False, timeout=60)
    # verify exits 0 on some problems it only warns about ("Unknown key name", "ignoring"):
    # any output at all is a finding.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout + result.stderr)


def test_units_verify(analyze: str, tmp_path: Path) -> None:
    verify(analyze, staged(tmp_path), *SERVICES, "airgate.socket")


def test_podman_rootless_dropin_verifies(analyze: str, tmp_path: Path) -> None:
    directory = staged(tmp_path, ("airgate-launcher.service", "podman-rootless.conf"))
    verify(analyze, directory, "airgate-launcher.service")


def test_verify_would_catch_a_typo(analyze: str, tmp_path: Path) -> None:
    # The check above must not pass vacuously.
    directory = staged(tmp_path)
    unit = directory / "airgate-proxy.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    with pytest.raises(AssertionError, match="ProtectSytem"):
        verify(analyze, directory, "airgate-proxy.service")


@pytest.mark.parametrize("name,command", [("airgate.service", "run"),
                                          ("airgate-proxy.service", "serve"),
                                          ("airgate-launcher.service", "launch")])
def test_each_unit_runs_its_command_with_the_config(name: str, command: str) -> None:
    exec_start = one(parse(name), "Service", "ExecStart").split()
    assert exec_start[:2] == [INSTALLED, command]
    assert "--config" in exec_start


@pytest.mark.parametrize("name", ["airgate.service", "airgate-proxy.service"])
def test_proxy_units_notify_reload_and_outwait_the_drain(name: str) -> None:
    unit = parse(name)
    assert one(unit, "Service", "Type") == "notify"
    assert re.fullmatch(r"/bin/kill -(HUP|SIGHUP|s HUP) \$MAINPID",
                        one(unit, "Service", "ExecReload"))
    drain = ServerSettings().drain_timeout
    assert drain == 600
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > drain
    assert one(unit, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert "WatchdogSec" in unit["Service"]


@pytest.mark.parametrize("name", SERVICES)
def test_units_run_unprivileged_and_sandboxed(name: str) -> None:
    service = parse(name)["Service"]
    assert service["User"] == ["airgate"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                       "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
                       "LockPersonality": "yes", "SystemCallArchitectures": "native"}.items():
        assert service.get(key) == [value], key
    assert service["SystemCallFilter"][0] == "@system-service"
    families = set(one({"S": service}, "S", "RestrictAddressFamilies").split())
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert any(value.startswith("vllm-api-key:") for value in service["LoadCredential"])


def test_proxy_alone_has_the_tightest_sandbox() -> None:
    service = parse("airgate-proxy.service")["Service"]
    assert service["MemoryDenyWriteExecute"] == ["yes"]
    assert service["PrivateDevices"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "SupplementaryGroups" not in service


def test_every_sandbox_exception_is_explained() -> None:
    # An exception without its reason next to it gets "tightened" by the next reader.
    for name in ("airgate.service", "airgate-launcher.service"):
        text = (UNITS / name).read_text()
        for exception in ("SupplementaryGroups=docker", "AF_NETLINK", "PrivateDevices",
                          "MemoryDenyWriteExecute"):
            line = next(i for i, line in enumerate(text.splitlines()) if exception in line)
            before = text.splitlines()[max(0, line - 3):line + 1]
            assert any(b.lstrip().startswith("#") for b in before), (name, exception)


def test_reloaded_files_are_not_credentials() -> None:
    # Credentials are copied once at start: a SIGHUP would re-read the stale copy of a renewed
    # certificate or a rotated tokens file.
    for name in ("airgate.service", "airgate-proxy.service"):
        for value in parse(name)["Service"]["LoadCredential"]:
            assert not re.search(r"tokens|cert|key\.pem|privkey|fullchain", value), value


def test_socket_unit_lists_https_before_http() -> None:
    # ProxyServer.start(sockets) takes the first passed socket for TLS, the second for :80.
    listens = parse("airgate.socket")["Socket"]["ListenStream"]
    assert [value.rsplit(":", 1)[1] for value in listens] == ["443", "80"]


def test_units_parse_as_ini() -> None:
    # A cheap syntax check that runs even where systemd-analyze does not.
    for unit in UNITS.iterdir():
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(unit.read_text())
        assert parser.sections(), unit.name
