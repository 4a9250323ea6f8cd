"""`airgate doctor --config F`: check a running setup end to end, the way Kibana will use it.

Each check prints one line, `PASS|FAIL|SKIP <check>: <detail>`, and under a FAIL (or a SKIP that
the operator can lift) the fix. A check whose prerequisite did not pass is skipped and says which
one, so one broken thing shows up as one FAIL. The exit status is 1 when anything failed.

The checks that call through the proxy need a bearer token. The tokens file holds only digests,
so the doctor reads a token from `--token-file FILE` or `$AIRGATE_TOKEN`; without one, those
checks are skipped. TLS trusts `--ca FILE` when given, else the configured certificate itself
(so a private CA or a self-signed certificate needs no extra flag).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.launcher.presets import PRESETS
from proxy.settings import ConfigError, Settings, load_settings, parse_hostport
from proxy.state import read_secret
from proxy.tls import TLSConfigError, build_server_context
from proxy.tokens import TokenFileError, TokenStore

Status = Literal["PASS", "FAIL", "SKIP"]

TOKEN_ENV = "AIRGATE_TOKEN"
NO_TOKEN_FIX = f"pass --token-file FILE (a file holding a token) or set {TOKEN_ENV}"
EXPIRY_MARGIN = timedelta(days=21)
AUTO_TOOL_FLAG = "--enable-auto-tool-choice"
WRONG_TOKEN = "airgate-doctor-deliberately-wrong-token"
CHAT_PATH = "/v1/chat/completions"
CONNECT_TIMEOUT = 10.0
# Kibana waits 120 s for a non-streamed answer; so does the doctor.
ANSWER_TIMEOUT = aiohttp.ClientTimeout(total=120.0, sock_connect=CONNECT_TIMEOUT)
QUICK_TIMEOUT = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT)
# A stream is "buffered" when its chunks arrive together: less than this share of the time to the
# last chunk (and less than STREAM_MIN_SPREAD) separates the first from the last.
STREAM_MIN_SHARE = 0.1
STREAM_MIN_SPREAD = 0.01
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


@dataclass(frozen=True)
class Result:
    status: Status
    detail: str
    fix: str = ""


def passed(detail: str) -> Result:
    return Result("PASS", detail)


def failed(detail: str, fix: str) -> Result:
    return Result("FAIL", detail, fix)


def skipped(detail: str, fix: str = "") -> Result:
    return Result("SKIP", detail, fix)


@dataclass
class Doctor:
    """What the checks share: the settings, the token, and one HTTP client session."""

    config: Path
    settings: Settings
    token: str
    token_source: str
    tls: ssl.SSLContext
    trust_source: str
    session: aiohttp.ClientSession
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def listen_address(self) -> tuple[str, int]:
        return connect_address(self.settings.listen.https)

    @property
    def base_url(self) -> str:
        host, port = self.listen_address
        return f"https://{url_host(host)}:{port}"

    @property
    def sni(self) -> str:
        return self.settings.listen.server_name

    @property
    def model(self) -> str:
        return connector_model(self.settings)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def post_chat(self, body: dict[str, Any], token: str | None = None,
                  ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.session.post(self.base_url + CHAT_PATH, json=body, headers=self.auth(token),
                                 server_hostname=self.sni, timeout=ANSWER_TIMEOUT)


Check = Callable[[Doctor], Awaitable[Result]]


# --------------------------------------------------------------------------- small helpers


def connect_address(hostport: str) -> tuple[str, int]:
    """Where to connect for a listen address: a wildcard host means this machine."""
    host, port = parse_hostport(hostport)
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host), port


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def served_name(settings: Settings) -> tuple[str, str]:
    """(the model name vLLM should serve, the key it comes from)."""
    launcher = settings.launcher
    if launcher.served_model_name:
        return launcher.served_model_name, "[launcher] served_model_name"
    return launcher.model, "[launcher] model"


def connector_model(settings: Settings) -> str:
    """The name Kibana's connector sends: the alias when there is one."""
    return settings.upstream.model_alias or served_name(settings)[0]


