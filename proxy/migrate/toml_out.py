"""The airgate config that `airgate import-nginx` prints: TOML values, sections and comments."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from proxy.migrate.common import HF_TOKEN_FILE, VLLM_KEY_FILE, TomlValue
from proxy.migrate.models import LauncherPlan, SiteConfig

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in value:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to TOML")
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    return "[" + ", ".join(toml_string(item) for item in value) + "]"


def toml_comment(text: str) -> str:
    return "# " + " ".join(text.split())


@dataclass
class TomlSection:
    name: str
    comment: str = ""
    entries: list[tuple[str, TomlValue, str]] = field(default_factory=list)

    def add(self, key: str, value: TomlValue, comment: str = "") -> None:
        self.entries.append((key, value, comment))

    def render(self) -> str:
        lines = [toml_comment(self.comment)] if self.comment else []
        lines.append(f"[{self.name}]")
        for key, value, comment in self.entries:
            if comment:
                lines.append(toml_comment(comment))
            lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def listen_section(site: SiteConfig) -> TomlSection:
    section = TomlSection("listen")
    section.add("https", site.https, site.why.get("https", ""))
    section.add("http", site.http, site.why.get("http", "no plain-HTTP server in the Nginx file: "
                                                        "nothing listens on port 80"))
    if site.server_name:
        section.add("server_name", site.server_name, site.why.get("server_name", ""))
    if site.cert:
        section.add("cert", site.cert, site.why.get("cert", ""))
    if site.key:
        section.add("key", site.key, site.why.get("key", ""))
    if site.client_ca:
        section.add("client_ca", site.client_ca, "clients must present a certificate from this CA")
    return section


def auth_section(tokens_file: Path) -> TomlSection:
    section = TomlSection("auth")
    section.add("tokens_file", str(tokens_file), "NAME sha256:HEX lines, digests only; add a "
                "token with `airgate token new NAME --file " + str(tokens_file) + "`")
    return section


def upstream_section(site: SiteConfig, key_file: Path | None) -> TomlSection:
    section = TomlSection("upstream")
    section.add("url", site.upstream_url, site.why.get("url", ""))
    if key_file is not None:
        section.add("api_key_file", str(key_file), "sent to vLLM as its --api-key; " +
                    site.why.get("api_key_file", "from VLLM_API_KEY of the docker command"))
    if site.read_timeout is not None:
        section.add("read_timeout", site.read_timeout, site.why["read_timeout"])
    if site.connect_timeout is not None:
        section.add("connect_timeout", site.connect_timeout, site.why["connect_timeout"])
    if site.max_body is not None:
        section.add("max_body", site.max_body, site.why["max_body"] + " (bytes)")
    return section


def server_section(site: SiteConfig) -> TomlSection | None:
    section = TomlSection("server")
    if site.keepalive_timeout is not None:
        section.add("keepalive_timeout", site.keepalive_timeout, site.why["keepalive_timeout"])
    if site.header_timeout is not None:
        section.add("header_timeout", site.header_timeout, site.why["header_timeout"])
    return section if section.entries else None


def log_section(site: SiteConfig) -> TomlSection | None:
    if site.access_log is None:
        return None
    section = TomlSection("log")
    if site.access_log == "off":
        section.add("access", "off", site.why["access"])
    else:
        section.add("access", "combined", site.why["access"])
        section.add("access_file", site.access_log)
    return section


def launcher_section(plan: LauncherPlan, secret_files: dict[str, Path]) -> TomlSection:
    section = TomlSection("launcher", "how airgate runs vLLM, from the docker command")
    section.add("runtime", plan.runtime)
    if plan.image:
        section.add("image", plan.image, plan.why.get("image", ""))
    if plan.model:
        section.add("model", plan.model, plan.why.get("model", ""))
    if plan.served_model_name:
        section.add("served_model_name", plan.served_model_name,
                    plan.why.get("served_model_name", ""))
    section.add("preset", plan.preset, plan.why.get("preset", "no known tool-calling flag set: "
                                                              "every vLLM flag is in extra_args"))
    if plan.gpus:
        section.add("gpus", plan.gpus, plan.why.get("gpus", ""))
    if plan.tensor_parallel_size is not None:
        section.add("tensor_parallel_size", plan.tensor_parallel_size)
    if plan.gpu_memory_utilization is not None:
        section.add("gpu_memory_utilization", plan.gpu_memory_utilization)
    if plan.port is not None:
        section.add("port", plan.port, plan.why.get("port", ""))
    if plan.hf_cache:
        section.add("hf_cache", plan.hf_cache, plan.why.get("hf_cache", ""))
    if HF_TOKEN_FILE in secret_files:
        section.add("hf_token_file", str(secret_files[HF_TOKEN_FILE]),
                    "the Hugging Face token, off the command line")
    if VLLM_KEY_FILE in secret_files:
        section.add("api_key_file", str(secret_files[VLLM_KEY_FILE]),
                    "vLLM's --api-key, off the command line (and out of `ps`)")
    section.add("extra_args", plan.extra_args, "the other vLLM arguments, as written")
    return section


def render_config(source: Path, docker: Path | None, sections: Sequence[TomlSection]) -> str:
    header = [
        toml_comment(f"airgate configuration written by `airgate import-nginx` from {source}"
                     + (f" and {docker}" if docker else "") + "."),
        toml_comment("Keys not written here keep their defaults; `airgate check --config FILE` "
                     "prints the effective settings."),
    ]
    if docker is None:
        header.append(toml_comment("No [launcher]: pass --docker-command FILE to carry over the "
                                   "vLLM container too."))
    return "\n".join(header) + "\n\n" + "\n".join(section.render() for section in sections)
