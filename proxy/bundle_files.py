"""The bundle's files: hashing and copying with progress, the manifest, and verification.

A bundle is a directory: `image.tar` (the saved vLLM image), `model/` (the model's files) and
`manifest.json` listing every file with its size and sha256. While `airgate bundle` runs, each
finished file is recorded in `manifest.partial.json` so that an interrupted run picks up where it
stopped; `manifest.json` is written (atomically) only once everything is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
IMAGE_FILE = "image.tar"
MODEL_DIR = "model"
FORMAT = 1
CHUNK = 4 * 1024 * 1024


class BundleError(Exception):
    """A problem that stops bundle/unbundle, with a message that names the fix."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def human_time(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Bytes done of a known total, rate and time left on stderr, at most every `interval` s.

    On a terminal the line redraws itself; in a log (systemd, a pipe) a line is printed less often.
    """

    def __init__(self, verb: str, total: int, stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.verb = verb
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        tty = self.stream.isatty()
        self._end = "\r" if tty else "\n"
        self.interval = interval if interval is not None else (0.5 if tty else 10.0)
        self._start = time.monotonic()
        self._last = 0.0
        self._name = ""

    def start_file(self, name: str) -> None:
        self._name = name

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        clear = "\033[K" if self._end == "\r" else ""
        self.stream.write(f"{self.verb} {self._name}: {human_bytes(self.done)} of "
                          f"{human_bytes(self.total)} ({percent:.0f}%), "
                          f"{human_bytes(rate)}/s, {human_time(left)} left{clear}{self._end}")
        self.stream.flush()

    def finish(self) -> None:
        elapsed = time.monotonic() - self._start
        clear = "\r\033[K" if self._end == "\r" else ""
        if self.total:
            self.stream.write(f"{clear}{self.verb}: {human_bytes(self.done)} in "
                              f"{human_time(elapsed)}\n")
            self.stream.flush()


def copy_and_hash(source: Path | None, target: Path, progress: Progress) -> str:
    """sha256 of `target`; with a source, `target` is written from it first (via a .part file,
    renamed once complete, so a file under its final name is never half written)."""
    digest = hashlib.sha256()
    progress.start_file(target.name)
    if source is None:
        with open(target, "rb") as file:
            while chunk := file.read(CHUNK):
                digest.update(chunk)
                progress.advance(len(chunk))
        return digest.hexdigest()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with open(source, "rb") as reader, open(part, "wb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            progress.advance(len(chunk))
    os.replace(part, target)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle directory, with "/"
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    image: dict[str, Any] = field(default_factory=dict)  # reference, id, repo_digests, runtime
    model: dict[str, Any] = field(default_factory=dict)  # id, revision, source
    files: dict[str, FileEntry] = field(default_factory=dict)
    airgate_version: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "airgate_version": self.airgate_version,
                "image": self.image, "model": self.model,
                "files": [entry.as_json() for _, entry in sorted(self.files.items())]}

    def model_files(self) -> list[FileEntry]:
        prefix = MODEL_DIR + "/"
        return [entry for path, entry in sorted(self.files.items()) if path.startswith(prefix)]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _parse(data: Any, where: Path) -> Manifest:
    try:
        files = {item["path"]: FileEntry(str(item["path"]), int(item["size"]), str(item["sha256"]))
                 for item in data["files"]}
        return Manifest(dict(data["image"]), dict(data["model"]), files,
                        str(data.get("airgate_version", "")))
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{where} is not an airgate bundle manifest ({error!r}): copy the "
                          f"bundle again, or rebuild it with airgate bundle") from None


def read_manifest(directory: Path, name: str = MANIFEST) -> Manifest:
    path = directory / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} is missing: this is not a complete bundle. Copy the whole "
                          f"directory written by `airgate bundle --out DIR` (it writes "
                          f"{MANIFEST} last, once everything else is done)") from None
    except (OSError, ValueError) as error:
        raise BundleError(f"{path} cannot be read ({error}): copy it again from the connected "
                          f"machine") from None
    return _parse(data, path)


def read_partial(directory: Path) -> dict[str, dict[str, Any]]:
    """Files an interrupted `airgate bundle` finished: path -> size, sha256, mtime_ns."""
    try:
        data = json.loads((directory / PARTIAL).read_text(encoding="utf-8"))
        return {str(path): dict(entry) for path, entry in data["done"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def still_complete(directory: Path, path: str, partial: dict[str, dict[str, Any]]) -> bool:
    """The partial manifest recorded `path` finished and the file has not changed since."""
    entry = partial.get(path)
    if entry is None:
        return False
    try:
        stat = (directory / path).stat()
    except OSError:
        return False
    return bool(stat.st_size == entry.get("size") and stat.st_mtime_ns == entry.get("mtime_ns")
                and entry.get("sha256"))


def record_partial(directory: Path, partial: dict[str, dict[str, Any]], entry: FileEntry,
                   **extra: str) -> None:
    stat = (directory / entry.path).stat()
    partial[entry.path] = {"size": entry.size, "sha256": entry.sha256,
                           "mtime_ns": stat.st_mtime_ns, **extra}
    write_json_atomic(directory / PARTIAL, {"done": partial})


def file_problem(directory: Path, entry: FileEntry) -> str | None:
    """Why the file does not match its entry by size (None: the size is right)."""
    try:
        size = (directory / entry.path).stat().st_size
    except FileNotFoundError:
        return f"{entry.path}: missing"
    except OSError as error:
        return f"{entry.path}: cannot be read ({error.strerror})"
    if size < entry.size:
        return f"{entry.path}: truncated ({size} of {entry.size} bytes)"
    if size > entry.size:
        return f"{entry.path}: {size} bytes, the manifest says {entry.size}"
    return None


def verify(directory: Path, entries: Iterable[FileEntry],
           stream: TextIO | None = None) -> list[str]:
    """Every problem with the files: missing, truncated, or a sha256 that differs."""
    entries = list(entries)
    problems = [problem for entry in entries if (problem := file_problem(directory, entry))]
    bad = {problem.split(": ", 1)[0] for problem in problems}
    to_hash = [entry for entry in entries if entry.path not in bad]
    progress = Progress("verifying", sum(entry.size for entry in to_hash), stream)
    for entry in to_hash:
        if copy_and_hash(None, directory / entry.path, progress) != entry.sha256:
            problems.append(f"{entry.path}: corrupt (its sha256 differs from the manifest's)")
    progress.finish()
    return problems