def load_certificates(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificates(handle.read())


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching: a `*` stands for exactly one whole left-most label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == name
    head, _, rest = name.partition(".")
    return bool(head) and rest == pattern[2:]


def certificate_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return san.get_values_for_type(x509.DNSName) + ips


def covers(names: list[str], server_name: str) -> bool:
    try:
        wanted_ip = ipaddress.ip_address(server_name)
    except ValueError:
        return any(name_matches(name, server_name) for name in names)
    return any(name == str(wanted_ip) for name in names)


def trust_context(ca: Path | None, cert: str) -> tuple[ssl.SSLContext, str]:
    """A client context trusting `ca`, else the configured chain itself (its leaf may be
    trusted directly: partial chains are allowed). Hostnames are checked by their own check."""
    source = f"--ca {ca}" if ca is not None else f"listen.cert {cert}"
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else cert)
    except (OSError, ssl.SSLError):
        context, source = ssl.create_default_context(), f"the system CAs ({source} unusable)"
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context, source


def error_message(body: bytes) -> str:
    """An OpenAI-shaped error's message (what Kibana shows), else the start of the body."""
    try:
        data = json.loads(body)
        error = data.get("error", data)
        message = error.get("message", error) if isinstance(error, dict) else error
        return str(message)[:300]
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace") or "(empty body)"


def describe(error: BaseException) -> str:
    """A connection error in a few words (aiohttp's own text repeats the address)."""
    if isinstance(error, aiohttp.ClientConnectorError):
        error = error.os_error
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


def split_fix(message: str) -> tuple[str, str]:
    """airgate's error messages say the problem, then `; ` or `: ` and the fix."""
    for separator in ("; ", ": "):
        detail, found, fix = message.rpartition(separator)
        if found:
            return detail, fix
    return message, ""


def token_known(doctor: Doctor) -> bool | None:
    """Whether the token's digest is in auth.tokens_file (None: the file cannot be read)."""
    try:
        store = TokenStore.load(doctor.settings.auth.tokens_file)
    except (OSError, TokenFileError):
        return None
    return store.lookup(doctor.token.encode()) is not None


def refused_token_fix(doctor: Doctor) -> str:
    tokens = doctor.settings.auth.tokens_file
    known = token_known(doctor)
    where = (f"the token from {doctor.token_source} is not in {tokens}"
             if known is False else f"check that the token from {doctor.token_source} is in "
             f"{tokens}")
    return (f"{where}: create one with `airgate token new kibana --file {tokens}`, "
            "reload airgate (`systemctl reload airgate`), and give that token to Kibana and here")


# --------------------------------------------------------------------------- certificate


async def certificate_readable(doctor: Doctor) -> Result:
    path = doctor.settings.listen.cert
    try:
        certs = load_certificates(path)
    except OSError as error:
        return failed(f"listen.cert {path!r} cannot be read ({error.strerror})",
                      "point [listen] cert at the PEM chain (Let's Encrypt's fullchain.pem) and "
                      "make it readable by airgate")
    except ValueError:
        return failed(f"listen.cert {path!r} holds no PEM certificate",
                      "use the PEM certificate chain (-----BEGIN CERTIFICATE-----), leaf first")
    subject = certs[0].subject.rfc4514_string() or "(empty subject)"
    return passed(f"{path}: {len(certs)} certificate(s), leaf {subject}")


async def certificate_matches_key(doctor: Doctor) -> Result:
    try:
        build_server_context(doctor.settings.listen)
    except TLSConfigError as error:
        detail, fix = split_fix(str(error))
        return failed(detail, fix or "use the key the certificate was issued for")
    return passed(f"listen.key {doctor.settings.listen.key} belongs to the certificate")


async def certificate_not_expiring(doctor: Doctor) -> Result:
    leaf = load_certificates(doctor.settings.listen.cert)[0]
    now = datetime.now(UTC)
    ends = leaf.not_valid_after_utc
    renew = ("renew it (e.g. `certbot renew`; docs/operations.md \"Renew a certificate\"), then "
             "`systemctl reload airgate` so new connections get it")
    if leaf.not_valid_before_utc > now:
        return failed(f"the certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}",
                      "check this machine's clock, or use a certificate valid now")
    if ends <= now:
        return failed(f"the certificate expired on {ends:%Y-%m-%d %H:%M} UTC", renew)
    left = ends - now
    if left < EXPIRY_MARGIN:
        return failed(f"the certificate expires in {left.days} day(s), on {ends:%Y-%m-%d} "
                      f"(less than {EXPIRY_MARGIN.days} days)", renew)
    return passed(f"valid until {ends:%Y-%m-%d} ({left.days} days)")


