"""The contenders: each started on loopback in front of the same stand-in vLLM, each over TLS
with the same certificate (except `direct`, which is plain HTTP straight to the stand-in, the
floor). A contender knows how to address a request so that every one of them asks the stand-in
for the same thing (see `Knobs`)."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from bench import procs
from bench.util import ROOT, WORK, say

SEED_FILES = ROOT.parent / "shared" / "seeds"
MODEL = "sim-model"
ASCII_TOKEN = "sk-bench-0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Knobs:
    """What the stand-in should do: first token after `ttft` s, then one every `interval` s.
    The token count travels as `max_tokens` in the body. Sent as x-sim-* headers, except to
    LiteLLM, which does not forward client headers: there the model alias selects a model entry
    whose `extra_headers` carry the same values."""

    ttft: float = 0.0
    interval: float = 0.0

    @property
    def alias(self) -> str:
        return f"sim-t{self.ttft:g}-i{self.interval:g}"


@dataclass
class Tls:
    ca_pem: Path
    cert_pem: Path  # leaf + chain
    key_pem: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        return context


def make_certificates(directory: Path) -> Tls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    tls = Tls(directory / "ca.pem", directory / "fullchain.pem", directory / "privkey.pem")
    ca.cert_pem.write_to_path(str(tls.ca_pem))
    tls.cert_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(tls.key_pem))
    return tls


@dataclass
class Contender:
    name: str
    url: str  # scheme://127.0.0.1:PORT
    token: str
    services: list[procs.Service] = field(default_factory=list)
    litellm: bool = False
    failed: str = ""  # "could not start: ..." when it did not come up

    @property
    def tls(self) -> bool:
        return self.url.startswith("https")

    def pids(self) -> list[int]:
        return [pid for service in self.services for pid in service.pids()]

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids())

    def rss(self) -> int:
        return procs.rss_bytes(self.pids())

    def headers(self, knobs: Knobs) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if not self.litellm:
            headers["x-sim-ttft"] = f"{knobs.ttft:g}"
            headers["x-sim-interval"] = f"{knobs.interval:g}"
        return headers

    def body(self, knobs: Knobs, tokens: int, *, stream: bool = False,
             content: str = "Hello world") -> bytes:
        body = {"model": knobs.alias if self.litellm else MODEL,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": tokens, "stream": stream}
        return json.dumps(body).encode()

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def _failed(name: str, reason: str) -> Contender:
    say(f"{name}: could not start: {reason}")
    return Contender(name, "", "", failed=f"could not start: {reason}")


# ---- the stand-in vLLM ------------------------------------------------------------------------

def start_upstream(workers: int, aborts: Path,
                   env: dict[str, str] | None = None) -> tuple[procs.Service, int]:
    port = procs.free_port()
    aborts.write_text("")
    service = procs.start(
        "upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port),
                     "--workers", str(workers), "--aborts", str(aborts)],
        WORK / "upstream.log", cwd=ROOT, env=env)
    procs.wait_port(port, 20, service.proc)
    time.sleep(0.3 * workers)  # every worker listening, not only the first
    return service, port


def direct(upstream_port: int) -> Contender:
    return Contender("direct", f"http://127.0.0.1:{upstream_port}", "")


# ---- airgate ----------------------------------------------------------------------------------

def airgate(name: str, upstream_port: int, tls: Tls, *, workers: int = 1,
            usage: bool | None = None, processes: int = 1,
            env: dict[str, str] | None = None) -> Contender:
    """`processes` > 1 starts that many `airgate serve` with the same config (SO_REUSEPORT),
    to show what `[server] workers` could give where the setting does not fork yet."""
    home = WORK / name
    home.mkdir(parents=True, exist_ok=True)
    tokens = home / "tokens"
    tokens.unlink(missing_ok=True)
    airgate_bin = [sys.executable, "-m", "proxy.cli"]
    made = subprocess.run([*airgate_bin, "token", "new", "bench", "--file", str(tokens)],
                          capture_output=True, text=True, check=False, env=env)
    token = made.stdout.strip().splitlines()[-1] if made.stdout.strip() else ""
    if made.returncode != 0 or not token:
        return _failed(name, f"airgate token new: {made.stderr.strip()[:200]}")
    port = procs.free_port()
    metrics = ""
    if usage is not None:
        metrics = f'listen = "127.0.0.1:{procs.free_port()}"\nusage = {str(usage).lower()}'
    else:
        metrics = 'listen = ""'
    config = home / "airgate.toml"
    config.write_text(textwrap.dedent(f"""\
        [listen]
        https = "127.0.0.1:{port}"
        http = ""
        server_name = "localhost"
        cert = "{tls.cert_pem}"
        key = "{tls.key_pem}"

        [auth]
        tokens_file = "{tokens}"

        [upstream]
        url = "http://127.0.0.1:{upstream_port}"

        [server]
        workers = {max(workers, 2 if processes > 1 else 1)}

        [log]
        access = "off"

        [metrics]
        """) + metrics + "\n")
    contender = Contender(name, f"https://127.0.0.1:{port}", token)
    for index in range(processes):
        service = procs.start(f"{name}#{index}", [*airgate_bin, "serve", "--config", str(config)],
                              home / f"serve{index}.log", cwd=home, env=env)
        contender.services.append(service)
        try:
            procs.wait_port(port, 30, service.proc)
        except RuntimeError as error:
            contender.stop()
            return _failed(name, f"{error}: {service.log_tail(3)}")
    if processes > 1:
        time.sleep(1.0)  # the later ones have bound too
    return contender


# ---- nginx ------------------------------------------------------------------------------------

def _seed_server_blocks() -> str:
    """The seed's two server blocks, verbatim, from the vLLM guide in shared/seeds."""
    for path in sorted(SEED_FILES.glob("*")):
        text = path.read_text(errors="replace")
        found = re.search(r"```\n(server \{.*?\n\}\n\nserver \{.*?\n\})\n```", text, re.S)
        if found:
            return found.group(1)
    raise RuntimeError(f"no Nginx config found in {SEED_FILES}")


