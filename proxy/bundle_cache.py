"""Place a bundled model in the Hugging Face cache layout, as a download would have.

    hf_cache/hub/models--ORG--NAME/
        blobs/<sha256>                          the file contents, one per distinct content
        snapshots/<revision>/<path>  -> ../../blobs/<sha256>   (relative symlinks)
        refs/main                               the revision, no newline

With HF_HUB_OFFLINE=1, huggingface_hub resolves the model id through refs/main to the snapshot,
so vLLM loads it by its id as if it had downloaded it. Every step skips what is already right,
which makes a second unbundle change nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from proxy.bundle_files import MODEL_DIR, BundleError, FileEntry, Manifest, Progress, copy_and_hash
from proxy.launcher.offline import cache_folder, hub_cache


@dataclass(frozen=True)
class Placement:
    entry: FileEntry
    blob: Path
    link: Path

    def blob_ok(self) -> bool:
        try:
            return self.blob.is_file() and self.blob.stat().st_size == self.entry.size
        except OSError:
            return False

    def link_target(self) -> str:
        return os.path.relpath(self.blob, self.link.parent)

    def link_ok(self) -> bool:
        return self.link.is_symlink() and os.readlink(self.link) == self.link_target()


def repo_dir(hf_cache: str | Path, model_id: str) -> Path:
    return hub_cache(hf_cache) / cache_folder(model_id)


def placements(manifest: Manifest, hf_cache: str | Path) -> list[Placement]:
    repo = repo_dir(hf_cache, str(manifest.model["id"]))
    snapshot = repo / "snapshots" / str(manifest.model["revision"])
    prefix = MODEL_DIR + "/"
    return [Placement(entry, repo / "blobs" / entry.sha256,
                      snapshot / entry.path.removeprefix(prefix))
            for entry in manifest.model_files()]


def _ref_path(manifest: Manifest, hf_cache: str | Path) -> Path:
    return repo_dir(hf_cache, str(manifest.model["id"])) / "refs" / "main"


def _ref_ok(manifest: Manifest, hf_cache: str | Path) -> bool:
    try:
        return _ref_path(manifest, hf_cache).read_text() == str(manifest.model["revision"])
    except OSError:
        return False


def model_installed(manifest: Manifest, hf_cache: str | Path) -> bool:
    """Every blob, link and the ref are already as the manifest wants them."""
    return _ref_ok(manifest, hf_cache) and all(
        item.blob_ok() and item.link_ok() for item in placements(manifest, hf_cache))


def _link(item: Placement) -> None:
    item.link.parent.mkdir(parents=True, exist_ok=True)
    temp = item.link.with_name(item.link.name + ".airgate-tmp")
    temp.unlink(missing_ok=True)
    temp.symlink_to(item.link_target())
    os.replace(temp, item.link)  # a file or an old link there is replaced in one step


def install_model(bundle: Path, manifest: Manifest, hf_cache: str | Path) -> int:
    """Copy blobs, make the snapshot's links and refs/main; the number of things changed."""
    items = placements(manifest, hf_cache)
    copies = [item for item in items if not item.blob_ok()]
    progress = Progress("installing model", sum(item.entry.size for item in copies))
    changed = 0
    for item in copies:
        item.blob.parent.mkdir(parents=True, exist_ok=True)
        digest = copy_and_hash(bundle / item.entry.path, item.blob, progress)
        if digest != item.entry.sha256:  # changed since it was verified: leave no bad blob
            item.blob.unlink(missing_ok=True)
            raise BundleError(f"{item.entry.path} changed while it was copied: run airgate "
                              f"unbundle again (it verifies first)")
        item.blob.chmod(0o644)
        changed += 1
    progress.finish()
    for item in items:
        if not item.link_ok():
            _link(item)
            changed += 1
    if not _ref_ok(manifest, hf_cache):
        ref = _ref_path(manifest, hf_cache)
        ref.parent.mkdir(parents=True, exist_ok=True)
        temp = ref.with_name("main.airgate-tmp")
        temp.write_text(str(manifest.model["revision"]))  # no newline, as huggingface_hub writes
        os.replace(temp, ref)
        changed += 1
    return changed