async def certificate_covers_name(doctor: Doctor) -> Result:
    leaf = load_certificates(doctor.settings.listen.cert)[0]
    names = certificate_names(leaf)
    server_name = doctor.settings.listen.server_name
    if covers(names, server_name):
        return passed(f"{server_name} is in the certificate's names ({', '.join(names)})")
    listed = ", ".join(names) if names else "none (no subjectAltName; clients ignore the CN)"
    return failed(f"[listen] server_name {server_name!r} is not among the certificate's names: "
                  f"{listed}",
                  f"issue a certificate for {server_name} (e.g. `certbot certonly -d "
                  f"{server_name}`), or set [listen] server_name to the name Kibana uses that the "
                  "certificate covers")


# --------------------------------------------------------------------------- listeners


def configured_leaf_der(doctor: Doctor) -> bytes | None:
    try:
        return load_certificates(doctor.settings.listen.cert)[0].public_bytes(Encoding.DER)
    except (OSError, ValueError):
        return None


async def https_listener(doctor: Doctor) -> Result:
    listen = doctor.settings.listen
    if not listen.https:
        return failed("[listen] https is empty", 'set [listen] https (e.g. "0.0.0.0:443")')
    host, port = doctor.listen_address
    if port == 0:
        return failed(f"[listen] https = {listen.https!r} picks a random port",
                      "give a fixed port: Kibana's connector URL needs one")
    source = doctor.trust_source
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port, ssl=doctor.tls,
                                                      server_hostname=doctor.sni)
    except ssl.SSLCertVerificationError as error:
        return failed(f"TLS handshake with {host}:{port} failed: {error.verify_message}",
                      f"the listener's certificate is not trusted by {source}: pass --ca FILE "
                      "with the CA that signed it, or reload airgate if the files changed")
    except (OSError, TimeoutError, ssl.SSLError) as error:
        return failed(f"cannot connect to {host}:{port}: {describe(error)}",
                      f"start airgate (`airgate serve --config {doctor.config}` or `systemctl "
                      f"start airgate`), or fix [listen] https ({listen.https})")
    ssl_object = writer.get_extra_info("ssl_object")
    presented = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    version = ssl_object.version() if ssl_object else "?"
    writer.close()
    expected = configured_leaf_der(doctor)
    if expected is not None and presented != expected:
        return failed(f"{host}:{port} presents a different certificate than listen.cert",
                      "reload airgate (`systemctl reload airgate` or SIGHUP) after changing the "
                      "certificate files, or check that airgate is what listens on that port")
    return passed(f"{host}:{port} accepts TLS ({version}), certificate trusted by {source}")


async def http_redirect(doctor: Doctor) -> Result:
    listen = doctor.settings.listen
    if not listen.http:
        return skipped("[listen] http is empty: no port-80 redirect configured")
    host, port = connect_address(listen.http)
    https_port = parse_hostport(listen.https)[1] if listen.https else 443
    authority = listen.server_name + ("" if https_port in (443, 0) else f":{https_port}")
    path = CHAT_PATH + "?from=airgate-doctor"
    wanted = f"https://{authority}{path}"
    try:
        async with doctor.session.get(f"http://{url_host(host)}:{port}{path}",
                                      allow_redirects=False, timeout=QUICK_TIMEOUT) as response:
            status, location = response.status, response.headers.get("Location", "")
    except (aiohttp.ClientError, TimeoutError) as error:
        return failed(f"cannot reach http://{url_host(host)}:{port}: {describe(error)}",
                      "start airgate, or set [listen] http = \"\" if no redirect is wanted")
    if status != 301 or location != wanted:
        return failed(f"http://{url_host(host)}:{port}{path} answered {status} {location!r}, "
                      f"not 301 {wanted!r}",
                      "check that airgate (not another server) listens on [listen] http")
    return passed(f"301 -> {location}")


# --------------------------------------------------------------------------- vLLM


