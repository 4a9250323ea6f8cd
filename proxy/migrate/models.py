"""What the two sides decided, in airgate's terms: the SiteConfig the Nginx side fills (with
the bearer tokens and secrets it found, and the `map` blocks it collected) and the
LauncherPlan the docker side fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.migrate.common import DEFAULT_UPSTREAM


@dataclass
class TokenLine:
    name: str
    secret: str  # never printed, never written anywhere but as a digest
    where: str


@dataclass
class Secret:
    """A secret for a file beside the tokens file. value None: the operator must write it."""

    file_name: str
    value: str | None
    where: str
    origin: str
    label: str = ""  # how the source named it (`HF_TOKEN`, `--api-key`); origin when empty


@dataclass
class SiteConfig:
    """What the Nginx site decided, in airgate's terms. `why` holds a comment per TOML key."""

    https: str = ""
    http: str = ""
    server_name: str = ""
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    upstream_url: str = DEFAULT_UPSTREAM
    read_timeout: float | None = None
    connect_timeout: float | None = None
    max_body: int | None = None
    keepalive_timeout: float | None = None
    header_timeout: float | None = None
    access_log: str | None = None  # a path, or "off"
    tokens: list[TokenLine] = field(default_factory=list)
    upstream_key: Secret | None = None
    why: dict[str, str] = field(default_factory=dict)


@dataclass
class MapBlock:
    """`map $http_authorization $ok { "Bearer a" 1; default 0; }`: one entry per token."""

    variable: str
    where: str
    entries: list[tuple[str, str, str, str]]  # (key, value, comment, where)
    default: str = ""


@dataclass
class LauncherPlan:
    runtime: str = "docker"
    image: str = ""
    model: str = ""
    served_model_name: str = ""
    preset: str = ""
    gpus: str = ""
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    port: int | None = None
    hf_cache: str = ""
    extra_args: list[str] = field(default_factory=list)
    secrets: dict[str, Secret] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
