"""`airgate import-nginx`: carry the seed guide's Nginx site and `docker run` line over to airgate.

An operator who followed Elastic's guide has already decided the listeners, the server name, the
certificate, the bearer token and the vLLM flags; this command keeps those decisions so nothing
has to be decided twice. It writes:

- the airgate config to standard output (redirect it to airgate.toml);
- the bearer tokens, as digests only, to the tokens file (mode 0600);
- the secrets of the docker command (vLLM key, Hugging Face token) to files beside it (mode 0600);
- one `file:line: directive: reason` line per thing it did not translate, to standard error.

A secret is never printed. The Nginx file is read with crossplane, which knows Nginx's grammar
(quoting, escapes, `if (...)`, comments), never with regular expressions; the docker command is
split with shlex, as a shell would.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import crossplane

from proxy.settings import parse_hostport
from proxy.tokens import TokenFileError, TokenStore, digest

# A crossplane node: {"directive": str, "line": int, "args": [str], "block"?: [...]}.
Node = dict[str, Any]
TomlValue = str | int | float | bool | list[str]

DEFAULT_UPSTREAM = "http://127.0.0.1:8000"
VLLM_KEY_FILE = "vllm-api-key"
HF_TOKEN_FILE = "hf-token"
HF_CACHE_IN_CONTAINER = "/root/.cache/huggingface"
# Nginx resolves a relative certificate path against its prefix; /etc/nginx on every distro.
NGINX_PREFIX = PurePosixPath("/etc/nginx")
MODERN_TLS = frozenset({"TLSv1.2", "TLSv1.3"})
REDIRECT_CODES = frozenset({"301", "302", "307", "308"})
DENY_CODES = frozenset({"401", "403"})
TOKEN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")
PLACEHOLDER_WORDS = frozenset({
    "secret", "token", "secret token", "secret-token", "secret_token", "changeme", "change-me",
    "password", "example", "todo", "apikey", "api-key", "api_key", "key", "replaceme",
})
PLACEHOLDER_PREFIXES = ("your", "replace", "changeme", "insert", "put-")


class ImportFailure(Exception):
    """The input cannot be imported at all; the message names the file and the fix."""


# --------------------------------------------------------------------------- findings (stderr)


@dataclass(frozen=True, slots=True)
class Finding:
    where: str  # "file:line"
    subject: str  # the directive or option
    message: str

    def render(self) -> str:
        return f"{self.where}: {self.subject}: {self.message}"


@dataclass
class Findings:
    """Everything that standard error will say. Never holds a secret."""

    items: list[Finding] = field(default_factory=list)

    def skipped(self, where: str, subject: str, reason: str) -> None:
        self.items.append(Finding(where, subject, f"not translated: {reason}"))

    def warn(self, where: str, subject: str, message: str) -> None:
        self.items.append(Finding(where, subject, f"warning: {message}"))

    def note(self, where: str, subject: str, message: str) -> None:
        self.items.append(Finding(where, subject, f"note: {message}"))

    def in_input_order(self) -> list[Finding]:
        """Sorted by file (in order of first mention), then line: the order an editor shows."""
        files: dict[str, int] = {}
        def key(item: Finding) -> tuple[int, int]:
            name, _, line = item.where.rpartition(":")
            return files.setdefault(name, len(files)), int(line) if line.isdigit() else 0
        return sorted(self.items, key=key)

    @property
    def skipped_count(self) -> int:
        return sum(1 for item in self.items if item.message.startswith("not translated"))


def looks_like_placeholder(value: str) -> bool:
    """True for the guides' stand-ins: `<secret token>`, `[YOUR_MODEL_ID]`, `xxxx`, `changeme`."""
    text = value.strip()
    lowered = text.lower()
    if ("<" in text and ">" in text) or ("[" in text and "]" in text):
        return True
    if text and len(set(lowered)) == 1 and lowered[0] in "x*.#":
        return True
    return lowered in PLACEHOLDER_WORDS or lowered.startswith(PLACEHOLDER_PREFIXES)


# --------------------------------------------------------------------------- value parsing

_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
               "M": 2592000, "y": 31536000}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_seconds(value: str) -> float:
    """Nginx time syntax ('60', '60s', '5m', '1m30s', '500ms') in seconds."""
    total, digits, index = 0.0, "", 0
    while index < len(value):
        char = value[index]
        if char.isdigit():
            digits += char
            index += 1
            continue
        unit = "ms" if value.startswith("ms", index) else char
        if not digits or unit not in _TIME_UNITS:
            raise ValueError(f"{value!r} is not an Nginx time (like 60s or 5m)")
        total += int(digits) * _TIME_UNITS[unit]
        digits, index = "", index + len(unit)
    if digits:
        total += int(digits)  # a bare number is seconds
    if not value:
        raise ValueError("empty time value")
    return total


def nginx_bytes(value: str) -> int:
    """Nginx size syntax ('1m', '512k', '10M', '0') in bytes."""
    number, unit = (value[:-1], value[-1].lower()) if value[-1:].isalpha() else (value, "")
    if not number.isdigit() or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not an Nginx size (like 1m or 512k)")
    return int(number) * _SIZE_UNITS[unit]


def listen_address(spec: str) -> str | None:
    """An Nginx `listen` address as airgate's HOST:PORT; None for a unix socket."""
    if spec.startswith("unix:"):
        return None
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return f"[{host}]:{rest.removeprefix(':') or '80'}"
    if spec.isdigit():
        return f"0.0.0.0:{spec}"
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = spec, "80"
    return f"{'0.0.0.0' if host in ('', '*') else host}:{port}"


# --------------------------------------------------------------------------- Nginx side


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