async def vllm_ready(doctor: Doctor) -> Result:
    url = doctor.settings.upstream.url + "/health"
    try:
        async with doctor.session.get(url, timeout=QUICK_TIMEOUT) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        return failed(f"nothing answers at {url} ({describe(error)})",
                      "vLLM opens its port only once the model is loaded: wait and watch "
                      "`airgate status` (or the container's log), or start it with "
                      f"`airgate run --config {doctor.config}`; check [upstream] url")
    if status != 200:
        return failed(f"{url} answered {status}: vLLM's engine is not healthy",
                      "read vLLM's log and restart it (the launcher restarts it on its own)")
    return passed(f"{url} answered 200")


def upstream_headers(doctor: Doctor) -> dict[str, str]:
    key_file = doctor.settings.upstream.api_key_file
    return {"Authorization": f"Bearer {read_secret(key_file)}"} if key_file else {}


async def vllm_models(doctor: Doctor) -> Result:
    url = doctor.settings.upstream.url + "/v1/models"
    try:
        headers = upstream_headers(doctor)
    except OSError as error:
        return failed(f"upstream.api_key_file cannot be read ({error.strerror})",
                      "make the file holding vLLM's --api-key readable, or fix the path")
    try:
        async with doctor.session.get(url, headers=headers, timeout=QUICK_TIMEOUT) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as error:
        return failed(f"{url}: {describe(error)}", "check [upstream] url and vLLM's log")
    if status == 401:
        sent = "the key in upstream.api_key_file" if headers else "a request without a key"
        return failed(f"vLLM refused {sent} (401)",
                      "put vLLM's --api-key (VLLM_API_KEY) into the file named by [upstream] "
                      "api_key_file")
    try:
        served = [str(model["id"]) for model in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return failed(f"{url} answered {status} without a model list: {error_message(body)}",
                      "check that [upstream] url points at vLLM's OpenAI server")
    return compare_models(doctor.settings, served)


def compare_models(settings: Settings, served: list[str]) -> Result:
    listing = ", ".join(repr(name) for name in served) or "nothing"
    alias = settings.upstream.model_alias
    if alias and served:
        return passed(f"vLLM serves {listing}; [upstream] model_alias {alias!r} points at "
                      f"{served[0]!r}")
    wanted, source = served_name(settings)
    if wanted in served:
        return passed(f"vLLM serves {wanted!r} ({source})")
    name = json.dumps(served[0]) if served else '"NAME"'
    return failed(f"vLLM serves {listing}, not {wanted!r} ({source})",
                  f"set [launcher] served_model_name = {name} (the name vLLM serves), or "
                  "[upstream] model_alias = \"default\" so Kibana's connector needs no model "
                  "name; Kibana's Default model must be that same name")


# --------------------------------------------------------------------------- through the proxy


def kibana_shape_problem(answer: Any) -> str:
    """What Kibana's response validation would reject in a non-streamed answer ("" if none)."""
    if not isinstance(answer, dict):
        return "the answer is not a JSON object"
    usage = answer.get("usage")
    missing = [key for key in ("prompt_tokens", "completion_tokens", "total_tokens")
               if not isinstance(usage, dict) or not isinstance(usage.get(key), int)]
    if missing:
        return f"usage lacks {', '.join(missing)}"
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not all(
            isinstance(c, dict) and isinstance(c.get("message"), dict)
            and c["message"].get("role") for c in choices):
        return "choices[].message.role is missing"
    return ""


async def through_proxy_failure(doctor: Doctor, status: int, body: bytes) -> Result:
    message = error_message(body)
    if status == 401:
        return failed(f"airgate answered 401: {message}", refused_token_fix(doctor))
    if status == 404 and "model" in message.lower():
        return failed(f"404: {message}", f"Kibana's Default model must be {doctor.model!r}; see "
                      "the model check above")
    if status in (502, 503, 504):
        return failed(f"{status}: {message}", "see the vLLM checks above and airgate's log")
    return failed(f"{status}: {message}", "read airgate's log (the request id is in the answer)")


async def kibana_connector_test(doctor: Doctor) -> Result:
    body = {"model": doctor.model, "messages": [{"role": "user", "content": "Hello world"}],
            "stream": False}
    async with doctor.post_chat(body) as response:
        status, raw = response.status, await response.read()
    if status != 200:
        return await through_proxy_failure(doctor, status, raw)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    problem = kibana_shape_problem(answer)
    if problem:
        return failed(f"Kibana would say \"Response validation failed\": {problem}",
                      "vLLM's answers must reach Kibana unchanged: remove whatever rewrites them "
                      "between airgate and vLLM")
    usage = answer["usage"]
    return passed(f"200 from {doctor.model!r} with usage (prompt {usage['prompt_tokens']}, "
                  f"completion {usage['completion_tokens']}, total {usage['total_tokens']})")


@dataclass
class StreamRead:
    """Data events of a stream and when each arrived (seconds after the response head)."""

    events: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


async def read_stream(response: aiohttp.ClientResponse) -> StreamRead:
    read, start = StreamRead(), time.monotonic()
    async for line in response.content:
        text = line.decode(errors="replace").rstrip("\r\n")
        if text.startswith("data: "):  # Kibana keeps only these lines
            read.events.append(text[len("data: "):])
            read.times.append(time.monotonic() - start)
    return read


def stream_problem(events: list[str]) -> str:
    """What Kibana's stream parser would choke on ("" if nothing)."""
    if not events or events[-1] != "[DONE]":
        return "the stream does not end with `data: [DONE]`"
    chunks = events[:-1]
    if not chunks:
        return "the stream has no chunks"
    for number, event in enumerate(chunks, 1):
        try:
            chunk = json.loads(event)
        except ValueError:
            return f"chunk {number} is not JSON"
        if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
            return f"chunk {number} is not a chat.completion.chunk: {event[:120]}"
        if not chunk.get("choices"):
            return f"chunk {number} has no choices[0] (a usage-only chunk?)"
    return ""


async def streaming(doctor: Doctor) -> Result:
    body = {"model": doctor.model, "stream": True, "max_tokens": 32,
            "messages": [{"role": "user", "content": "Count from one to thirty in words."}]}
    async with doctor.post_chat(body) as response:
        if response.status != 200:
            return await through_proxy_failure(doctor, response.status, await response.read())
        content_type = response.headers.get("Content-Type", "")
        read = await read_stream(response)
    if not content_type.startswith("text/event-stream"):
        return failed(f"Content-Type is {content_type!r}, not text/event-stream",
                      "check what sits between airgate and vLLM")
    problem = stream_problem(read.events)
    if problem:
        return failed(f"Kibana's stream parser would fail: {problem}",
                      "vLLM's events must reach Kibana unchanged; read airgate's log")
    first, last = read.times[0], read.times[-1]
    spread = last - first
    timing = f"{len(read.events) - 1} chunks, first at {first:.3f} s, last at {last:.3f} s"
    if len(read.events) > 2 and spread < max(STREAM_MIN_SPREAD, STREAM_MIN_SHARE * last):
        return failed(f"the chunks arrived all at once ({timing})",
                      "something buffers the stream (an Nginx with proxy_buffering in front of "
                      "airgate?): let Kibana reach airgate directly")
    return passed(timing)


def tools_enabled_by(preset: str) -> bool:
    return AUTO_TOOL_FLAG in PRESETS.get(preset, ())


def tools_enabled(settings: Settings) -> bool:
    launcher = settings.launcher
    return tools_enabled_by(launcher.preset) or AUTO_TOOL_FLAG in launcher.extra_args


async def tool_calling(doctor: Doctor) -> Result:
    preset = doctor.settings.launcher.preset
    if not tools_enabled(doctor.settings):
        with_tools = ", ".join(sorted(name for name in PRESETS if tools_enabled_by(name)))
        return skipped(f"[launcher] preset {preset!r} does not enable tool calling (the presets "
                       f"{with_tools} do)")
    body = {"model": doctor.model, "max_tokens": 128, "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    async with doctor.post_chat(body) as response:
        status, raw = response.status, await response.read()
    if status != 200:
        return await through_proxy_failure(doctor, status, raw)
    try:
        calls = json.loads(raw)["choices"][0]["message"]["tool_calls"] or []
        names = [call["function"]["name"] for call in calls]
    except (ValueError, KeyError, IndexError, TypeError):
        names = []
    if "get_weather" not in names:
        return failed("a request with tools and a named tool_choice returned no tool_calls",
                      f"vLLM needs --enable-auto-tool-choice and --tool-call-parser for this "
                      f"model ([launcher] preset {preset!r} adds them when airgate launches "
                      "vLLM; if vLLM runs apart, add them to its command)")
    return passed(f"the model called get_weather (preset {preset!r})")


async def wrong_token_refused(doctor: Doctor) -> Result:
    async with doctor.session.get(doctor.base_url + "/v1/models", headers=doctor.auth(WRONG_TOKEN),
                                  server_hostname=doctor.sni, timeout=QUICK_TIMEOUT) as response:
        status, raw = response.status, await response.read()
    if status == 401:
        return passed(f"401: {error_message(raw)}")
    if status == 429:
        return failed("429: this address is blocked after too many failed tokens",
                      "wait [auth] block_seconds and run the doctor again")
    return failed(f"a made-up token got {status}, not 401",
                  f"check that airgate is what listens on [listen] https "
                  f"({doctor.settings.listen.https}) and that [auth] tokens_file holds only "
                  "your tokens")


# --------------------------------------------------------------------------- the table

# (name, check, names of the checks that must have passed first)
CHECKS: tuple[tuple[str, Check, tuple[str, ...]], ...] = (
    ("certificate readable", certificate_readable, ()),
    ("certificate matches key", certificate_matches_key, ("certificate readable",)),
    ("certificate not expiring", certificate_not_expiring, ("certificate readable",)),
    ("certificate covers server_name", certificate_covers_name, ("certificate readable",)),
    ("https listener", https_listener, ()),
    ("http redirect", http_redirect, ()),
    ("vLLM ready", vllm_ready, ()),
    ("vLLM serves the model", vllm_models, ("vLLM ready",)),
    ("Kibana connector test", kibana_connector_test, ("https listener", "vLLM serves the model")),
    ("streaming", streaming, ("Kibana connector test",)),
    ("tool calling", tool_calling, ("Kibana connector test",)),
    ("wrong token refused", wrong_token_refused, ("https listener",)),
)
NEEDS_TOKEN = frozenset({"Kibana connector test"})


async def run_check(doctor: Doctor, name: str, check: Check, needs: tuple[str, ...]) -> Result:
    blocked = [need for need in needs if doctor.results[need].status != "PASS"]
    if blocked:
        return skipped(f"needs {', '.join(blocked)} ({doctor.results[blocked[0]].status} above)")
    if name in NEEDS_TOKEN and not doctor.token:
        return skipped("no token to call through the proxy with", NO_TOKEN_FIX)
    try:
        return await check(doctor)
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        return failed(f"{type(error).__name__}: {describe(error)}",
                      "see the listener and vLLM checks above, and airgate's log")


def format_result(name: str, result: Result) -> str:
    line = f"{result.status} {name}: {result.detail}"
    return f"{line}\n     fix: {result.fix}" if result.fix else line


async def run_doctor(config: Path, settings: Settings, token: str, token_source: str,
                     ca: Path | None) -> dict[str, Result]:
    context, trust_source = trust_context(ca, settings.listen.cert)
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        doctor = Doctor(config, settings, token, token_source, context, trust_source, session)
        for name, check, needs in CHECKS:
            doctor.results[name] = result = await run_check(doctor, name, check, needs)
            print(format_result(name, result), flush=True)
    return doctor.results


def read_token(token_file: Path | None) -> tuple[str, str]:
    """(token, where it came from); ('', '') when none was given."""
    if token_file is not None:
        return read_secret(str(token_file)), f"--token-file {token_file}"
    token = os.environ.get(TOKEN_ENV, "").strip()
    return (token, f"${TOKEN_ENV}") if token else ("", "")


def summary(results: dict[str, Result], token: str) -> str:
    counts = {status: sum(r.status == status for r in results.values())
              for status in ("PASS", "FAIL", "SKIP")}
    if counts["FAIL"]:
        verdict = "fix the FAIL lines above"
    elif not token:
        verdict = f"nothing failed, but no request went through the proxy: {NO_TOKEN_FIX}"
    else:
        verdict = "ready for Kibana"
    return (f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped: "
            f"{verdict}")


def doctor_main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
        token, token_source = read_token(getattr(args, "token_file", None))
    except ConfigError as error:
        print(f"airgate doctor: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"airgate doctor: --token-file cannot be read ({error.strerror}): give a file "
              "holding one token", file=sys.stderr)
        return 2
    ca: Path | None = getattr(args, "ca", None)
    results = asyncio.run(run_doctor(args.config, settings, token, token_source, ca))
    print(summary(results, token))
    return 1 if any(result.status == "FAIL" for result in results.values()) else 0
