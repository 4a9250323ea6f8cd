"""`airgate bundle` and `airgate unbundle`: carry the vLLM image and the model into an air gap.

On a connected machine `airgate bundle --config F --out DIR` pulls and saves the image, fetches
the model (or copies `--model-dir`), hashes every file and writes DIR/manifest.json last. An
interrupted run resumes: files recorded in DIR/manifest.partial.json and unchanged since are not
copied or hashed again. `airgate bundle --verify DIR` re-checks every checksum.

On the air-gapped server `airgate unbundle DIR --config F` verifies everything first (a bad file
is named and nothing is installed), then loads the image and places the model in the Hugging
Face cache under launcher.hf_cache, where vLLM finds it by its id with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from proxy import bundle_image
from proxy.bundle_cache import install_model, model_installed
from proxy.bundle_files import (
    IMAGE_FILE,
    MANIFEST,
    MODEL_DIR,
    PARTIAL,
    BundleError,
    FileEntry,
    Manifest,
    Progress,
    copy_and_hash,
    human_bytes,
    read_manifest,
    read_partial,
    record_partial,
    still_complete,
    verify,
    write_json_atomic,
)
from proxy.launcher.offline import is_local_path, model_problem
from proxy.settings import ConfigError, LauncherSettings, load_settings

SKIP_DIRS = {".cache", ".git", ".huggingface"}  # snapshot_download's metadata, a git checkout
SKIP_SUFFIXES = (".part", ".incomplete", ".lock")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def airgate_version() -> str:
    try:
        return metadata.version("airgate")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Job:
    """One file of the bundle: copied from `source` (None: already in place) and hashed."""

    key: str
    source: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


def model_files(root: Path) -> list[str]:
    """Relative paths of a model directory's files, without download metadata or leftovers."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_dir() or SKIP_DIRS.intersection(relative.parts[:-1]):
            continue
        if not path.name.endswith(SKIP_SUFFIXES):
            found.append(relative.as_posix())
    return found


def _read_token(settings: LauncherSettings) -> str | None:
    if not settings.hf_token_file:
        return None
    try:
        return Path(settings.hf_token_file).read_text(encoding="utf-8").strip() or None
    except OSError as error:
        raise BundleError(f"launcher.hf_token_file {settings.hf_token_file}: {error.strerror}: "
                          f"make it readable, or set it to \"\" for a public model") from None


def download_model(settings: LauncherSettings, target: Path) -> str | None:
    """snapshot_download into `target` (it skips files it already has); the commit hash."""
    from huggingface_hub import HfApi, snapshot_download

    token = _read_token(settings)
    _say(f"downloading {settings.model} from the Hugging Face Hub ...")
    try:
        revision = HfApi().model_info(settings.model, token=token).sha
        snapshot_download(repo_id=settings.model, revision=revision, local_dir=target,
                          token=token)
    except Exception as error:  # network, auth (gated model), unknown repo: all end the run
        raise BundleError(f"cannot download {settings.model}: {error}. For a gated model accept "
                          f"its licence on huggingface.co and set launcher.hf_token_file; or "
                          f"pass --model-dir with a local copy") from None
    return revision


def content_revision(entries: list[FileEntry]) -> str:
    """A 40-hex snapshot name for a model from a local directory, derived from its contents:
    the same files give the same name, changed files a new snapshot."""
    blob = json.dumps([[entry.path, entry.sha256] for entry in entries])
    return hashlib.sha1(blob.encode(), usedforsecurity=False).hexdigest()


def image_jobs(settings: LauncherSettings, out: Path,
               partial: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[Job]]:
    if settings.runtime == "process":
        _say("runtime = process: no image to bundle")
        return {}, []
    binary = bundle_image.runtime_binary(settings)
    image_id = bundle_image.pull(binary, settings.image)
    done = partial.get(IMAGE_FILE, {})
    if done.get("image_id") != image_id or not still_complete(out, IMAGE_FILE, partial):
        partial.pop(IMAGE_FILE, None)
        bundle_image.save(binary, settings.image, out / IMAGE_FILE)
    else:
        _say(f"{IMAGE_FILE}: already saved from {image_id}, kept")
    info = {"reference": settings.image, "id": image_id, "runtime": settings.runtime,
            "repo_digests": bundle_image.repo_digests(binary, settings.image)}
    return info, [Job(IMAGE_FILE, extra={"image_id": image_id})]