def parse_nginx(path: Path) -> list[Node]:
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file; pass the Nginx site file "
                            "(for example /etc/nginx/sites-available/default)")
    # check_ctx/check_args off: a site file is a fragment of nginx.conf, not a whole one.
    payload = crossplane.parse(str(path), single=True, comments=True, catch_errors=True,
                               check_ctx=False, check_args=False)
    if payload["errors"]:
        error = payload["errors"][0]
        raise ImportFailure(f"{path}:{error.get('line') or '?'}: {error['error']}; fix the file "
                            "(`nginx -t` reports the same problem) and run import-nginx again")
    parsed: list[Node] = payload["config"][0]["parsed"]
    return parsed


def real_nodes(block: Iterable[Node]) -> list[Node]:
    return [node for node in block if node["directive"] != "#"]


def trailing_comment(block: Sequence[Node], index: int) -> str:
    """The `# comment` that shares a line with block[index], or ''."""
    if index + 1 < len(block):
        after = block[index + 1]
        if after["directive"] == "#" and after["line"] == block[index]["line"]:
            return str(after.get("comment", "")).strip()
    return ""


def token_name(text: str, taken: set[str], fallback: str) -> str:
    """A tokens-file NAME from a comment ('# alice (SOC)' -> 'alice-SOC'), unique in `taken`."""
    cleaned = "".join(char if char in TOKEN_NAME_CHARS else "-" for char in text.strip())
    while "--" in cleaned:
        cleaned = cleaned.replace("--", "-")
    base = cleaned.strip("-.")[:60] or fallback
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    taken.add(name)
    return name


def redirect_target(node: Node) -> str | None:
    """The https:// target of `return 301 https://...`, else None."""
    args = node["args"]
    if node["directive"] == "return" and len(args) == 2 and args[0] in REDIRECT_CODES:
        target = str(args[1])
        return target if target.startswith("https://") else None
    return None


def is_deny_block(block: Sequence[Node]) -> bool:
    return any(node["directive"] == "return" and node["args"][:1] and node["args"][0] in DENY_CODES
               for node in real_nodes(block))


# Directives with no airgate counterpart, and why; anything not listed gets a generic reason.
NOT_TRANSLATED: dict[str, str] = {
    "add_header": "airgate sets its own response headers",
    "proxy_set_header": "airgate forwards request headers itself and has no header rewriting",
    "proxy_hide_header": "airgate has no header rewriting",
    "proxy_pass_header": "airgate has no header rewriting",
    "proxy_redirect": "vLLM sends no redirects to rewrite",
    "proxy_send_timeout": "airgate has no separate send timeout (see [upstream] read_timeout)",
    "proxy_cache": "airgate caches nothing: every completion is generated afresh",
    "gzip": "airgate does not compress responses",
    "ssl_ciphers": "airgate uses Python's TLS 1.2+ cipher defaults",
    "ssl_prefer_server_ciphers": "airgate uses Python's TLS 1.2+ cipher defaults",
    "ssl_ecdh_curve": "airgate uses Python's TLS 1.2+ defaults",
    "ssl_dhparam": "airgate uses Python's TLS defaults (ECDHE key exchange needs no DH file)",
    "ssl_session_cache": "TLS session resumption is left to Python's ssl defaults",
    "ssl_session_timeout": "TLS session resumption is left to Python's ssl defaults",
    "ssl_session_tickets": "TLS session resumption is left to Python's ssl defaults",
    "ssl_stapling": "OCSP stapling is not offered",
    "ssl_stapling_verify": "OCSP stapling is not offered",
    "ssl_trusted_certificate": "OCSP stapling is not offered",
    "allow": "airgate does not filter client addresses; use the host firewall",
    "deny": "airgate does not filter client addresses; use the host firewall",
    "limit_req": "no per-address rate limit; see [auth] requests_per_minute and fail_limit",
    "limit_conn": "no per-address connection limit; see [auth] max_concurrent (per token)",
    "auth_basic": "Kibana's connector sends a bearer token; airgate checks [auth] tokens_file",
    "auth_basic_user_file": "Kibana's connector sends a bearer token; use [auth] tokens_file",
    "auth_request": "airgate checks bearer tokens itself ([auth] tokens_file)",
    "root": "airgate serves no files",
    "index": "airgate serves no files",
    "try_files": "airgate serves no files",
    "alias": "airgate serves no files",
    "error_page": "airgate answers errors with OpenAI-style JSON, which Kibana shows as is",
    "error_log": "airgate logs to standard error (the journal under systemd); see [log] level",
    "rewrite": "airgate forwards paths unchanged",
    "return": "only the redirect to HTTPS and the 401 of the token check are translated",
    "include": "not followed (import-nginx reads one file); inline what it includes, "
               "or run import-nginx on that file",
    "http2": "airgate speaks HTTP/1.1, which is what Kibana's connector uses",
    "large_client_header_buffers": "see [server] max_header_size",
    "client_body_timeout": "airgate bounds the request head only ([server] header_timeout)",
}
NOT_TRANSLATED_PREFIXES: dict[str, str] = {
    "proxy_ssl_": "airgate talks plain HTTP to vLLM on loopback",
    "proxy_cache": "airgate caches nothing",
    "gzip_": "airgate does not compress responses",
    "limit_": "no per-address limits; see [auth] requests_per_minute, max_concurrent, fail_limit",
}
GENERIC_REASON = "airgate has no setting for this"


def reason_for(directive: str) -> str:
    if directive in NOT_TRANSLATED:
        return NOT_TRANSLATED[directive]
    for prefix, reason in NOT_TRANSLATED_PREFIXES.items():
        if directive.startswith(prefix):
            return reason
    return GENERIC_REASON


