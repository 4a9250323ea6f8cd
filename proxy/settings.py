"""airgate's configuration: one TOML file, every key overridable by an AIRGATE_ variable.

Settings are plain frozen data. Objects derived from them (SSL contexts, the token store,
the upstream pool) are built once elsewhere and passed explicitly.

Paths: a relative path is read relative to the config file's directory; a value of the form
``credential:NAME`` is read from systemd's ``$CREDENTIALS_DIRECTORY/NAME`` (``LoadCredential=``),
so no secret ever has to be written into the unit or onto a command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG = Path("/etc/airgate/airgate.toml")
CREDENTIAL_PREFIX = "credential:"

DEFAULT_ALLOW = (
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /v1/models",
)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def parse_hostport(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'0.0.0.0:443' -> ('0.0.0.0', 443); '[::1]:8443' -> ('::1', 8443); ':80' -> default host."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not HOST:PORT (for example 0.0.0.0:443)")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} in {value!r} is out of range 0-65535")
    host = host.strip("[]") or default_host
    return host, number


def _check_hostport(value: str) -> str:
    if value:
        parse_hostport(value)
    return value


class ListenSettings(Section):
    https: str = "0.0.0.0:443"
    http: str = "0.0.0.0:80"
    server_name: str = "llm.example.com"
    cert: str = "/etc/letsencrypt/live/llm.example.com/fullchain.pem"
    key: str = "/etc/letsencrypt/live/llm.example.com/privkey.pem"
    client_ca: str = ""
    tls_handshake_timeout: float = Field(10.0, gt=0)

    _hostports = field_validator("https", "http")(_check_hostport)


class AuthSettings(Section):
    tokens_file: str = "/etc/airgate/tokens"
    # Failed-auth throttling per client address: `fail_limit` failures in `fail_window`
    # seconds block that address for `block_seconds` (429 + Retry-After), right token or not.
    fail_limit: int = Field(10, ge=0)
    fail_window: float = Field(60.0, gt=0)
    block_seconds: float = Field(60.0, gt=0)
    # Per-token limits; 0 = unlimited.
    max_concurrent: int = Field(0, ge=0)
    requests_per_minute: int = Field(0, ge=0)


class UpstreamSettings(Section):
    url: str = "http://127.0.0.1:8000"
    api_key_file: str = ""
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(900.0, gt=0)
    max_body: ByteSize = ByteSize(64 * 1024 * 1024)
    allow: tuple[str, ...] = DEFAULT_ALLOW
    model_alias: str = ""
    # vLLM closes idle keep-alive connections after 5 s; ours must be dropped before that.
    pool_idle_timeout: float = Field(4.0, gt=0, lt=5.0)
    max_connecting: int = Field(64, ge=1)
    health_interval: float = Field(2.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith("http://"):
            raise ValueError("upstream.url must be http://HOST:PORT (vLLM on loopback)")
        parse_hostport(value.removeprefix("http://").rstrip("/"), default_host="127.0.0.1")
        return value.rstrip("/")

    @field_validator("allow")
    @classmethod
    def _routes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for route in value:
            method, _, path = route.partition(" ")
            if method not in {"GET", "POST"} or not path.startswith("/"):
                raise ValueError(f"allow entry {route!r} must be 'GET /path' or 'POST /path'")
        return value

    @property
    def hostport(self) -> tuple[str, int]:
        return parse_hostport(self.url.removeprefix("http://"), default_host="127.0.0.1")


class ServerSettings(Section):
    workers: int = Field(1, ge=1, le=64)
    drain_timeout: float = Field(600.0, ge=0)
    header_timeout: float = Field(30.0, gt=0)
    keepalive_timeout: float = Field(75.0, gt=0)
    max_header_size: ByteSize = ByteSize(16 * 1024)
    max_headers: int = Field(100, ge=8)
    max_connections: int = Field(10000, ge=1)


class MetricsSettings(Section):
    listen: str = "127.0.0.1:9180"
    token_file: str = ""
    usage: bool = True
    upstream_timeout: float = Field(2.0, gt=0)

    _hostports = field_validator("listen")(_check_hostport)


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access: Literal["combined", "json", "off"] = "combined"
    access_file: str = ""


class LauncherSettings(Section):
    runtime: Literal["docker", "podman", "process"] = "docker"
    image: str = "vllm/vllm-openai:v0.9.1"
    model: str = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    served_model_name: str = ""
    preset: str = "mistral"
    gpus: str = "all"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    port: int = Field(8000, ge=1, le=65535)
    hf_cache: str = "/root/.cache/huggingface"
    hf_token_file: str = ""
    api_key_file: str = ""
    extra_args: tuple[str, ...] = ()
    vllm_command: tuple[str, ...] = ("vllm",)
    runtime_command: str = ""
    container_name: str = "airgate-vllm"
    start_timeout: float = Field(1800.0, gt=0)
    stop_timeout: float = Field(30.0, gt=0)
    offline: bool = True
    # Leave a container running when airgate stops, for the next airgate to adopt without a
    # model reload (restarts and upgrades become free; `systemctl stop` then leaves vLLM up).
    keep_running_on_exit: bool = False
    state_file: str = "/run/airgate/launcher.json"
    # Supervision: backoff doubles from backoff_initial up to backoff_max; a run that stayed up
    # stable_after seconds resets it; max_quick_failures crashes in a row (each before
    # stable_after) end in the fatal state.
    backoff_initial: float = Field(2.0, gt=0)
    backoff_max: float = Field(60.0, gt=0)
    stable_after: float = Field(300.0, gt=0)
    max_quick_failures: int = Field(5, ge=1)
    health_interval: float = Field(2.0, gt=0)


# Every field that names a file: relative paths in these are resolved against the config file's
# directory, and `credential:NAME` against $CREDENTIALS_DIRECTORY.
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "listen": ("cert", "key", "client_ca"),
    "auth": ("tokens_file",),
    "upstream": ("api_key_file",),
    "metrics": ("token_file",),
    "log": ("access_file",),
    "launcher": ("hf_token_file", "api_key_file", "state_file", "hf_cache"),
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AIRGATE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )
    toml_path: ClassVar[Path | None] = None

    listen: ListenSettings = ListenSettings()
    auth: AuthSettings = AuthSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    server: ServerSettings = ServerSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    launcher: LauncherSettings = LauncherSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration problem, with a message that names the key and the fix."""