def model_jobs(settings: LauncherSettings, out: Path,
               model_dir: Path | None) -> tuple[dict[str, Any], list[Job]]:
    if is_local_path(settings.model):
        raise BundleError(f"launcher.model {settings.model} is a directory: a bundle carries a "
                          f"Hub model by its id. Set launcher.model to the id (ORG/NAME) and "
                          f"pass --model-dir {settings.model}")
    target = out / MODEL_DIR
    if model_dir is None:
        revision = download_model(settings, target)
        jobs = [Job(f"{MODEL_DIR}/{name}") for name in model_files(target)]
        return {"id": settings.model, "revision": revision, "source": "hub"}, jobs
    if not model_dir.is_dir():
        raise BundleError(f"--model-dir {model_dir} is not a directory: give the directory "
                          f"that holds the model's config.json")
    same = model_dir.resolve() == target.resolve()
    jobs = [Job(f"{MODEL_DIR}/{name}", None if same else model_dir / name)
            for name in model_files(model_dir)]
    if not any(job.key.endswith(("/config.json", "/params.json")) for job in jobs):
        raise BundleError(f"--model-dir {model_dir} holds no config.json: give the model's "
                          f"directory (the one with config.json and the weights)")
    return {"id": settings.model, "revision": None, "source": "local"}, jobs


def _unchanged(out: Path, job: Job, partial: dict[str, dict[str, Any]]) -> bool:
    if not still_complete(out, job.key, partial):
        return False
    return job.source is None or job.source.stat().st_size == partial[job.key]["size"]


def run_jobs(out: Path, jobs: list[Job], partial: dict[str, dict[str, Any]],
             manifest: Manifest) -> None:
    """Copy and hash what is not done yet, recording each finished file in the partial
    manifest; files done by an earlier run are taken from it."""
    todo = [job for job in jobs if not _unchanged(out, job, partial)]
    for job in jobs:
        if job not in todo:
            done = partial[job.key]
            manifest.files[job.key] = FileEntry(job.key, int(done["size"]), str(done["sha256"]))
    if len(todo) < len(jobs):
        _say(f"resuming: {len(jobs) - len(todo)} file(s) already done by an earlier run")
    sizes = [(job.source or out / job.key).stat().st_size for job in todo]
    verb = "copying and hashing" if any(job.source for job in todo) else "hashing"
    progress = Progress(verb, sum(sizes))
    for job in todo:
        digest = copy_and_hash(job.source, out / job.key, progress)
        entry = FileEntry(job.key, (out / job.key).stat().st_size, digest)
        record_partial(out, partial, entry, **job.extra)
        manifest.files[job.key] = entry
    progress.finish()


def build(settings: LauncherSettings, out: Path, model_dir: Path | None) -> Manifest:
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # complete again only once this run finishes
    partial = read_partial(out)
    manifest = Manifest(airgate_version=airgate_version())
    manifest.image, jobs = image_jobs(settings, out, partial)
    manifest.model, more = model_jobs(settings, out, model_dir)
    run_jobs(out, jobs + more, partial, manifest)
    if not manifest.model["revision"]:
        manifest.model["revision"] = content_revision(manifest.model_files())
    write_json_atomic(out / MANIFEST, manifest.as_json())
    (out / PARTIAL).unlink(missing_ok=True)
    return manifest


def _load_launcher(config: Path) -> LauncherSettings:
    return load_settings(config).launcher


def verify_main(directory: Path) -> int:
    manifest = read_manifest(directory)
    problems = verify(directory, manifest.files.values())
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"{len(problems)} of {len(manifest.files)} file(s) bad in {directory}: copy them "
              f"again from the connected machine (or rerun airgate bundle there: it resumes)")
        return 1
    total = sum(entry.size for entry in manifest.files.values())
    print(f"OK {directory}: {len(manifest.files)} file(s), {human_bytes(total)}, every sha256 "
          f"matches")
    return 0