class NginxTranslator:
    """Walks one Nginx file and fills a SiteConfig, reporting what it leaves behind."""

    def __init__(self, path: Path, findings: Findings, tokens_file: Path) -> None:
        self.path = path
        self.findings = findings
        self.tokens_file = tokens_file
        self.site = SiteConfig()
        self.maps: dict[str, MapBlock] = {}
        self.used_maps: set[str] = set()
        self.upstream_blocks: dict[str, list[str]] = {}
        self.token_names: set[str] = set()
        self.proxied_location: Node | None = None
        self.path_context: dict[str, str] = {}
        self.handlers: dict[str, Callable[[Node, str], None]] = {
            "server_name": self._server_name,
            "ssl_certificate": self._certificate,
            "ssl_certificate_key": self._certificate_key,
            "ssl_client_certificate": self._client_ca,
            "ssl_verify_client": self._verify_client,
            "ssl_protocols": self._ssl_protocols,
            "ssl": self._old_ssl_switch,
            "client_max_body_size": self._max_body,
            "proxy_read_timeout": self._read_timeout,
            "proxy_connect_timeout": self._connect_timeout,
            "keepalive_timeout": self._keepalive_timeout,
            "client_header_timeout": self._header_timeout,
            "proxy_buffering": self._buffering,
            "proxy_request_buffering": self._buffering,
            "proxy_http_version": self._http_version,
            "proxy_set_header": self._set_header,
            "access_log": self._access_log,
            "if": self._if,
            "location": self._location,
            "proxy_pass": self._proxy_pass,
        }

    def at(self, node: Node) -> str:
        return f"{self.path}:{node['line']}"

    def skip(self, node: Node, reason: str | None = None) -> None:
        self.findings.skipped(self.at(node), node["directive"], reason or reason_for(
            node["directive"]))

    # ---- structure

    def translate(self) -> SiteConfig:
        http_level: list[Node] = []
        servers: list[Node] = []
        self._collect(parse_nginx(self.path), http_level, servers, top=True)
        main = self._main_server(servers)
        for node in http_level:  # http{} settings are defaults for the server; apply them first
            self._directive(node, "http")
        for server in servers:
            if server is main:
                self._main_server_block(server)
            elif self._is_redirect_server(server):
                self._redirect_server_block(server)
            else:
                self.skip(server, f"airgate serves one site; the server at line "
                                  f"{main['line']} was imported")
        self._report_unused_maps()
        self._check_result(main)
        return self.site

    def _collect(self, nodes: list[Node], http_level: list[Node], servers: list[Node],
                 *, top: bool) -> None:
        for node in real_nodes(nodes):
            name = node["directive"]
            if name == "http":
                self._collect(node.get("block", []), http_level, servers, top=False)
            elif name == "server" and "block" in node:
                servers.append(node)
            elif name == "map":
                self._collect_map(node)
            elif name == "upstream":
                self._collect_upstream(node)
            elif top and name in {"events", "user", "worker_processes", "pid", "load_module",
                                  "worker_rlimit_nofile", "error_log", "stream", "mail"}:
                self.skip(node, "process-level Nginx setting; airgate has [server] workers")
            else:
                http_level.append(node)

    def _collect_map(self, node: Node) -> None:
        args = node["args"]
        if len(args) != 2 or args[0].lower() != "$http_authorization":
            self.skip(node, "airgate has no variables; only a map of $http_authorization "
                            "(bearer tokens) is translated")
            return
        block: list[Node] = node.get("block", [])
        mapping = MapBlock(args[1], self.at(node), [])
        for index, entry in enumerate(block):
            key, values = entry["directive"], entry["args"]
            if key == "#" or key in {"hostnames", "volatile"}:
                continue
            if key == "default":
                mapping.default = values[0] if values else ""
            else:
                value = values[0] if values else ""
                mapping.entries.append((key, value, trailing_comment(block, index),
                                        self.at(entry)))
        self.maps[mapping.variable] = mapping

    def _collect_upstream(self, node: Node) -> None:
        addresses = [child["args"][0] for child in real_nodes(node.get("block", []))
                     if child["directive"] == "server" and child["args"]]
        self.upstream_blocks[node["args"][0] if node["args"] else ""] = addresses

    @staticmethod
    def _listens(server: Node) -> list[Node]:
        return [node for node in real_nodes(server["block"]) if node["directive"] == "listen"]

    def _is_tls(self, server: Node) -> bool:
        block = real_nodes(server["block"])
        return any("ssl" in node["args"][1:] for node in self._listens(server)) or any(
            node["directive"] == "ssl" and node["args"] == ["on"] for node in block)

    @staticmethod
    def _proxies(server: Node) -> bool:
        def walk(nodes: list[Node]) -> bool:
            return any(node["directive"] == "proxy_pass" or walk(node.get("block", []))
                       for node in nodes)
        return walk(server["block"])

    def _main_server(self, servers: list[Node]) -> Node:
        ranked = ([s for s in servers if self._is_tls(s) and self._proxies(s)]
                  + [s for s in servers if self._proxies(s)])
        if not ranked:
            raise ImportFailure(f"{self.path}: no server block with proxy_pass found; pass the "
                                "site file that proxies to vLLM (the guide's "
                                "/etc/nginx/sites-available/default)")
        return ranked[0]

    def _is_redirect_server(self, server: Node) -> bool:
        return not self._is_tls(server) and self._redirect_of(server) is not None

    @staticmethod
    def _redirect_of(server: Node) -> tuple[Node, str] | None:
        """The `return 301 https://...` of a server: directly, in `location /`, or in certbot's
        `if ($host = name) { ... }`."""
        for node in real_nodes(server["block"]):
            target = redirect_target(node)
            if target:
                return node, target
            wraps = (node["directive"] == "if" and node["args"][:1] == ["$host"]) or (
                node["directive"] == "location" and node["args"] == ["/"])
            for inner in real_nodes(node.get("block", [])) if wraps else ():
                target = redirect_target(inner)
                if target:
                    return inner, target
        return None

    # ---- the plain-HTTP server that only redirects

    def _redirect_server_block(self, server: Node) -> None:
        found = self._redirect_of(server)
        assert found is not None
        redirect, target = found
        for node in real_nodes(server["block"]):
            name = node["directive"]
            if name == "listen":
                self._listen(node, tls=False)
            elif name == "server_name" or node is redirect:
                continue
            elif name in {"if", "location"} and any(
                    inner is redirect for inner in node.get("block", [])):
                continue  # the wrapper of the redirect
            else:
                self.skip(node, "airgate's plain-HTTP listener only redirects to HTTPS")
        if not any(part in target for part in ("$server_name", "$host", "$http_host")):
            self.findings.note(self.at(redirect), "return", f"airgate redirects to "
                               f"https://<[listen] server_name><path>, not to {target}")
        if self.site.http:
            self.site.why["http"] = (f"{self.site.why.get('http', '')}: only redirects to HTTPS, "
                                     f"like the Nginx server at line {server['line']}")

    # ---- the TLS server that proxies

    def _main_server_block(self, server: Node) -> None:
        ssl_on = any(node["directive"] == "ssl" and node["args"] == ["on"]
                     for node in real_nodes(server["block"]))
        for node in real_nodes(server["block"]):
            if node["directive"] != "listen":
                self._directive(node, "server")
            elif ssl_on or "ssl" in node["args"][1:]:
                self._listen(node, tls=True)
            else:
                self.findings.note(self.at(node), "listen", "airgate's plain-HTTP listener only "
                                   "redirects to HTTPS; Nginx also proxied plain HTTP here")
                self._listen(node, tls=False)

    def _directive(self, node: Node, context: str) -> None:
        handler = self.handlers.get(node["directive"])
        if handler is None:
            self.skip(node)
        else:
            handler(node, context)

    def _listen(self, node: Node, *, tls: bool) -> None:
        args: list[str] = node["args"]
        address = listen_address(args[0]) if args else None
        if address is None:
            self.skip(node, "airgate listens on TCP addresses only")
            return
        try:
            parse_hostport(address)
        except ValueError as error:
            self.skip(node, str(error))
            return
        key = "https" if tls else "http"
        if getattr(self.site, key):
            self.skip(node, f"airgate binds one address per listener; kept "
                            f"{getattr(self.site, key)}")
            return
        setattr(self.site, key, address)
        self.site.why[key] = f"from `listen {' '.join(args)}` (line {node['line']})"
        extras = [arg for arg in args[1:] if arg not in {"ssl", "default_server", "default"}]
        if "http2" in extras:
            self.findings.note(self.at(node), "listen", "http2: " + NOT_TRANSLATED["http2"])
            extras.remove("http2")
        if extras:
            self.findings.skipped(self.at(node), "listen",
                                  f"parameters {' '.join(extras)}: airgate has no setting for them")

    def _server_name(self, node: Node, context: str) -> None:
        names = [name for name in node["args"] if name]
        if not names:
            self.skip(node, "no name given")
            return
        if self.site.server_name:
            self.skip(node, f"kept the first server_name, {self.site.server_name}")
            return
        name = names[0]
        self.site.server_name = name
        self.site.why["server_name"] = f"from `server_name` (line {node['line']}); it goes into " \
                                       "Kibana's connector URL and must match the certificate"
        if len(names) > 1:
            self.findings.note(self.at(node), "server_name", f"airgate uses one name; kept {name}, "
                               f"dropped {' '.join(names[1:])}")
        if looks_like_placeholder(name) or name in {"_", "localhost"} or name.startswith("~"):
            self.findings.warn(self.at(node), "server_name", f"{name!r} is not a real host name "
                               "(the guide's placeholder?): set [listen] server_name and the "
                               "certificate paths to the name Kibana connects to")
            self.site.why["server_name"] = "PLACEHOLDER from the Nginx file: replace with the " \
                                           "host name Kibana connects to"

    def _nginx_path(self, node: Node) -> str | None:
        value = node["args"][0] if node["args"] else ""
        if not value or "$" in value:
            self.skip(node, "a path with Nginx variables (or none) cannot be carried over; "
                            "set it by hand")
            return None
        if value.startswith("data:") or value.startswith("engine:"):
            self.skip(node, "airgate reads certificates and keys from files only")
            return None
        path = PurePosixPath(value)
        if not path.is_absolute():
            self.findings.note(self.at(node), node["directive"],
                               f"relative path resolved against Nginx's prefix {NGINX_PREFIX}")
            path = NGINX_PREFIX / path
        return str(path)

    def _certificate(self, node: Node, context: str) -> None:
        self._set_path(node, "cert", context)

    def _certificate_key(self, node: Node, context: str) -> None:
        self._set_path(node, "key", context)

    def _client_ca(self, node: Node, context: str) -> None:
        self._set_path(node, "client_ca", context)

    def _set_path(self, node: Node, key: str, context: str) -> None:
        """A server's path overrides the http{} default; a second one in the same context (an
        RSA + ECDSA pair) is reported, since airgate loads one certificate."""
        path = self._nginx_path(node)
        if path is None:
            return
        if self.path_context.get(key) == context:
            self.skip(node, f"airgate loads one {key} file; kept {getattr(self.site, key)}")
            return
        self.path_context[key] = context
        setattr(self.site, key, path)
        self.site.why[key] = f"from `{node['directive']}` (line {node['line']})"

    def _verify_client(self, node: Node, context: str) -> None:
        mode = node["args"][0] if node["args"] else ""
        if mode != "on":
            self.skip(node, f"`ssl_verify_client {mode}`: airgate either requires a client "
                            "certificate ([listen] client_ca) or asks for none")

    def _ssl_protocols(self, node: Node, context: str) -> None:
        asked = set(node["args"])
        older = sorted(asked - MODERN_TLS)
        if older:
            self.findings.warn(self.at(node), "ssl_protocols", f"airgate accepts TLS 1.2 and 1.3 "
                               f"only; clients limited to {' '.join(older)} will fail the "
                               "handshake (Kibana's Node.js client speaks TLS 1.2+)")
        elif asked != MODERN_TLS:
            self.findings.note(self.at(node), "ssl_protocols",
                               "airgate accepts both TLSv1.2 and TLSv1.3 (its minimum is 1.2)")

    def _old_ssl_switch(self, node: Node, context: str) -> None:
        if node["args"] != ["on"]:
            self.skip(node, "`ssl off`: airgate's main listener always speaks TLS")

    def _max_body(self, node: Node, context: str) -> None:
        try:
            size = nginx_bytes(node["args"][0])
        except (ValueError, IndexError) as error:
            self.skip(node, str(error))
            return
        if size == 0:
            self.findings.note(self.at(node), "client_max_body_size",
                               "0 (unlimited) kept airgate's default limit, [upstream] max_body")
            return
        self.site.max_body = size
        self.site.why["max_body"] = f"from `client_max_body_size {node['args'][0]}` " \
                                    f"(line {node['line']})"
        if size < 8 * 1024 * 1024:
            self.findings.warn(self.at(node), "client_max_body_size", "below 8 MiB: a 128k-token "
                               "prompt is several MiB and gets 413; raise [upstream] max_body")

    def _timeout(self, node: Node, key: str, *, short_after: float | None = None) -> None:
        try:
            seconds = nginx_seconds(node["args"][0])
        except (ValueError, IndexError) as error:
            self.skip(node, str(error))
            return
        if seconds <= 0:
            self.skip(node, "a timeout of 0 has no airgate equivalent; kept the default")
            return
        setattr(self.site, key, seconds)
        self.site.why[key] = f"from `{node['directive']} {node['args'][0]}` (line {node['line']})"
        if short_after is not None and seconds < short_after:
            self.findings.warn(self.at(node), node["directive"], f"{seconds:g} s cuts off long "
                               "non-streamed generations (Nginx gave 504 after 60 s); airgate's "
                               "default [upstream] read_timeout is 900")

    def _read_timeout(self, node: Node, context: str) -> None:
        self._timeout(node, "read_timeout", short_after=300)

    def _connect_timeout(self, node: Node, context: str) -> None:
        self._timeout(node, "connect_timeout")

    def _keepalive_timeout(self, node: Node, context: str) -> None:
        self._timeout(node, "keepalive_timeout")

    def _header_timeout(self, node: Node, context: str) -> None:
        self._timeout(node, "header_timeout")

    def _buffering(self, node: Node, context: str) -> None:
        self.findings.note(self.at(node), node["directive"], "airgate never buffers: request "
                           "and streamed response bytes pass through as they arrive")

    def _http_version(self, node: Node, context: str) -> None:
        self.findings.note(self.at(node), "proxy_http_version",
                           "airgate always talks HTTP/1.1 with keep-alive to vLLM")

    def _set_header(self, node: Node, context: str) -> None:
        args = node["args"]
        if len(args) == 2 and args[0].lower() == "authorization" and \
                args[1].lower().startswith("bearer ") and "$" not in args[1]:
            secret = args[1][len("bearer "):].strip()
            self.site.upstream_key = Secret(VLLM_KEY_FILE, secret, self.at(node),
                                            "proxy_set_header Authorization")
            self.site.why["api_key_file"] = f"the vLLM key Nginx added (line {node['line']})"
            return
        self.skip(node)

    def _access_log(self, node: Node, context: str) -> None:
        args = node["args"]
        if args == ["off"]:
            self.site.access_log = "off"
        elif not args or args[0].startswith("syslog:") or "$" in args[0]:
            self.skip(node, "airgate writes its access log to a plain file ([log] access_file)")
            return
        else:
            self.site.access_log = args[0]
            if len(args) > 1 and args[1] != "combined":
                self.findings.note(self.at(node), "access_log", f"format {args[1]!r} became "
                                   "airgate's combined format")
        self.site.why["access"] = f"from `access_log` (line {node['line']}); the combined " \
                                  "format keeps Elastic's Nginx integration parsing it"

    def _location(self, node: Node, context: str) -> None:
        block: list[Node] = node.get("block", [])
        proxies = any(child["directive"] == "proxy_pass" for child in real_nodes(block))
        if not proxies:
            self.skip(node, "airgate forwards only to vLLM; this location does not proxy")
            return
        if self.proxied_location is not None:
            self.skip(node, f"airgate forwards one set of routes ([upstream] allow); the location "
                            f"at line {self.proxied_location['line']} was imported")
            return
        self.proxied_location = node
        self.findings.note(self.at(node), "location", "airgate forwards only the routes in "
                           "[upstream] allow (chat/completions, completions, embeddings, models), "
                           "not every path: vLLM's unauthenticated admin paths stay closed")
        for child in real_nodes(block):
            self._directive(child, "location")

    def _proxy_pass(self, node: Node, context: str) -> None:
        if context != "location":
            self.skip(node, "proxy_pass outside a location")
            return
        target = node["args"][0] if node["args"] else ""
        scheme, _, rest = target.partition("://")
        if "$" in target or scheme not in {"http", "https"}:
            self.skip(node, "only a literal http://HOST:PORT upstream can be carried over")
            return
        if scheme == "https":
            self.findings.warn(self.at(node), "proxy_pass", "airgate talks plain HTTP to vLLM "
                               "on loopback; check [upstream] url")
        hostport, slash, uri = rest.partition("/")
        hostport = self._resolve_upstream_block(node, hostport)
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
        # vLLM's port is published on IPv4; 'localhost' may resolve to ::1 first.
        host = "127.0.0.1" if host in {"localhost", ""} else host
        url = f"http://{host}:{port}"
        try:
            parse_hostport(f"{host}:{port}")
        except ValueError as error:
            self.skip(node, str(error))
            return
        self.site.upstream_url = url
        self.site.why["url"] = f"from `proxy_pass {target}` (line {node['line']})"
        assert self.proxied_location is not None
        location_path = self.proxied_location["args"][-1] if self.proxied_location["args"] else "/"
        if slash and "/" + uri != location_path:
            self.findings.warn(self.at(node), "proxy_pass", f"Nginx rewrote {location_path} to "
                               f"/{uri}; airgate forwards paths unchanged, so Kibana's URL must "
                               "be the path vLLM serves (/v1/chat/completions)")

    def _resolve_upstream_block(self, node: Node, hostport: str) -> str:
        servers = self.upstream_blocks.get(hostport)
        if servers is None:
            return hostport
        if len(servers) > 1:
            self.findings.note(self.at(node), "proxy_pass", f"upstream {hostport} has "
                               f"{len(servers)} servers; airgate proxies to one vLLM, kept "
                               f"{servers[0]}")
        return servers[0] if servers else hostport

    # ---- the bearer-token check

    def _if(self, node: Node, context: str) -> None:
        block: list[Node] = node.get("block", [])
        if not is_deny_block(block):
            self.skip(node, "only token checks of the form `if (...) { return 401; }` are "
                            "translated")
            return
        for inner in real_nodes(block):
            if inner["directive"] != "return":
                self.skip(inner, "inside the token check: airgate answers 401 with its own "
                                 "JSON body")
        args: list[str] = node["args"]
        if len(args) == 3 and args[0].lower() == "$http_authorization" and args[1] == "!=":
            self._literal_token(node, args[2])
        elif (condition := self._map_condition(args)) is not None:
            self._map_tokens(node, *condition)
        else:
            self.skip(node, "the condition is not `$http_authorization != \"Bearer ...\"` nor a "
                            "check of a map of $http_authorization; add tokens with "
                            "`airgate token new`")

    def _map_condition(self, args: list[str]) -> tuple[str, Callable[[str], bool]] | None:
        """`!$ok`, `$ok = 0`, `$ok = ""` or `$ok != 1`: (variable, which map values allow)."""
        if len(args) == 1 and args[0].startswith("!$") and args[0][1:] in self.maps:
            return args[0][1:], lambda value: value not in {"", "0"}
        if len(args) == 3 and args[0] in self.maps:
            variable, operator, operand = args
            if operator == "=" and operand in {"", "0"}:
                return variable, lambda value: value not in {"", "0"}
            if operator == "!=":
                return variable, lambda value: value == operand
        return None

    def _literal_token(self, node: Node, expected: str) -> None:
        scheme, _, secret = expected.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            self.skip(node, "the compared value is not \"Bearer <token>\"")
            return
        self._add_token(secret.strip(), token_name("kibana", self.token_names, "kibana"),
                        self.at(node), "if")

    def _map_tokens(self, node: Node, variable: str, allowed: Callable[[str], bool]) -> None:
        mapping = self.maps[variable]
        self.used_maps.add(variable)
        if allowed(mapping.default):
            self.findings.warn(mapping.where, "map", "its default lets any Authorization "
                               "header through; airgate requires one of the listed tokens")
        for number, (key, value, comment, where) in enumerate(mapping.entries, 1):
            if not allowed(value):
                continue
            scheme, _, secret = key.partition(" ")
            if key.startswith("~") or scheme.lower() != "bearer" or not secret.strip():
                self.findings.skipped(where, "map", "only literal \"Bearer <token>\" keys become "
                                      "tokens (regular expressions cannot be turned into digests)")
                continue
            name = token_name(comment, self.token_names, f"token{number}")
            self._add_token(secret.strip(), name, where, "map")

    def _add_token(self, secret: str, name: str, where: str, subject: str) -> None:
        self.site.tokens.append(TokenLine(name, secret, where))
        if looks_like_placeholder(secret):
            self.findings.warn(where, subject, f"token {name!r} looks like the guide's "
                               "placeholder; it was imported anyway (as a digest), so Kibana "
                               "keeps working until you replace it: delete its line from the "
                               f"tokens file and run `airgate token new {name} --file "
                               f"{self.tokens_file}`")
        elif len(secret) < 16:
            self.findings.warn(where, subject, f"token {name!r} is shorter than 16 characters; "
                               "replace it with one from `airgate token new`")

    def _report_unused_maps(self) -> None:
        for variable, mapping in self.maps.items():
            if variable not in self.used_maps:
                self.findings.skipped(mapping.where, "map", f"{variable} is not checked by any "
                                      "`if (...) { return 401; }`, so its tokens were not imported")

    def _check_result(self, main: Node) -> None:
        if not self.site.https:
            self.findings.warn(self.at(main), "server", "the proxying server has no TLS listener; "
                               "airgate needs one: check [listen] https, cert and key")
            self.site.https = "0.0.0.0:443"
            self.site.why["https"] = "Nginx served this site without TLS; airgate needs TLS"
        if not self.site.server_name:
            self.findings.warn(self.at(main), "server", "no server_name: set [listen] "
                               "server_name to the name Kibana connects to")
        if not (self.site.cert and self.site.key):
            self.findings.warn(self.at(main), "server", "no ssl_certificate/ssl_certificate_key: "
                               "set [listen] cert and key")
        if not self.site.tokens:
            self.findings.warn(self.at(main), "server", "no bearer-token check found: airgate "
                               "refuses every request until you run `airgate token new kibana "
                               f"--file {self.tokens_file}`")


