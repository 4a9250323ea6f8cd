"""Checks before an offline start: the image is on this host and the model is in the cache.

With `[launcher] offline = true` vLLM runs with HF_HUB_OFFLINE=1 and the container with
`--pull never`, so a missing image or model can't be fetched: without these checks vLLM would fail
after minutes (or, in a closed network, hang on DNS). Each message names the missing piece and
the `airgate bundle` / `airgate unbundle` commands that bring it in.

The cache is inspected with huggingface_hub's own scanner, which reads the layout the way
`vllm serve` (through huggingface_hub) will: `hf_cache` is mounted as the container's HF_HOME (and
is HF_HOME for the process runtime), so the models live in `hf_cache/hub/models--ORG--NAME`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxy.launcher.command import LaunchError
from proxy.launcher.runtime import run_quiet
from proxy.settings import LauncherSettings

# vLLM needs one of these to know the model's architecture (params.json: Mistral's own format,
# read with --config-format mistral).
CONFIG_FILES = ("config.json", "params.json")
FIX = ("on a machine with network access run `airgate bundle --config F --out DIR`, carry DIR "
       "here, then `airgate unbundle DIR --config F`")


def hub_cache(hf_cache: str | Path) -> Path:
    """Where huggingface_hub keeps models when HF_HOME is `hf_cache`."""
    return Path(hf_cache) / "hub"


def cache_folder(model_id: str) -> str:
    """huggingface_hub's folder name for a model: models--ORG--NAME."""
    return "models--" + model_id.replace("/", "--")


def is_local_path(model: str) -> bool:
    """launcher.model names a directory rather than a Hub id ("ORG/NAME")."""
    return model.startswith(("/", "./", "../", "~")) or Path(model).is_dir()


def _local_model_problem(model: str) -> str | None:
    path = Path(model).expanduser()
    if not path.is_dir():
        return f"launcher.model {model} is not a directory: fix the path"
    if not any((path / name).is_file() for name in CONFIG_FILES):
        return (f"launcher.model {model} holds no config.json: it is not a complete model "
                f"directory; copy the model's files there again")
    return None


def _missing_shards(snapshot: Path, names: set[str]) -> list[str]:
    """Weight files that a *.index.json names but the snapshot lacks (an interrupted copy)."""
    missing: set[str] = set()
    for index in snapshot.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            missing.add(index.name + " (unreadable)")
            continue
        missing.update(str(shard) for shard in weight_map.values() if str(shard) not in names)
    return sorted(missing)


def cached_model_problem(hf_cache: str | Path, model_id: str) -> str | None:
    """Why `model_id` can't be loaded from the cache with HF_HUB_OFFLINE=1 (None: it can)."""
    from huggingface_hub import scan_cache_dir  # the bundle extra; imported only when needed
    from huggingface_hub.errors import CacheNotFound

    hub = hub_cache(hf_cache)
    where = f"{hub}/{cache_folder(model_id)}"
    try:
        info = scan_cache_dir(hub)
    except CacheNotFound:
        return f"model {model_id} is not in the cache ({hub} does not exist)"
    repo = next((item for item in info.repos
                 if item.repo_id == model_id and item.repo_type == "model"), None)
    if repo is None:
        for warning in info.warnings:
            if cache_folder(model_id) in str(warning):
                return f"model {model_id} is damaged in the cache: {warning}"
        return f"model {model_id} is not in the cache (no {where})"
    main = repo.refs.get("main")
    if main is None:
        return f"model {model_id} has no refs/main in {where}"
    names = {file.file_path.relative_to(main.snapshot_path).as_posix() for file in main.files}
    if not names.intersection(CONFIG_FILES):
        return (f"model {model_id} revision {main.commit_hash} in {where} has no config.json: "
                f"the copy is incomplete")
    shards = _missing_shards(main.snapshot_path, names)
    if shards:
        return (f"model {model_id} revision {main.commit_hash} in {where} lacks "
                f"{', '.join(shards[:5])}{' ...' if len(shards) > 5 else ''}: the copy is "
                f"incomplete")
    return None


def model_problem(settings: LauncherSettings) -> str | None:
    if is_local_path(settings.model):
        return _local_model_problem(settings.model)
    return cached_model_problem(settings.hf_cache, settings.model)


def check_model(settings: LauncherSettings) -> None:
    """Raise LaunchError naming the fix when the model can't be loaded offline."""
    if not settings.offline:
        return
    problem = model_problem(settings)
    if problem is None:
        return
    if is_local_path(settings.model):
        raise LaunchError(problem)
    raise LaunchError(f"{problem}, and offline = true never downloads: {FIX} "
                      f"(launcher.hf_cache = {settings.hf_cache})")


async def check_image(settings: LauncherSettings, binary: str) -> None:
    """The image is on this host (`image inspect`): `--pull never` can't fetch it."""
    if not settings.offline or settings.runtime == "process":
        return
    status, _ = await run_quiet(binary, "image", "inspect", settings.image, limit=20)
    if status != 0:
        raise LaunchError(f"image {settings.image} is not on this host, and offline = true "
                          f"never pulls: {FIX} (it runs `{settings.runtime} load`), or fix "
                          f"launcher.image")


async def check_offline(settings: LauncherSettings, binary: str) -> None:
    """Both checks; nothing at all with offline = false."""
    if not settings.offline:
        return
    await check_image(settings, binary)
    await asyncio.to_thread(check_model, settings)