def bundle_main(args: argparse.Namespace) -> int:
    try:
        if args.verify is not None:
            return verify_main(args.verify)
        if args.out is None:
            print("airgate bundle: pass --out DIR (where to write the bundle) or --verify DIR",
                  file=sys.stderr)
            return 2
        manifest = build(_load_launcher(args.config), args.out, args.model_dir)
    except (BundleError, ConfigError) as error:
        print(f"airgate bundle: {error}", file=sys.stderr)
        return 1
    total = sum(entry.size for entry in manifest.files.values())
    print(f"bundle written to {args.out}: {len(manifest.files)} file(s), {human_bytes(total)}; "
          f"model {manifest.model['id']} revision {manifest.model['revision']}"
          + (f", image {manifest.image['reference']}" if manifest.image else ""))
    print(f"carry the whole directory to the server, then run: airgate unbundle {args.out} "
          f"--config F")
    return 0


def _warn_mismatch(settings: LauncherSettings, manifest: Manifest) -> None:
    if manifest.model["id"] != settings.model:
        _say(f"note: launcher.model is {settings.model!r} but this bundle holds "
             f"{manifest.model['id']!r}: set launcher.model = \"{manifest.model['id']}\"")
    if manifest.image and manifest.image["reference"] != settings.image:
        _say(f"note: launcher.image is {settings.image!r} but this bundle holds "
             f"{manifest.image['reference']!r}: set launcher.image = "
             f"\"{manifest.image['reference']}\"")


def _image_present(settings: LauncherSettings, manifest: Manifest) -> bool:
    if not manifest.image or settings.runtime == "process":
        return True
    binary = bundle_image.runtime_binary(settings)
    found = bundle_image.image_id(binary, str(manifest.image["reference"]))
    # docker writes the id as sha256:HEX, podman as HEX: the same digest of the image's config.
    return found is not None and \
        found.removeprefix("sha256:") == str(manifest.image["id"]).removeprefix("sha256:")


def unbundle(directory: Path, settings: LauncherSettings) -> tuple[bool, int]:
    """Verify, load, install: (whether the image was loaded, model files/links changed)."""
    manifest = read_manifest(directory)
    _warn_mismatch(settings, manifest)
    image_ok = _image_present(settings, manifest)
    if image_ok and model_installed(manifest, settings.hf_cache):
        return False, 0
    problems = verify(directory, manifest.files.values())
    if problems:
        raise BundleError("\n".join([*problems, f"nothing was installed: copy the bad file(s) "
                                     f"again from the connected machine and check them with "
                                     f"airgate bundle --verify {directory}"]))
    if not image_ok:
        binary = bundle_image.runtime_binary(settings)
        bundle_image.load(binary, directory / IMAGE_FILE)
        if bundle_image.image_id(binary, str(manifest.image["reference"])) is None:
            raise BundleError(f"{binary} load finished but {manifest.image['reference']} is not "
                              f"on this host: check `{binary} images`")
    return not image_ok, install_model(directory, manifest, settings.hf_cache)


def unbundle_main(args: argparse.Namespace) -> int:
    try:
        settings = _load_launcher(args.config)
        loaded, changed = unbundle(args.dir, settings)
    except (BundleError, ConfigError) as error:
        print(f"airgate unbundle: {error}", file=sys.stderr)
        return 1
    if not loaded and changed == 0:
        print(f"already installed, nothing changed: the image and the model from {args.dir} "
              f"are on this host")
    else:
        print(("image loaded; " if loaded else "")
              + f"model: {changed} change(s) under {settings.hf_cache}")
    problem = model_problem(settings)
    if problem is not None:  # e.g. the config names another model than the bundle
        print(f"note: {problem}: fix the [launcher] section before airgate run", file=sys.stderr)
        return 0
    print(f"ready: airgate run --config {args.config}")
    return 0