def translate_nginx(path: Path, findings: Findings, tokens_file: Path) -> SiteConfig:
    return NginxTranslator(path, findings, tokens_file).translate()


# --------------------------------------------------------------------------- docker side

DOCKER_FLAGS = frozenset({
    "-d", "--detach", "-i", "--interactive", "-t", "--tty", "--rm", "--privileged", "--init",
    "-P", "--publish-all", "--read-only", "--no-healthcheck", "--oom-kill-disable", "-q",
    "--quiet", "--sig-proxy", "--disable-content-trust",
})
DOCKER_VALUE_OPTIONS = frozenset({
    "--name", "-v", "--volume", "-e", "--env", "--env-file", "-p", "--publish", "--ipc",
    "--gpus", "--shm-size", "--runtime", "--network", "--net", "--restart", "--mount", "-u",
    "--user", "-w", "--workdir", "--entrypoint", "--device", "--ulimit", "--cpus", "-m",
    "--memory", "-l", "--label", "-h", "--hostname", "--add-host", "--log-driver", "--log-opt",
    "--security-opt", "--cap-add", "--cap-drop", "--platform", "--pull", "--cidfile",
    "--memory-swap", "--cpuset-cpus", "--pid", "--uts", "--userns", "--stop-signal",
    "--stop-timeout", "--tmpfs", "--dns", "--group-add", "--expose", "--sysctl",
    "--volumes-from", "-a", "--attach", "--link", "--ip", "--network-alias", "--cgroupns",
    "--pids-limit", "--health-cmd", "--health-interval", "--health-retries", "--health-timeout",
})
SHORT_VALUE_OPTIONS = frozenset({"-e", "-v", "-p", "-u", "-w", "-m", "-l", "-h", "-a"})
HF_TOKEN_VARIABLES = frozenset({"HUGGING_FACE_HUB_TOKEN", "HF_TOKEN"})
OFFLINE_VARIABLES = frozenset({"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"})
DOCKER_OPTION_REASONS: dict[str, str] = {
    "--ipc": "the launcher decides the container's IPC and shared-memory settings",
    "--shm-size": "the launcher decides the container's IPC and shared-memory settings",
    "--runtime": "the launcher requests GPUs with --gpus ([launcher] gpus)",
    "--restart": "the launcher restarts vLLM itself ([launcher] backoff_*)",
    "-d": "the launcher runs and supervises the container itself",
    "--detach": "the launcher runs and supervises the container itself",
    "--rm": "the launcher runs and supervises the container itself",
    "-i": "the launcher runs and supervises the container itself",
    "-t": "the launcher runs and supervises the container itself",
    "--network": "the launcher publishes vLLM on 127.0.0.1 only ([launcher] port)",
    "--net": "the launcher publishes vLLM on 127.0.0.1 only ([launcher] port)",
    "--env-file": "not read; put VLLM_API_KEY and the Hugging Face token in the files named by "
                  "[launcher] api_key_file and hf_token_file",
    "--entrypoint": "the launcher runs the image's own vLLM entrypoint",
}
# The tool-calling flag sets the launcher knows by name (see [launcher] preset).
PRESETS: dict[str, dict[str, str]] = {
    "mistral": {"--tool-call-parser": "mistral", "--tokenizer-mode": "mistral",
                "--config-format": "mistral", "--load-format": "mistral",
                "--enable-auto-tool-choice": ""},
    "hermes": {"--tool-call-parser": "hermes", "--enable-auto-tool-choice": ""},
    "llama3": {"--tool-call-parser": "llama3_json", "--enable-auto-tool-choice": ""},
}
VLLM_SECRET_OPTIONS = {"--api-key": VLLM_KEY_FILE, "--hf-token": HF_TOKEN_FILE}