SEED_FALLBACK = """\
server {
    listen 80;
    server_name <yourdomainname.com>;
    return 301 https://$server_name$request_uri;
}

server {
    listen 443 ssl http2;
    server_name <yourdomainname.com>;

    ssl_certificate /etc/letsencrypt/live/<yourdomainname.com>/fullchain.pem;
    ssl_certificate_key /etc/letsencrypt/live/<yourdomainname.com>/privkey.pem;

    location / {
        if ($http_authorization != "Bearer <secret token>") {
            return 401;
        }
        proxy_pass http://localhost:8000/;
    }
}"""

TUNED_LOCATION = """\
        proxy_pass http://vllm_upstream/;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 900s;"""


def nginx_config(tuned: bool, prefix: Path, tls: Tls, https: int, http: int,
                 upstream: int) -> str:
    try:
        servers = _seed_server_blocks()
    except (OSError, RuntimeError):
        servers = SEED_FALLBACK
    servers = (servers.replace("<yourdomainname.com>", "localhost")
               .replace("/etc/letsencrypt/live/localhost/fullchain.pem", str(tls.cert_pem))
               .replace("/etc/letsencrypt/live/localhost/privkey.pem", str(tls.key_pem))
               .replace("<secret token>", ASCII_TOKEN)
               .replace("listen 80;", f"listen 127.0.0.1:{http};")
               .replace("listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;")
               .replace("http://localhost:8000/", f"http://localhost:{upstream}/"))
    upstream_block = ""
    if tuned:
        servers = servers.replace(f"        proxy_pass http://localhost:{upstream}/;",
                                  TUNED_LOCATION)
        servers = servers.replace("    location / {", "    client_max_body_size 64m;\n\n"
                                  "    location / {", 1)
        upstream_block = (f"    upstream vllm_upstream {{\n        server 127.0.0.1:{upstream};\n"
                          "        keepalive 32;\n    }\n\n")
    body = textwrap.indent(servers, "    ")
    # The http-level lines are Debian's stock nginx.conf, except access_log off (every
    # contender runs without access logs) and no include of sites-enabled.
    return textwrap.dedent(f"""\
        # generated by bench/contenders.py: {'tuned' if tuned else 'the seed, exactly'}
        user root;
        worker_processes 1;
        worker_rlimit_nofile 16384;
        daemon off;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log warn;
        events {{
            worker_connections 8192;
        }}
        http {{
            sendfile on;
            tcp_nopush on;
            types_hash_max_size 2048;
            include /etc/nginx/mime.types;
            default_type application/octet-stream;
            ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
            ssl_prefer_server_ciphers on;
            access_log off;
            gzip on;
        """) + upstream_block + body + "\n}\n"


