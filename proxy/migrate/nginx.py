"""The Nginx side of `airgate import-nginx`: walks one Nginx site file and fills a SiteConfig,
reporting each directive it leaves behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

from proxy.migrate.common import MODERN_TLS, NGINX_PREFIX, VLLM_KEY_FILE, ImportFailure, Node
from proxy.migrate.findings import Findings, looks_like_placeholder
from proxy.migrate.models import MapBlock, Secret, SiteConfig
from proxy.migrate.nginx_nodes import parse_nginx, real_nodes, redirect_target, trailing_comment
from proxy.migrate.nginx_reasons import NOT_TRANSLATED
from proxy.migrate.nginx_tokens import NginxTokenCheck
from proxy.migrate.values import listen_address, nginx_bytes, nginx_seconds
from proxy.settings import parse_hostport


class NginxTranslator(NginxTokenCheck):
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
                                            "proxy_set_header Authorization", "its Bearer key")
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