@dataclass(frozen=True, slots=True)
class Word:
    text: str
    line: int


@dataclass
class VllmOption:
    """One vLLM argument and the values after it, as written (`--max-model-len 32768`)."""

    name: str
    values: list[str]
    line: int
    words: list[str]


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


def strip_doc_callout(line: str) -> str:
    """Drop the `<1>` markers the docs put after a line (`--gpus all \\ <2>`)."""
    head, sep, tail = line.rstrip().rpartition(" <")
    if sep and tail.endswith(">") and tail[:-1].isdigit():
        return head.rstrip()
    return line.rstrip()


def is_command_start(line: str) -> bool:
    words = line.split()
    return bool(words) and words[0] in {"docker", "podman", "sudo", "nvidia-docker"}


def docker_words(path: Path, text: str) -> list[Word]:
    """The words of the first `docker run` command in `text`, each with its line number.

    Backslash-newline continues the command, as in a shell; fences, prompts and comment lines
    around it are skipped. Each physical line is split with shlex on its own so that every word
    keeps its line for the report."""
    words: list[Word] = []
    started = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = strip_doc_callout(raw).lstrip()
        line = line.removeprefix("$ ")
        if not started and not is_command_start(line):
            continue
        started = True
        continues = line.endswith("\\")
        try:
            parts = shlex.split(line[:-1] if continues else line)
        except ValueError as error:
            raise ImportFailure(f"{path}:{number}: {error}: keep each quoted value on one line"
                                ) from error
        for part in parts:
            if part.startswith("#"):
                break  # a shell comment runs to the end of the line
            words.append(Word(part, number))
        if not continues:
            break
    if not words:
        raise ImportFailure(f"{path}: no `docker run ...` command found; pass a file holding "
                            "the guide's command")
    return words


