"""airgate bundle / unbundle and the launcher's offline checks, against the stand-in docker.

Two "machines" share the test: the connected one (where `bundle` pulls and saves) and the
air-gapped one (a fresh $FAKE_RUNTIME_STATE, so its image store is empty until `unbundle` loads).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_runtime.harness import FakeRuntime, install_fake_runtime, make_settings, supervise
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

from proxy.bundle_files import PARTIAL, Progress, copy_and_hash
from proxy.cli import main
from proxy.launcher import checks, offline
from proxy.launcher.command import LaunchError
from proxy.settings import LauncherSettings

MODEL = "acme/Tiny-Model"
IMAGE = "vllm/vllm-openai:v0.9.1"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    runtime = install_fake_runtime(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_RUNTIME_IMAGE_STORE", "1")
    yield runtime
    runtime.kill_all()


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A few small files shaped like a Hub model: config, tokenizer, two shards and their index."""
    root = tmp_path / "tiny-model"
    (root / "nested").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"]}))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    for index, name in enumerate(SHARDS):
        (root / name).write_bytes(os.urandom(50_000 + index))
    weight_map = {"a.weight": SHARDS[0], "b.weight": SHARDS[1]}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "nested" / "chat_template.jinja").write_text("{{ messages }}")
    return root


@pytest.fixture
def settings(tmp_path: Path, fake: FakeRuntime) -> LauncherSettings:
    return make_settings(tmp_path, fake, seed_cache=False, model=MODEL, image=IMAGE)


@pytest.fixture
def config(tmp_path: Path, settings: LauncherSettings) -> Path:
    path = tmp_path / "airgate.toml"
    path.write_text("[launcher]\n" + "".join(
        f"{key} = {json.dumps(getattr(settings, key))}\n"
        for key in ("runtime", "runtime_command", "image", "model", "hf_cache", "hf_token_file",
                    "api_key_file")))
    return path


def airgap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """From here on the stand-in docker is the air-gapped server's: no images yet."""
    state = tmp_path / "airgapped-state"
    state.mkdir()
    monkeypatch.setenv("FAKE_RUNTIME_STATE", str(state))
    return state