def nginx(name: str, tuned: bool, upstream_port: int, tls: Tls) -> Contender:
    prefix = WORK / name
    prefix.mkdir(parents=True, exist_ok=True)
    https, http = procs.free_port(), procs.free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(tuned, prefix, tls, https, http, upstream_port))
    service = procs.start(name, ["nginx", "-p", str(prefix), "-c", str(conf),
                                 "-e", str(prefix / "error.log")], prefix / "stdout.log")
    try:
        procs.wait_port(https, 15, service.proc)
    except RuntimeError as error:
        return _failed(name, f"{error}: {(prefix / 'error.log').read_text()[-300:]}")
    return Contender(name, f"https://127.0.0.1:{https}", ASCII_TOKEN, [service])


# ---- LiteLLM ----------------------------------------------------------------------------------

def litellm(bin_dir: Path | str, upstream_port: int, tls: Tls,
            knobs: list[Knobs]) -> Contender:
    name = "litellm"
    if isinstance(bin_dir, str):
        return _failed(name, bin_dir)
    home = WORK / name
    home.mkdir(parents=True, exist_ok=True)
    entries = []
    for knob in dict.fromkeys(knobs):
        entries.append(textwrap.dedent(f"""\
              - model_name: {knob.alias}
                litellm_params:
                  model: openai/{MODEL}
                  api_base: http://127.0.0.1:{upstream_port}/v1
                  api_key: unused
                  timeout: 900
                  extra_headers:
                    x-sim-ttft: "{knob.ttft:g}"
                    x-sim-interval: "{knob.interval:g}"
            """))
    config = home / "config.yaml"
    config.write_text("model_list:\n" + "".join(entries) + textwrap.dedent(f"""\
        general_settings:
          master_key: {ASCII_TOKEN}
        litellm_settings:
          request_timeout: 900
          telemetry: false
        """))
    port = procs.free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True"}
    service = procs.start(name, [str(bin_dir / "litellm"), "--config", str(config), "--host",
                                 "127.0.0.1", "--port", str(port), "--num_workers", "1",
                                 "--ssl_keyfile_path", str(tls.key_pem),
                                 "--ssl_certfile_path", str(tls.cert_pem)],
                          home / "litellm.log", env=env, cwd=home)
    try:
        procs.wait_port(port, 120, service.proc)
    except RuntimeError as error:
        service.stop()
        return _failed(name, f"{error}: {service.log_tail(3)}")
    return Contender(name, f"https://127.0.0.1:{port}", ASCII_TOKEN, [service], litellm=True)


def check(contender: Contender, tls: Tls) -> str:
    """One short request; '' when it answered 200, else why not."""
    knobs = Knobs()
    request = urllib.request.Request(contender.url + "/v1/chat/completions",
                                     data=contender.body(knobs, 1),
                                     headers=contender.headers(knobs), method="POST")
    context = tls.client_context() if contender.tls else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            response.read()
            return "" if response.status == 200 else f"status {response.status}"
    except Exception as error:  # any failure is the finding
        return f"{type(error).__name__}: {error}"