def split_option(text: str) -> tuple[str, str | None]:
    """'--env=A=B' -> ('--env', 'A=B'); '-eA=B' -> ('-e', 'A=B'); '--rm' -> ('--rm', None)."""
    if text.startswith("--"):
        name, sep, value = text.partition("=")
        return name, (value if sep else None)
    if len(text) > 2 and text[:2] in SHORT_VALUE_OPTIONS:
        return text[:2], text[2:].removeprefix("=")
    return text, None


def is_flag_cluster(text: str) -> bool:
    """'-it', '-dit': single-letter docker flags written together."""
    return len(text) > 2 and text[0] == "-" and text[1] != "-" and set(text[1:]) <= set("dit")


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
        old = f"`docker rm -f {value}`" if valid else "the old container"
        self.findings.skipped(self.at(word), "--name", f"the launcher names its container "
                              f"[launcher] container_name (airgate-vllm); stop {old} before "
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
        if value is not None and looks_like_placeholder(value):
            self.findings.warn(self.at(word), origin, f"{variable} looks like the guide's "
                               f"placeholder; it was written to {file_name} anyway: replace "
                               "the file's content with the real value")
        self.plan.secrets[file_name] = Secret(file_name, value, self.at(word), origin)

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


# --------------------------------------------------------------------------- files (0600)


def open_private(path: Path, flags: int) -> int:
    """Open `path` for writing, created 0600, and force 0600 on a file that already existed."""
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_tokens_file(path: Path, tokens: Sequence[TokenLine], findings: Findings) -> None:
    """Append a `NAME sha256:HEX` line per token not yet in `path` (created 0600)."""
    existing = TokenStore(())
    text = ""
    if path.exists():
        try:
            text = path.read_text()
            existing = TokenStore.parse(text, str(path))
        except (OSError, TokenFileError) as error:
            raise ImportFailure(f"cannot use the tokens file {path}: {error}; fix it or pass "
                                "--tokens-file NEW_PATH") from error
    known = {stored: name for stored, name in existing.entries}
    taken = set(existing.names)
    lines: list[str] = []
    for token in tokens:
        hashed = digest(token.secret)
        if hashed in known:
            findings.note(token.where, "token", f"already in {path} as {known[hashed]!r}")
            continue
        name = token_name(token.name, taken, token.name)
        known[hashed] = name
        lines.append(f"{name} sha256:{hashed.hex()}\n")
    if not text and not lines:
        lines.append(f"# NAME sha256:HEX lines; add one with `airgate token new NAME --file "
                     f"{path}`\n")
    fd = open_private(path, os.O_APPEND)
    with os.fdopen(fd, "a") as handle:
        if text and not text.endswith("\n") and lines:
            handle.write("\n")
        handle.writelines(lines)


def write_secret_file(path: Path, secret: Secret, findings: Findings) -> None:
    """Write the secret (no newline, so readers that do not strip still get it exactly).

    An existing file that already holds a value is kept: it may be the value the operator wrote
    by hand after an earlier import."""
    current = path.read_text() if path.exists() else ""
    if secret.value is None:
        fd = open_private(path, 0)  # an empty 0600 file for the operator to fill
        os.close(fd)
        return
    if current.strip() and current.strip() != secret.value:
        findings.warn(secret.where, secret.origin, f"{path} already holds a different value; "
                      "kept it (delete the file and import again to replace it)")
        fd = open_private(path, 0)
        os.close(fd)
        return
    fd = open_private(path, os.O_TRUNC)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret.value)


