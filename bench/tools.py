"""Installs what the benchmark needs, each only when missing: Debian packages (nginx, wrk,
h2load), matplotlib into the running venv, LiteLLM's proxy and a profiler into their own venvs
under bench/.work. A contender that cannot be installed is reported, not fatal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from bench.util import WORK, say

APT = {"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"}


def _run(argv: list[str], log: Path) -> bool:
    with log.open("ab") as handle:
        return subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                              check=False).returncode == 0


def ensure_debian() -> list[str]:
    """Installs the missing commands; returns the names still missing afterwards."""
    missing = [name for name in APT if shutil.which(name) is None]
    if missing:
        packages = sorted({APT[name] for name in missing})
        say(f"installing Debian packages: {' '.join(packages)} (apt-get)")
        log = WORK / "apt.log"
        _run(["apt-get", "update", "-q"], log)
        _run(["apt-get", "install", "-y", "-q", *packages], log)
    return [name for name in APT if shutil.which(name) is None]


def ensure_perf() -> None:
    """perf (Debian's linux-perf) for the profile's split by kind; optional."""
    if shutil.which("perf") is None:
        log = WORK / "apt.log"
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "linux-perf"], log)


def ensure_matplotlib() -> bool:
    try:
        import matplotlib
        return True
    except ImportError:
        say("installing matplotlib into the running venv (pip)")
        _run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], WORK / "pip.log")
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _venv_with(name: str, requirement: str, probe: str) -> Path | str:
    """A venv at bench/.work/NAME with `requirement`; the path to bin/, or why it failed."""
    home = WORK / name
    binary = home / "bin" / probe
    if binary.exists():
        return home / "bin"
    say(f"installing {requirement} into {home.relative_to(WORK.parent.parent)} (pip)")
    log = WORK / f"{name}-install.log"
    try:
        venv.create(home, with_pip=True, clear=True)
    except Exception as error:  # an unusable venv module: report, do not fail the run
        return f"venv failed: {error}"
    if not _run([str(home / "bin" / "pip"), "install", "-q", requirement], log):
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        return f"pip install {requirement} failed: {tail[0][:200]}"
    return home / "bin" if binary.exists() else f"{probe} missing after installing"


def ensure_litellm() -> Path | str:
    return _venv_with("litellm-venv", "litellm[proxy]", "litellm")


def ensure_profiler() -> Path | str:
    return _venv_with("profile-venv", "py-spy", "py-spy")


def versions(litellm_bin: Path | str) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        text = (done.stdout + done.stderr).strip()
        return text.splitlines()[0] if text else "?"

    found = {
        "nginx": out(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": out(["wrk", "-v"]).split(" [")[0],
        "h2load": out(["h2load", "--version"]),
        "python": sys.version.split()[0],
        "openssl": out(["openssl", "version"]),
    }
    if isinstance(litellm_bin, Path):
        found["litellm"] = out([str(litellm_bin / "python"), "-c",
                                "import importlib.metadata as m; print(m.version('litellm'))"])
    return found
