"""The vLLM image through the docker/podman CLI: pull, save, load, inspect.

Plain blocking subprocess calls (bundle and unbundle are one-shot commands), never a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from proxy.bundle_files import BundleError
from proxy.launcher.checks import find_binary
from proxy.launcher.command import LaunchError
from proxy.settings import LauncherSettings


def runtime_binary(settings: LauncherSettings) -> str:
    try:
        return find_binary(settings)
    except LaunchError as error:
        raise BundleError(str(error)) from None


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):  # replaced by an in-memory stream
        return None


def _run(argv: list[str], *, show: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a runtime command; with show, its own output (e.g. pull's layers) goes to stderr
    as it comes."""
    live = _stderr_fd() if show else None
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, text=True, check=False,
                                stdout=subprocess.PIPE if live is None else live,
                                stderr=subprocess.STDOUT)
    except OSError as error:
        raise BundleError(f"{argv[0]}: {error.strerror or error}: check launcher.runtime and "
                          f"launcher.runtime_command") from None
    if show and live is None and result.stdout:
        print(result.stdout, end="", file=sys.stderr)
    return result


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"status {result.returncode}"


def image_id(binary: str, image: str) -> str | None:
    """The local image's id (`image inspect --format {{.Id}}`), None when it is not here."""
    result = _run([binary, "image", "inspect", "--format", "{{.Id}}", image])
    if result.returncode != 0:
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def repo_digests(binary: str, image: str) -> list[str]:
    result = _run([binary, "image", "inspect", "--format", "{{json .RepoDigests}}", image])
    try:
        value = json.loads(result.stdout) if result.returncode == 0 else []
    except ValueError:
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def pull(binary: str, image: str) -> str:
    """Pull the image (the registry is reachable here); its id. An image that exists only
    locally (built here) is used as it is."""
    print(f"pulling {image} ...", file=sys.stderr)
    result = _run([binary, "pull", image], show=True)
    found = image_id(binary, image)
    if found is None:
        raise BundleError(f"{binary} pull {image} failed (status {result.returncode}) and the "
                          f"image is not on this host: check launcher.image and that this "
                          f"machine reaches the registry ({binary} login if it is private)")
    if result.returncode != 0:
        print(f"note: pull failed; bundling the local image {image} ({found})", file=sys.stderr)
    return found


def save(binary: str, image: str, target: Path) -> None:
    """`save -o` into a .part file, renamed once complete (an interrupted save leaves no
    image.tar that looks finished)."""
    part = target.with_name(target.name + ".part")
    print(f"saving {image} to {target} ...", file=sys.stderr)
    result = _run([binary, "save", "-o", str(part), image])
    if result.returncode != 0:
        part.unlink(missing_ok=True)
        raise BundleError(f"{binary} save {image} failed ({_last_line(result)}): check free "
                          f"space in {target.parent} (df -h)")
    os.replace(part, target)


def load(binary: str, archive: Path) -> None:
    print(f"loading {archive} into {Path(binary).name} ...", file=sys.stderr)
    result = _run([binary, "load", "-i", str(archive)])
    if result.returncode != 0:
        raise BundleError(f"{binary} load -i {archive} failed ({_last_line(result)}): is the "
                          f"daemon running (`{binary} version`), and is there space for the "
                          f"image (`{binary} system df`)?")
    if result.stdout.strip():
        print(result.stdout.strip(), file=sys.stderr)