# --------------------------------------------------------------------------- TOML output

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


# --------------------------------------------------------------------------- the command


def upstream_port(url: str) -> int:
    return parse_hostport(url.removeprefix("http://"), default_host="127.0.0.1")[1]


def collect_secrets(site: SiteConfig, plan: LauncherPlan | None) -> dict[str, Secret]:
    secrets: dict[str, Secret] = dict(plan.secrets) if plan else {}
    if site.upstream_key is not None:
        given = secrets.get(VLLM_KEY_FILE)
        if given is None or given.value is None:
            secrets[VLLM_KEY_FILE] = site.upstream_key
    return secrets


def cross_check(site: SiteConfig, plan: LauncherPlan | None, findings: Findings,
                docker: Path) -> None:
    if plan is None or plan.port is None:
        return
    port = upstream_port(site.upstream_url)
    if port != plan.port:
        findings.warn(f"{docker}:1", "-p", f"vLLM is published on port {plan.port} but Nginx "
                      f"proxied to port {port}; make [launcher] port and [upstream] url agree")


def run_import(args: argparse.Namespace, findings: Findings) -> tuple[str, str]:
    """Translate, write the tokens and secret files, and return (config text, summary)."""
    tokens_path = Path(args.tokens_file).absolute()
    site = translate_nginx(args.file, findings, tokens_path)
    docker: Path | None = args.docker_command
    plan = translate_docker(docker, findings) if docker is not None else None
    if docker is not None:
        cross_check(site, plan, findings, docker)
    if not tokens_path.parent.is_dir():
        raise ImportFailure(f"directory {tokens_path.parent} does not exist: create it or pass "
                            "--tokens-file PATH")
    write_tokens_file(tokens_path, site.tokens, findings)
    secret_files: dict[str, Path] = {}
    for secret in collect_secrets(site, plan).values():
        path = tokens_path.parent / secret.file_name
        write_secret_file(path, secret, findings)
        secret_files[secret.file_name] = path
    sections = [listen_section(site), auth_section(tokens_path),
                upstream_section(site, secret_files.get(VLLM_KEY_FILE))]
    sections += [s for s in (server_section(site), log_section(site)) if s is not None]
    if plan is not None:
        sections.append(launcher_section(plan, secret_files))
    summary = f"{len(site.tokens)} token(s) as digests in {tokens_path}"
    if secret_files:
        summary += "; secrets in " + ", ".join(str(path) for path in secret_files.values())
    summary += f"; {findings.skipped_count} item(s) not translated (listed above)"
    return render_config(args.file, docker, sections), summary


def import_main(args: argparse.Namespace) -> int:
    findings = Findings()
    try:
        config, summary = run_import(args, findings)
    except (ImportFailure, OSError) as error:
        for item in findings.in_input_order():
            print(item.render(), file=sys.stderr)
        fix = "" if isinstance(error, ImportFailure) else (
            ": check that the tokens file's directory is writable, or pass --tokens-file PATH")
        print(f"airgate import-nginx: {error}{fix}", file=sys.stderr)
        return 2
    sys.stdout.write(config)
    for item in findings.in_input_order():
        print(item.render(), file=sys.stderr)
    print(f"airgate import-nginx: {summary}", file=sys.stderr)
    return 0