def bundle(config: Path, out: Path, model_dir: Path) -> int:
    return main(["bundle", "--config", str(config), "--out", str(out),
                 "--model-dir", str(model_dir)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> list[tuple[str, int, str]]:
    """Every entry under root with its mtime and link target: equal lists = nothing changed."""
    if not root.exists():
        return []
    return [(str(path), path.lstat().st_mtime_ns, os.readlink(path) if path.is_symlink() else "")
            for path in sorted(root.rglob("*"))]


def test_bundle_writes_image_model_and_manifest(tmp_path: Path, fake: FakeRuntime,
                                                config: Path, tiny_model: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    image_id = json.loads(next((fake.state / "images").glob("*.json")).read_text())["id"]
    assert manifest["image"]["reference"] == IMAGE and manifest["image"]["id"] == image_id
    assert manifest["image"]["repo_digests"][0].startswith("vllm/vllm-openai@sha256:")
    assert manifest["model"]["id"] == MODEL and manifest["model"]["source"] == "local"
    assert len(manifest["model"]["revision"]) == 40
    assert manifest["airgate_version"]
    paths = [item["path"] for item in manifest["files"]]
    assert "image.tar" in paths and "model/nested/chat_template.jinja" in paths
    assert len(paths) == 7
    for item in manifest["files"]:
        assert item["size"] == (out / item["path"]).stat().st_size
        assert item["sha256"] == sha256(out / item["path"])
    assert not (out / PARTIAL).exists()
    assert fake.verbs()[:2] == ["pull", "image"] and "save" in fake.verbs()
    captured = capsys.readouterr()
    assert "copying and hashing" in captured.err and f"airgate unbundle {out}" in captured.out
    assert main(["bundle", "--verify", str(out)]) == 0
    assert "every sha256 matches" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_verify_names_the_bad_file(tmp_path: Path, fake: FakeRuntime, config: Path,
                                   tiny_model: Path, capsys: pytest.CaptureFixture[str],
                                   damage: str) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    damage_file(out / "model" / SHARDS[1], damage)
    capsys.readouterr()
    assert main(["bundle", "--verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"BAD model/{SHARDS[1]}: {damage}" in text
    assert "1 of 7 file(s) bad" in text


def damage_file(path: Path, damage: str) -> None:
    if damage == "corrupt":  # one byte flipped, same size
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.unlink()


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_unbundle_refuses_a_damaged_bundle(tmp_path: Path, fake: FakeRuntime, config: Path,
                                           tiny_model: Path, settings: LauncherSettings,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           damage: str) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    airgap(tmp_path, monkeypatch)
    damage_file(out / "model" / SHARDS[0], damage)
    capsys.readouterr()
    assert main(["unbundle", str(out), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"model/{SHARDS[0]}: {damage}" in err and "nothing was installed" in err
    assert tree(Path(settings.hf_cache)) == []  # no model placed
    assert "load" not in fake.verbs()  # and no image loaded


def assert_in_cache_as_downloaded(hub: Path, tiny_model: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    info = scan_cache_dir(hub)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == MODEL and set(repo.refs) == {"main"}
    files = {file.file_path.relative_to(repo.refs["main"].snapshot_path).as_posix()
             for file in repo.refs["main"].files}
    assert files == {"config.json", "tokenizer.json", "model.safetensors.index.json", *SHARDS,
                     "nested/chat_template.jinja"}
    cached = try_to_load_from_cache(MODEL, SHARDS[1], cache_dir=hub)
    assert isinstance(cached, str) and Path(cached).read_bytes() == \
        (tiny_model / SHARDS[1]).read_bytes()
    # What vLLM does with HF_HUB_OFFLINE=1: resolve the id to the snapshot, no network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = snapshot_download(MODEL, cache_dir=hub, local_files_only=True)
    assert isinstance(snapshot, str) and (Path(snapshot) / "config.json").is_file()


async def test_unbundle_installs_and_vllm_starts_offline(
        tmp_path: Path, fake: FakeRuntime, config: Path, tiny_model: Path,
        settings: LauncherSettings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    state = airgap(tmp_path, monkeypatch)
    with pytest.raises(LaunchError, match="is not on this host"):
        await offline.check_offline(settings, settings.runtime_command)
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    assert "ready: airgate run" in capsys.readouterr().out
    assert_in_cache_as_downloaded(Path(settings.hf_cache) / "hub", tiny_model, monkeypatch)
    await offline.check_offline(settings, settings.runtime_command)  # passes now
    async with supervise(settings) as run:
        await run.watch.until("ready")
        container = json.loads(
            (state / "containers" / f"{settings.container_name}.json").read_text())
        await run.finish()
    (run_argv,) = [argv for argv in fake.calls() if argv[0] == "run"]
    assert ["--pull", "never"] == run_argv[run_argv.index("--pull"):run_argv.index("--pull") + 2]
    assert "HF_HUB_OFFLINE=1" in run_argv and "TRANSFORMERS_OFFLINE=1" in run_argv
    assert {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} <= set(container["env_names"])


def test_unbundle_twice_changes_nothing(tmp_path: Path, fake: FakeRuntime, config: Path,
                                        tiny_model: Path, settings: LauncherSettings,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    airgap(tmp_path, monkeypatch)
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    before = tree(Path(settings.hf_cache))
    loads = fake.verbs().count("load")
    capsys.readouterr()
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    assert "already installed, nothing changed" in capsys.readouterr().out
    assert tree(Path(settings.hf_cache)) == before
    assert loads == 1 and fake.verbs().count("load") == 1


def test_unbundle_repairs_a_damaged_cache(tmp_path: Path, fake: FakeRuntime, config: Path,
                                          tiny_model: Path, settings: LauncherSettings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    airgap(tmp_path, monkeypatch)
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    blob = Path(settings.hf_cache) / "hub" / offline.cache_folder(MODEL) / "blobs" / \
        sha256(tiny_model / SHARDS[0])
    blob.unlink()
    problem = offline.model_problem(settings)
    assert problem is not None and "damaged in the cache" in problem
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    assert offline.model_problem(settings) is None and fake.verbs().count("load") == 1


async def test_missing_model_is_named_not_started(tmp_path: Path, fake: FakeRuntime,
                                                  settings: LauncherSettings,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    await run_quiet_pull(fake)  # the image is here; only the model is not
    with pytest.raises(LaunchError) as caught:
        await offline.check_offline(settings, settings.runtime_command)
    message = str(caught.value)
    assert f"model {MODEL} is not in the cache" in message
    assert "airgate bundle --config F --out DIR" in message
    assert "airgate unbundle DIR --config F" in message
    # Wired the way the launcher's pre-start checks would call it: a fatal state, no `run`.
    real_check_all = checks.check_all

    async def check_all(s: LauncherSettings, binary: str) -> Any:
        await offline.check_offline(s, binary)
        return await real_check_all(s, binary)

    monkeypatch.setattr(checks, "check_all", check_all)
    async with supervise(settings.model_copy(update={"max_quick_failures": 1})) as run:
        fatal = await run.watch.until("fatal")
    assert f"model {MODEL} is not in the cache" in fatal.last_exit_reason
    assert "run" not in fake.verbs()


async def run_quiet_pull(fake: FakeRuntime) -> None:
    from proxy.launcher.runtime import run_quiet

    status, out = await run_quiet(fake.binary(), "pull", IMAGE)
    assert status == 0, out


async def test_offline_false_skips_the_checks(settings: LauncherSettings) -> None:
    await offline.check_offline(settings.model_copy(update={"offline": False}),
                                settings.runtime_command)


def test_model_as_a_local_directory(tmp_path: Path, settings: LauncherSettings,
                                    tiny_model: Path) -> None:
    local = settings.model_copy(update={"model": str(tiny_model)})
    offline.check_model(local)
    (tiny_model / "config.json").unlink()
    with pytest.raises(LaunchError, match=r"holds no config\.json"):
        offline.check_model(local)


def test_incomplete_snapshot_names_the_missing_shard(tmp_path: Path, fake: FakeRuntime,
                                                     config: Path, tiny_model: Path,
                                                     settings: LauncherSettings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    assert bundle(config, out, tiny_model) == 0
    airgap(tmp_path, monkeypatch)
    assert main(["unbundle", str(out), "--config", str(config)]) == 0
    repo = scan_cache_dir(Path(settings.hf_cache) / "hub").repos
    (snapshot,) = [rev.snapshot_path for item in repo for rev in item.revisions]
    (snapshot / SHARDS[1]).unlink()
    problem = offline.model_problem(settings)
    assert problem is not None and f"lacks {SHARDS[1]}" in problem


def test_bundle_resumes_after_an_interruption(tmp_path: Path, fake: FakeRuntime, config: Path,
                                              tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bundle"
    real = copy_and_hash
    copied: list[str] = []

    def interrupt_after_three(source: Path | None, target: Path, progress: Progress) -> str:
        if len(copied) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        copied.append(target.relative_to(out).as_posix())
        return real(source, target, progress)

    monkeypatch.setattr("proxy.bundle.copy_and_hash", interrupt_after_three)
    assert bundle(config, out, tiny_model) == 130  # what airgate exits with on Ctrl-C
    assert not (out / "manifest.json").exists() and (out / PARTIAL).exists()
    first = list(copied)
    # One file changes at the source after being bundled: it must be copied again.
    (tiny_model / "config.json").write_text(json.dumps({"architectures": ["Changed"]}))
    copied.clear()

    def note(source: Path | None, target: Path, progress: Progress) -> str:
        copied.append(target.relative_to(out).as_posix())
        return real(source, target, progress)

    monkeypatch.setattr("proxy.bundle.copy_and_hash", note)
    assert bundle(config, out, tiny_model) == 0
    assert "image.tar" in first and "image.tar" not in copied
    assert fake.verbs().count("save") == 1  # the image was not saved again
    assert (set(first) - {"model/config.json"}) & set(copied) == set()
    assert "model/config.json" in copied and len(first) + len(copied) == 7 + 1
    assert main(["bundle", "--verify", str(out)]) == 0


def test_bundle_from_the_hub_uses_the_token_and_pins_the_revision(
        tmp_path: Path, fake: FakeRuntime, config: Path, tiny_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    seen: dict[str, Any] = {}

    class Info:
        sha = "0123456789abcdef0123456789abcdef01234567"

    def model_info(self: object, repo_id: str, **kwargs: Any) -> Info:
        seen["info"] = (repo_id, kwargs.get("token"))
        return Info()

    def download(**kwargs: Any) -> str:
        seen["download"] = kwargs
        target = Path(kwargs["local_dir"])
        target.mkdir(parents=True, exist_ok=True)
        for path in tiny_model.rglob("*"):
            if path.is_file():
                dest = target / path.relative_to(tiny_model)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(path.read_bytes())
        (target / ".cache" / "huggingface").mkdir(parents=True)
        (target / ".cache" / "huggingface" / "config.json.metadata").write_text("x")
        return str(target)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    out = tmp_path / "bundle"
    assert main(["bundle", "--config", str(config), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"id": MODEL, "revision": Info.sha, "source": "hub"}
    assert seen["info"] == (MODEL, "hf_test_token_abcdefghijkl")
    assert seen["download"]["token"] == "hf_test_token_abcdefghijkl"
    assert seen["download"]["revision"] == Info.sha and seen["download"]["repo_id"] == MODEL
    assert not any(".cache" in item["path"] for item in manifest["files"])


def test_unbundle_without_manifest_says_what_is_wrong(tmp_path: Path, config: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "half").mkdir()
    assert main(["unbundle", str(tmp_path / "half"), "--config", str(config)]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err


def test_progress_shows_bytes_rate_and_time_left() -> None:
    stream = io.StringIO()
    progress = Progress("hashing", 3_000_000_000, stream, interval=0.0)
    progress.start_file("image.tar")
    progress.advance(1_500_000_000)
    progress.finish()
    first, last = stream.getvalue().splitlines()
    assert first.startswith("hashing image.tar: 1.5 GB of 3.0 GB (50%), ")
    assert "/s, " in first and first.endswith(" left")
    assert last.startswith("hashing: 1.5 GB in ")