def resolve_path(value: str, base: Path) -> str:
    if not value:
        return value
    if value.startswith(CREDENTIAL_PREFIX):
        name = value.removeprefix(CREDENTIAL_PREFIX)
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"{value!r} names a systemd credential but $CREDENTIALS_DIRECTORY is not set: "
                f"add LoadCredential={name}:/path/to/file to the unit, or give a file path"
            )
        return str(Path(directory) / name)
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path))


def _format_validation_error(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if errors is None:
        return str(error)
    lines = []
    for item in errors():
        key = ".".join(str(part) for part in item.get("loc", ()))
        lines.append(f"  {key}: {item.get('msg')}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read the TOML file at `path` (None: defaults and environment only) into Settings."""
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} not found: pass --config FILE or create it "
                          f"(config/airgate.toml in the source tree documents every key)")

    class FileSettings(Settings):
        toml_path = path

    try:
        raw = FileSettings(**overrides)
    except Exception as error:  # pydantic ValidationError or a TOML syntax error
        raise ConfigError(f"{path}: {_format_validation_error(error)}") from error
    base = path.parent.resolve() if path is not None else Path.cwd()
    updates: dict[str, Any] = {}
    for section, keys in PATH_FIELDS.items():
        current = getattr(raw, section)
        changed = {key: resolve_path(getattr(current, key), base) for key in keys}
        updates[section] = current.model_copy(update=changed)
    data = {name: getattr(raw, name) for name in Settings.model_fields}
    data.update(updates)
    return Settings.model_construct(**data)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as a dict, safe to print: secrets are only ever file paths here,
    so nothing needs masking except values that look like inline credentials in extra_args."""
    data = settings.model_dump(mode="json")
    extra = list(data["launcher"]["extra_args"])
    for index in range(1, len(extra)):
        if extra[index - 1] in {"--api-key", "--hf-token"}:
            extra[index] = "***"
    data["launcher"]["extra_args"] = extra
    return data
