"""The launch command: presets, extra_args, the exact argv per runtime, secrets, --print."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.launcher.command import (
    LaunchError,
    build_command,
    config_hash,
    gpu_ids,
    read_secrets,
)
from proxy.launcher.presets import PRESETS, merge_args, preset_flags
from proxy.settings import LauncherSettings

MISTRAL = ["--tool-call-parser", "mistral", "--tokenizer-mode", "mistral", "--config-format",
           "mistral", "--load-format", "mistral", "--enable-auto-tool-choice"]
SECRETS = {"VLLM_API_KEY": "sk-secret-1", "HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN":
           "hf_secret"}


def seed_settings(**overrides: object) -> LauncherSettings:
    values: dict[str, object] = {
        "model": "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "port": 8000,
        "hf_cache": "/root/.cache/huggingface", "api_key_file": "/etc/airgate/api_key",
        "hf_token_file": "/etc/airgate/hf_token", "container_name": "airgate-vllm",
    }
    values.update(overrides)
    return LauncherSettings(**values)  # type: ignore[arg-type]


def test_presets() -> None:
    assert list(preset_flags("mistral")) == MISTRAL
    assert preset_flags("llama3") == ("--tool-call-parser", "llama3_json",
                                      "--enable-auto-tool-choice")
    assert preset_flags("hermes") == ("--tool-call-parser", "hermes", "--enable-auto-tool-choice")
    assert preset_flags("none") == preset_flags("") == ()
    with pytest.raises(ValueError, match="'mistral', 'llama3', 'hermes', 'none'"):
        preset_flags("qwen")
    assert set(PRESETS) == {"mistral", "llama3", "hermes", "none", ""}


def test_extra_args_replace_rather_than_repeat() -> None:
    merged = merge_args(MISTRAL, ["--tool-call-parser", "pythonic", "--max-model-len", "32768"])
    assert merged.count("--tool-call-parser") == 1
    # In the preset's place, so the command still reads in the seed's order.
    assert merged[:2] == ["--tool-call-parser", "pythonic"]
    assert merged[-2:] == ["--max-model-len", "32768"]
    assert merge_args(["--a", "1"], ["--a=2"]) == ["--a=2"]
    # A boolean flag and its --no- twin replace each other.
    assert merge_args(MISTRAL, ["--no-enable-auto-tool-choice"])[-1] == \
        "--no-enable-auto-tool-choice"
    assert "--enable-auto-tool-choice" not in merge_args(MISTRAL, ["--no-enable-auto-tool-choice"])
    # Values that look negative stay values.
    assert merge_args(["--seed", "1"], ["--seed", "-1"]) == ["--seed", "-1"]


def test_docker_argv_is_the_seeds_command_made_safe() -> None:
    command = build_command(seed_settings(), SECRETS, "/usr/bin/docker")
    label = f"airgate.config={command.config_hash}"
    assert list(command.argv) == [
        "/usr/bin/docker", "run", "-d", "--name", "airgate-vllm", "--label", label,
        "--gpus", "all",
        "-v", "/root/.cache/huggingface:/root/.cache/huggingface",
        "--ipc=host",
        "-p", "127.0.0.1:8000:8000",
        "-e", "HF_HUB_OFFLINE=1", "-e", "TRANSFORMERS_OFFLINE=1",
        "--env-file", "<env-file>",
        "--pull", "never",
        "vllm/vllm-openai:v0.9.1",
        "--model", "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        "--gpu-memory-utilization", "0.90", "--tensor-parallel-size", "2", *MISTRAL,
    ]
    assert command.env_file_content() == (
        "VLLM_API_KEY=sk-secret-1\nHF_TOKEN=hf_secret\nHUGGING_FACE_HUB_TOKEN=hf_secret\n")
    assert command.argv_with_env_file("/run/airgate/private/x.env")[19] == \
        "/run/airgate/private/x.env"


def test_podman_argv_uses_cdi() -> None:
    command = build_command(seed_settings(runtime="podman", offline=False, gpus="0,1",
                                          served_model_name="mistral-small"), SECRETS, "podman")
    label = f"airgate.config={command.config_hash}"
    assert list(command.argv) == [
        "podman", "run", "-d", "--name", "airgate-vllm", "--label", label,
        "--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1",
        "--security-opt", "label=disable",
        "-v", "/root/.cache/huggingface:/root/.cache/huggingface",
        "--ipc=host",
        "-p", "127.0.0.1:8000:8000",
        "--env-file", "<env-file>",
        "vllm/vllm-openai:v0.9.1",
        "--model", "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        "--served-model-name", "mistral-small",
        "--gpu-memory-utilization", "0.90", "--tensor-parallel-size", "2", *MISTRAL,
    ]
    everything = build_command(seed_settings(runtime="podman"), {}, "podman")
    assert "nvidia.com/gpu=all" in everything.argv
    assert "--env-file" not in everything.argv  # no secrets, no file


def test_process_argv_and_environment() -> None:
    settings = seed_settings(runtime="process", vllm_command=("/opt/vllm/bin/vllm",),
                             preset="llama3", gpus="2", gpu_memory_utilization=0.925,
                             extra_args=("--max-model-len", "8192"))
    command = build_command(settings, SECRETS, "")
    assert list(command.argv) == [
        "/opt/vllm/bin/vllm", "serve", "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
        "--host", "127.0.0.1", "--port", "8000",
        "--gpu-memory-utilization", "0.925", "--tensor-parallel-size", "2",
        "--tool-call-parser", "llama3_json", "--enable-auto-tool-choice",
        "--max-model-len", "8192",
    ]
    assert dict(command.env) == {"HF_HOME": "/root/.cache/huggingface", "HF_HUB_OFFLINE": "1",
                                 "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert dict(command.secret_env) == SECRETS


def test_gpu_selection() -> None:
    assert gpu_ids("all") is None
    assert gpu_ids("2") == ["0", "1"]
    assert gpu_ids("1,3") == ["1", "3"]
    assert gpu_ids("none") == []
    docker = build_command(seed_settings(gpus="1,3"), {}, "docker").argv
    assert docker[docker.index("--gpus") + 1] == '"device=1,3"'  # docker's CSV quoting
    assert "--gpus" not in build_command(seed_settings(gpus="none"), {}, "docker").argv


def test_secrets_are_never_in_argv_and_masked_in_print() -> None:
    for runtime in ("docker", "podman", "process"):
        command = build_command(seed_settings(runtime=runtime), SECRETS, runtime)
        text = command.masked()
        for secret in SECRETS.values():
            assert all(secret not in arg for arg in command.argv)
            assert secret not in text
        assert "VLLM_API_KEY=***" in text and "HF_TOKEN=***" in text
        assert "--tensor-parallel-size 2" in text
    printed = build_command(seed_settings(), SECRETS, "docker").masked()
    assert printed.startswith("docker run -d \\\n    --name airgate-vllm \\\n")
    assert "    vllm/vllm-openai:v0.9.1 \\\n    --model mistralai/" in printed
    assert "env file (mode 0600, deleted once read): VLLM_API_KEY=*** HF_TOKEN=***" in printed


@pytest.mark.parametrize("option", ["--host", "--port", "--model", "--api-key"])
def test_extra_args_may_not_take_what_the_launcher_owns(option: str) -> None:
    with pytest.raises(LaunchError, match=f"must not contain {option}"):
        build_command(seed_settings(extra_args=(option, "x")), {}, "docker")


def test_config_hash_follows_the_effective_config() -> None:
    base = build_command(seed_settings(), SECRETS, "/usr/bin/docker").config_hash
    assert build_command(seed_settings(), SECRETS, "/usr/local/bin/docker").config_hash == base
    assert build_command(seed_settings(), dict(SECRETS, VLLM_API_KEY="new"),
                         "docker").config_hash != base
    assert build_command(seed_settings(extra_args=("--max-model-len", "4096")), SECRETS,
                         "docker").config_hash != base
    assert config_hash(["a"], {}, {}) != config_hash(["b"], {}, {})


def test_read_secrets(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("  sk-abc \n")
    settings = seed_settings(api_key_file=str(key), hf_token_file="")
    assert read_secrets(settings) == {"VLLM_API_KEY": "sk-abc"}
    with pytest.raises(LaunchError, match=r"api_key_file .*missing.*No such file"):
        read_secrets(seed_settings(api_key_file=str(tmp_path / "missing"), hf_token_file=""))
    key.write_text("\n")
    with pytest.raises(LaunchError, match="is empty"):
        read_secrets(settings)
    key.write_text("a\nb\n")
    with pytest.raises(LaunchError, match="several lines"):
        read_secrets(settings)
