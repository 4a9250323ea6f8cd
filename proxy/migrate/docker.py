"""The docker side of `airgate import-nginx`: reads a `docker run ... IMAGE VLLM-ARGS` command
into a LauncherPlan, reporting each option it leaves behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.migrate.common import HF_CACHE_IN_CONTAINER, HF_TOKEN_FILE, VLLM_KEY_FILE, ImportFailure
from proxy.migrate.docker_command import (
    DOCKER_FLAGS,
    DOCKER_OPTION_REASONS,
    DOCKER_VALUE_OPTIONS,
    HF_TOKEN_VARIABLES,
    OFFLINE_VARIABLES,
    PRESETS,
    VLLM_SECRET_OPTIONS,
    Word,
    docker_words,
    is_flag_cluster,
    split_option,
)
from proxy.migrate.findings import Findings, looks_like_placeholder
from proxy.migrate.models import LauncherPlan, Secret


@dataclass
class VllmOption:
    """One vLLM argument and the values after it, as written (`--max-model-len 32768`)."""

    name: str
    values: list[str]
    line: int
    words: list[str]


class DockerTranslator:
    """Reads a `docker run ... IMAGE VLLM-ARGS` command into a LauncherPlan."""

    def __init__(self, path: Path, findings: Findings) -> None:
        self.path = path
        self.findings = findings
        self.plan = LauncherPlan()
        self.container_port: int | None = None  # the container side of -p
        self.vllm_port = 8000  # vLLM's own --port, 8000 unless given

    def at(self, word: Word) -> str:
        return f"{self.path}:{word.line}"

    def translate(self) -> LauncherPlan:
        try:
            text = self.path.read_text()
        except OSError as error:
            raise ImportFailure(f"cannot read {self.path}: {error.strerror}; pass the file "
                                "holding the guide's `docker run` command") from error
        words = docker_words(self.path, text)
        index = self._skip_to_run(words)
        index = self._docker_options(words, index)
        if index >= len(words):
            raise ImportFailure(f"{self.path}: no image after the docker options; the command "
                                "must read `docker run [OPTIONS] IMAGE [VLLM ARGS]`")
        self.plan.image = words[index].text
        self.plan.why["image"] = f"from line {words[index].line}"
        self._vllm_args(words[index + 1:])
        self._check_result(words[0])
        return self.plan

    def _skip_to_run(self, words: list[Word]) -> int:
        index = 0
        if words[index].text == "sudo":
            index += 1
        if index < len(words) and words[index].text == "podman":
            self.plan.runtime = "podman"
        if index >= len(words) or words[index].text not in {"docker", "podman", "nvidia-docker"}:
            raise ImportFailure(f"{self.path}:{words[0].line}: expected `docker run ...`")
        index += 1
        if index < len(words) and words[index].text == "container":
            index += 1
        if index >= len(words) or words[index].text != "run":
            raise ImportFailure(f"{self.path}:{words[0].line}: only `docker run` is understood")
        return index + 1

    def _docker_options(self, words: list[Word], index: int) -> int:
        while index < len(words) and words[index].text.startswith("-"):
            word = words[index]
            name, value = split_option(word.text)
            if name in DOCKER_FLAGS or is_flag_cluster(name):
                self._docker_flag(word, name)
                index += 1
                continue
            if value is None:
                if name not in DOCKER_VALUE_OPTIONS:
                    self.findings.warn(self.at(word), name, "unknown docker option; assumed it "
                                       "takes a value")
                if index + 1 >= len(words):
                    raise ImportFailure(f"{self.at(word)}: {name} needs a value")
                value = words[index + 1].text
                index += 1
            self._docker_option(word, name, value)
            index += 1
        return index

    def _docker_flag(self, word: Word, name: str) -> None:
        reason = DOCKER_OPTION_REASONS.get(name, DOCKER_OPTION_REASONS["-d"])
        self.findings.skipped(self.at(word), name, reason)

    def _docker_option(self, word: Word, name: str, value: str) -> None:
        handlers: dict[str, Callable[[Word, str], None]] = {
            "--name": self._name, "--gpus": self._gpus, "-v": self._volume,
            "--volume": self._volume, "-e": self._env, "--env": self._env,
            "-p": self._publish, "--publish": self._publish,
        }
        handler = handlers.get(name)
        if handler is not None:
            handler(word, value)
        else:
            self.findings.skipped(self.at(word), name, DOCKER_OPTION_REASONS.get(
                name, "the launcher builds the container's options itself"))

    def _name(self, word: Word, value: str) -> None:
        # Not carried over: the launcher owns its container (airgate-vllm) and replaces it on
        # restart; reusing the old name would make it replace the operator's running container.
        valid = value[:1].isalnum() and all(char.isalnum() or char in "_.-" for char in value)
        remove = f"run `docker rm -f {value}`" if valid else \
            "remove the old container (`docker ps` lists it)"
        self.findings.skipped(self.at(word), "--name", f"the launcher names its container "
                              f"[launcher] container_name (airgate-vllm); {remove} before "
                              "`airgate run`: it holds the GPUs and port 8000")

    def _gpus(self, word: Word, value: str) -> None:
        self.plan.gpus = value.strip("\"'")
        self.plan.why["gpus"] = f"from --gpus (line {word.line})"

    def _volume(self, word: Word, value: str) -> None:
        parts = value.split(":")
        if len(parts) >= 2 and parts[1].rstrip("/") == HF_CACHE_IN_CONTAINER:
            self.plan.hf_cache = parts[0]
            self.plan.why["hf_cache"] = f"from -v {parts[0]}:{parts[1]} (line {word.line})"
        else:
            self.findings.skipped(self.at(word), "-v", f"the launcher mounts only the Hugging "
                                  f"Face cache (to {HF_CACHE_IN_CONTAINER})")

    def _publish(self, word: Word, value: str) -> None:
        spec = value.split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) < 2 or not parts[-1].isdigit() or not parts[-2].isdigit():
            self.findings.skipped(self.at(word), "-p", f"{value!r} names no HOST:CONTAINER port "
                                  "pair; set [launcher] port")
            return
        if self.plan.port is not None:
            self.findings.skipped(self.at(word), "-p", f"the launcher publishes one port; kept "
                                  f"{self.plan.port}")
            return
        self.plan.port = int(parts[-2])
        self.container_port = int(parts[-1])
        self.plan.why["port"] = f"from -p {value} (line {word.line}); published on 127.0.0.1 only"
        self.findings.note(self.at(word), "-p", "airgate publishes vLLM on 127.0.0.1 only, so "
                           "nobody on the network can skip the proxy (Docker's -p used every "
                           "interface)")

    def _env(self, word: Word, value: str) -> None:
        name, has_value, given = value.partition("=")
        if name == "VLLM_API_KEY":
            self._secret(word, name, VLLM_KEY_FILE, given if has_value else None)
        elif name in HF_TOKEN_VARIABLES:
            self._secret(word, name, HF_TOKEN_FILE, given if has_value else None)
        elif name in OFFLINE_VARIABLES:
            self.findings.note(self.at(word), "--env", f"{name}: the launcher runs vLLM offline "
                               "already ([launcher] offline = true)")
        else:
            self.findings.skipped(self.at(word), "--env", f"{name}: [launcher] has no setting for "
                                  "other environment variables")

    def _secret(self, word: Word, variable: str, file_name: str, given: str | None) -> None:
        """Record a secret from `-e NAME=VALUE`, `-e NAME`, `-e NAME=$X` or `--api-key V`.

        Its value only ever goes into its file; messages name the variable and the file."""
        origin = variable if variable.startswith("-") else f"--env {variable}"
        if file_name in self.plan.secrets and self.plan.secrets[file_name].value is not None:
            self.findings.skipped(self.at(word), origin, f"a value for {file_name} was already "
                                  "given")
            return
        value = self._secret_value(word, origin, variable, file_name, given)
        # Whether it looks like the guide's placeholder is said when the file is written (a
        # file that already holds a value is kept, and then the placeholder is not written).
        self.plan.secrets[file_name] = Secret(file_name, value, self.at(word), origin, variable)

    def _secret_value(self, word: Word, origin: str, variable: str, file_name: str,
                      given: str | None) -> str | None:
        """The value as the shell would have passed it; None when only the operator knows it."""
        by_hand = f"write the value into the file {file_name} by hand (a value already there " \
                  "is kept)"
        if given is None:  # `-e NAME`: docker copies NAME from its own environment
            value = os.environ.get(variable)
            if value is None:
                self.findings.warn(self.at(word), origin, f"{variable} comes from the shell's "
                                   f"environment, which does not set it here: {by_hand}")
        elif given.startswith("$"):  # `NAME=$X` as the guides write it: the shell expands X
            value = os.environ.get(given.strip("${}"))
            if value is None:
                self.findings.warn(self.at(word), origin, f"{variable}={given} names a shell "
                                   f"variable that is not set here: {by_hand}")
        else:
            value = given
        if value == "":
            self.findings.warn(self.at(word), origin, f"{variable} is empty: {by_hand}")
            return None
        return value

    # ---- vLLM's own arguments

    def _vllm_args(self, words: list[Word]) -> None:
        texts = [word.text for word in words]
        if texts[:2] == ["vllm", "serve"]:
            words = words[2:]
        options = self._group_options(words)
        preset = self._pick_preset(options)
        for option in options:
            self._vllm_option(option, preset)

    def _group_options(self, words: list[Word]) -> list[VllmOption]:
        options: list[VllmOption] = []
        for word in words:
            if word.text.startswith("-") and not _is_number(word.text):
                name, value = split_option(word.text) if word.text.startswith("--") else (
                    word.text, None)
                options.append(VllmOption(name, [] if value is None else [value], word.line,
                                          [word.text]))
            elif options:
                options[-1].values.append(word.text)
                options[-1].words.append(word.text)
            else:  # `vllm serve MODEL`: the model given as the first positional argument
                options.append(VllmOption("--model", [word.text], word.line, [word.text]))
        return options

    @staticmethod
    def _pick_preset(options: list[VllmOption]) -> str:
        given = {option.name: (option.values[0] if option.values else "") for option in options}
        matching = [name for name, flags in PRESETS.items()
                    if all(given.get(flag) == value for flag, value in flags.items())]
        return max(matching, key=lambda name: len(PRESETS[name]), default="")

    def _vllm_option(self, option: VllmOption, preset: str) -> None:
        name, values = option.name, option.values
        where = f"{self.path}:{option.line}"
        if preset and name in PRESETS[preset]:
            self.plan.preset = preset
            flags = " ".join(f"{flag} {value}".strip() for flag, value in PRESETS[preset].items())
            self.plan.why["preset"] = f"the flag set {flags}"
        elif name in VLLM_SECRET_OPTIONS and values:
            self._secret(Word(name, option.line), name, VLLM_SECRET_OPTIONS[name], values[0])
        elif name == "--model" and values:
            self._set_once("model", values[0], option)
        elif name == "--served-model-name" and values:
            self._set_once("served_model_name", values[0], option)
            if len(values) > 1:
                self.findings.note(where, name, f"airgate serves one name; kept {values[0]} "
                                   "(see [upstream] model_alias for a stable second name)")
        elif name in {"--tensor-parallel-size", "-tp"} and values:
            self._set_number("tensor_parallel_size", values[0], option, int)
        elif name == "--gpu-memory-utilization" and values:
            self._set_number("gpu_memory_utilization", values[0], option, float)
        elif name == "--host":
            self.findings.skipped(where, name, "the launcher binds vLLM itself")
        elif name == "--port":
            self.findings.note(where, name, "the launcher runs vLLM on [launcher] port")
            if values and values[0].isdigit():
                self.vllm_port = int(values[0])
        else:
            self.plan.extra_args.extend(option.words)

    def _set_once(self, key: str, value: str, option: VllmOption) -> None:
        setattr(self.plan, key, value)
        self.plan.why[key] = f"from {option.name} (line {option.line})"
        if looks_like_placeholder(value):
            self.findings.warn(f"{self.path}:{option.line}", option.name, f"{value!r} looks like "
                               f"the guide's placeholder: set [launcher] {key} to the real value")

    def _set_number(self, key: str, value: str, option: VllmOption,
                    kind: Callable[[str], int | float]) -> None:
        try:
            setattr(self.plan, key, kind(value))
        except ValueError:
            self.findings.skipped(f"{self.path}:{option.line}", option.name,
                                  f"{value!r} is not a number")
            return
        self.plan.why[key] = f"from {option.name} (line {option.line})"

    def _check_result(self, first: Word) -> None:
        where = self.at(first)
        if not self.plan.model:
            self.findings.warn(where, "docker run", "no --model: set [launcher] model")
        if not self.plan.gpus:
            self.findings.warn(where, "docker run", "no --gpus: [launcher] gpus defaults to all")
        if self.container_port is not None and self.container_port != self.vllm_port:
            self.findings.warn(where, "-p", f"the container side of -p ({self.container_port}) "
                               f"is not vLLM's port ({self.vllm_port}); the launcher uses one "
                               "port, [launcher] port")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def translate_docker(path: Path, findings: Findings) -> LauncherPlan:
    return DockerTranslator(path, findings).translate()
