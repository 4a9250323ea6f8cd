"""`airgate kibana`: what to enter in Kibana's OpenAI connector, and the kibana.yml lines it needs.

Everything is derived from the airgate config, so the connector always matches the proxy: the URL
from `[listen] server_name` and the HTTPS port, the model from `[upstream] model_alias` or the
launcher's model, the token by name (never a secret), and whether Kibana must be told to trust
the certificate's CA. `--json` prints the same connector as a body for Kibana's connector API
(`POST /api/actions/connector`), with the API key left as a placeholder.

The connector fields follow Kibana's `.gen-ai` connector schema for the "Other" provider:
config `apiProvider`, `apiUrl`, `defaultModel` (required for Other), `enableNativeFunctionCalling`;
secrets `apiKey`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import ssl
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.nginx_import import looks_like_placeholder
from proxy.settings import ConfigError, Settings, load_settings, parse_hostport
from proxy.tokens import TokenFileError, TokenStore

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

CONNECTOR_TYPE_ID = ".gen-ai"
PROVIDER_LABEL = "Other (OpenAI Compatible Service)"
PROVIDER_VALUE = "Other"
API_KEY_PLACEHOLDER = "<paste token here>"
# Where the CA file goes on the Kibana host; any path works, this one is only a suggestion.
KIBANA_CA_PATH = "/etc/kibana/certs/airgate-ca.pem"
CHAT_PATH = "/v1/chat/completions"
LETSENCRYPT_DIR = "/etc/letsencrypt/"
TOOL_CALLING_PRESETS = frozenset({"mistral", "hermes", "llama3"})
# Exactly the lines of Elastic's guide (step "Configure the connector", item 7).
FEATURE_FLAG_LINES = (
    "feature_flags.overrides:",
    "    securitySolution.inferenceChatModelDisabled: true",
)
MIN_RESPONSE_TIMEOUT_MINUTES = 10


class KibanaError(Exception):
    """The config cannot be turned into a connector; the message names the key to fix."""


@dataclass(frozen=True, slots=True)
class CertificateTrust:
    """Whether Kibana will trust the proxy's certificate without being told about its CA.

    public None means it could not be told (file unreadable): the CA lines are printed anyway."""

    public: bool | None
    self_signed: bool
    issuer: str
    detail: str
    assumed: bool = False  # judged from the path alone, the file being unreadable here


@dataclass(frozen=True, slots=True)
class Wiring:
    """Everything the Kibana side needs, derived from one airgate config."""

    server_name: str
    port: int
    model: str
    model_note: str
    connector_name: str
    token_names: tuple[str, ...]
    tokens_problem: str
    tokens_file: str
    cert_file: str
    trust: CertificateTrust
    response_timeout_minutes: int
    read_timeout: float
    tool_calling: bool
    preset: str

    @property
    def base_url(self) -> str:
        return f"https://{self.server_name}" + ("" if self.port == 443 else f":{self.port}")

    @property
    def api_url(self) -> str:
        return self.base_url + CHAT_PATH

    @property
    def needs_ca(self) -> bool:
        return self.trust.public is not True


# --------------------------------------------------------------------------- derived values


def https_port(settings: Settings) -> int:
    if not settings.listen.https:
        raise KibanaError("[listen] https is empty: Kibana's connector needs airgate's HTTPS "
                          "listener; set [listen] https (for example \"0.0.0.0:443\")")
    return parse_hostport(settings.listen.https)[1]


def default_model(settings: Settings) -> tuple[str, str]:
    """(model name for the connector, why): the alias survives model changes, so it wins."""
    served = settings.launcher.served_model_name or settings.launcher.model
    if settings.upstream.model_alias:
        return settings.upstream.model_alias, (
            f"[upstream] model_alias for {served}: switching models needs no connector change")
    if settings.launcher.served_model_name:
        return served, "[launcher] served_model_name"
    return served, "[launcher] model; set [upstream] model_alias so a model switch needs no " \
                   "connector change"


def connector_name(settings: Settings) -> str:
    served = settings.launcher.served_model_name or settings.launcher.model
    return f"vLLM via airgate - {served.rsplit('/', 1)[-1]}"


def response_timeout_minutes(read_timeout: float) -> int:
    """A little over airgate's own upstream timeout, so that airgate's 504 (which says why)
    reaches the user rather than Kibana's bare socket timeout; never under 10 minutes."""
    return max(MIN_RESPONSE_TIMEOUT_MINUTES, math.ceil(read_timeout / 60) + 1)


def tool_calling_enabled(settings: Settings) -> bool:
    launcher = settings.launcher
    return (launcher.preset in TOOL_CALLING_PRESETS
            or "--enable-auto-tool-choice" in launcher.extra_args)


def token_names(tokens_file: str) -> tuple[tuple[str, ...], str]:
    """(names in the tokens file, a problem to report or '')."""
    try:
        names = TokenStore.load(tokens_file).names
    except TokenFileError as error:
        return (), str(error)
    if not names:
        return (), f"{tokens_file} holds no tokens: create one with " \
                   f"`airgate token new kibana --file {tokens_file}`"
    return names, ""


# --------------------------------------------------------------------------- certificate trust


def certificate_trust(cert_file: str, roots: list[Certificate] | None = None) -> CertificateTrust:
    """Approximates "would a client with the usual CA list trust this chain?".

    Self-signed (issuer == subject) is never trusted. Otherwise the top certificate of the file
    must be issued by a CA of this machine's store (`roots` replaces it in tests). Kibana's Node
    bundles Mozilla's list, which is what distributions ship too, so this is close."""
    try:
        data = Path(cert_file).read_bytes()
    except OSError as error:
        if cert_file.startswith(LETSENCRYPT_DIR):
            # certbot's files are root-only; the path alone says the CA is Let's Encrypt.
            return CertificateTrust(True, False, "Let's Encrypt", f"cannot read {cert_file} "
                                    f"({error.strerror}); assumed Let's Encrypt, a public CA",
                                    assumed=True)
        return CertificateTrust(None, False, "", f"cannot read {cert_file}: {error.strerror}")
    try:
        from cryptography import x509
    except ModuleNotFoundError:
        return trust_with_openssl(cert_file)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        return CertificateTrust(None, False, "", f"{cert_file} holds no PEM certificate")
    leaf, top = chain[0], chain[-1]
    issuer = top.issuer.rfc4514_string()
    if leaf.issuer == leaf.subject:
        return CertificateTrust(False, True, issuer, "self-signed")
    store = system_roots() if roots is None else roots
    if any(ca.subject == top.issuer and issued_by(top, ca) for ca in store):
        return CertificateTrust(True, False, issuer, f"issued under {issuer}, a public CA")
    return CertificateTrust(False, False, issuer, f"issued under {issuer}, which is not in "
                                                  "this machine's CA store")


def issued_by(cert: Certificate, ca: Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, ValueError, TypeError: all mean "not this CA"
        return False
    return True


@functools.cache
def system_roots() -> list[Certificate]:
    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    # Some distributed roots have serials that newer cryptography warns about; not our concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for candidate in (paths.cafile, paths.openssl_cafile):
            if candidate and Path(candidate).is_file():
                try:
                    return x509.load_pem_x509_certificates(Path(candidate).read_bytes())
                except ValueError:
                    continue
        roots: list[Certificate] = []
        directory = Path(paths.capath or paths.openssl_capath or "/etc/ssl/certs")
        for file in sorted(directory.glob("*.pem")) if directory.is_dir() else ():
            try:
                roots.extend(x509.load_pem_x509_certificates(file.read_bytes()))
            except (OSError, ValueError):
                continue
        return roots


def trust_with_openssl(cert_file: str) -> CertificateTrust:
    """The same judgement through the `openssl` command, for hosts without `cryptography`."""
    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)

    try:
        issuer = openssl("x509", "-noout", "-issuer", "-in", cert_file).stdout
        subject = openssl("x509", "-noout", "-subject", "-in", cert_file).stdout
        verified = openssl("verify", "-untrusted", cert_file, cert_file).returncode == 0
    except OSError as error:
        return CertificateTrust(None, False, "", f"cannot run openssl to read {cert_file}: "
                                                 f"{error.strerror}")
    issuer = issuer.strip().removeprefix("issuer=").strip()
    subject = subject.strip().removeprefix("subject=").strip()
    if not issuer:
        return CertificateTrust(None, False, "", f"{cert_file} holds no PEM certificate")
    if issuer == subject:
        return CertificateTrust(False, True, issuer, "self-signed")
    if verified:
        return CertificateTrust(True, False, issuer, f"issued under {issuer}, a public CA")
    return CertificateTrust(False, False, issuer, f"issued under {issuer}, which is not in this "
                                                  "machine's CA store")


# --------------------------------------------------------------------------- assembling


def build_wiring(settings: Settings) -> Wiring:
    model, model_note = default_model(settings)
    names, problem = token_names(settings.auth.tokens_file)
    return Wiring(
        server_name=settings.listen.server_name,
        port=https_port(settings),
        model=model,
        model_note=model_note,
        connector_name=connector_name(settings),
        token_names=names,
        tokens_problem=problem,
        tokens_file=settings.auth.tokens_file,
        cert_file=settings.listen.cert,
        trust=certificate_trust(settings.listen.cert),
        response_timeout_minutes=response_timeout_minutes(settings.upstream.read_timeout),
        read_timeout=settings.upstream.read_timeout,
        tool_calling=tool_calling_enabled(settings),
        preset=settings.launcher.preset,
    )


def placeholder_wiring() -> Wiring:
    """The wiring that deploy/kibana/* is rendered from: placeholders instead of values."""
    return Wiring(
        server_name="<server_name>", port=443, model="<default model>", model_note="",
        connector_name="vLLM via airgate - <model>", token_names=(), tokens_problem="",
        tokens_file="", cert_file="",
        trust=CertificateTrust(False, False, "<your CA>", "not publicly trusted"),
        response_timeout_minutes=response_timeout_minutes(900.0), read_timeout=900.0,
        tool_calling=True, preset="mistral",
    )


def connector_body(wiring: Wiring) -> dict[str, Any]:
    """The body for Kibana's `POST /api/actions/connector`; the key stays a placeholder."""
    config: dict[str, Any] = {
        "apiProvider": PROVIDER_VALUE,
        "apiUrl": wiring.api_url,
        "defaultModel": wiring.model,
    }
    if wiring.tool_calling:
        # The "Enable native function calling" switch; Kibana versions without that switch
        # reject unknown keys, so drop this line there.
        config["enableNativeFunctionCalling"] = True
    return {
        "name": wiring.connector_name,
        "connector_type_id": CONNECTOR_TYPE_ID,
        "config": config,
        "secrets": {"apiKey": API_KEY_PLACEHOLDER},
    }


def ca_comment(wiring: Wiring) -> list[str]:
    trust = wiring.trust
    if trust.public is None:
        what = f"could not check the certificate ({trust.detail}); keep these lines unless it " \
               "comes from a public CA."
    elif trust.self_signed:
        what = f"the certificate is self-signed: copy {wiring.cert_file or 'it'} to the Kibana " \
               "host at this path."
    else:
        what = f"the certificate is {trust.detail}: copy that CA's certificate to the Kibana " \
               "host at this path."
    # Paths must survive copy and paste: never break a line inside one.
    return textwrap.wrap("Kibana must trust the proxy's CA: " + what, width=88,
                         initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False, break_long_words=False)


def kibana_yml(wiring: Wiring) -> str:
    """The kibana.yml lines, each group with a comment that says why it is there."""
    host = json.dumps(wiring.server_name)
    lines = [
        "# Kibana calls only hosts listed here. The default is [\"*\"]; if your kibana.yml",
        "# already lists hosts, add this one to that list instead of adding a second key.",
        f"xpack.actions.allowedHosts: [{host}]",
    ]
    if wiring.needs_ca:
        lines += [
            *ca_comment(wiring),
            "xpack.actions.customHostSettings:",
            f"  - url: {json.dumps(f'https://{wiring.server_name}:{wiring.port}')}",
            "    ssl:",
            f"      certificateAuthoritiesFiles: [{json.dumps(KIBANA_CA_PATH)}]",
        ]
    lines += [
        "# A non-streamed answer sends nothing until it is complete; Kibana's default of 60s",
        f"# cuts long ones off. Just above airgate's [upstream] read_timeout "
        f"({wiring.read_timeout:g} s), so airgate's",
        "# own 504, which says why, reaches the user first.",
        f"xpack.actions.responseTimeout: {wiring.response_timeout_minutes}m",
        "# From Elastic's guide: lets the connector serve the AI Assistant for Security.",
        *FEATURE_FLAG_LINES,
    ]
    return "\n".join(lines) + "\n"


def token_line(wiring: Wiring) -> str:
    text = "the token printed by `airgate token new` (for a token imported from Nginx: the " \
           "secret Kibana already uses)"
    if wiring.token_names:
        text += f"; tokens in {wiring.tokens_file}: {', '.join(wiring.token_names)}"
    return text


def render_text(wiring: Wiring) -> str:
    fields = [
        ("Connector name", wiring.connector_name),
        ("OpenAI provider", PROVIDER_LABEL),
        ("URL", wiring.api_url),
        ("Default model", f"{wiring.model}  ({wiring.model_note})"),
        ("API key", token_line(wiring)),
        ("Native function calling", "on (the launcher makes vLLM return tool_calls)"
         if wiring.tool_calling else "off (no tool-calling preset in [launcher])"),
    ]
    width = max(len(label) for label, _ in fields) + 2
    lines = ["Kibana connector: Stack Management > Connectors > Create connector > OpenAI"]
    lines += [f"  {label + ':':<{width}}{value}" for label, value in fields]
    lines += [
        "",
        "AI Assistant for Security: leave Streaming on. Elastic's guide turns it off because",
        "Nginx buffered streamed answers; airgate passes each chunk on as it arrives.",
        "",
        "Add to kibana.yml, then restart Kibana:",
        "",
        kibana_yml(wiring),
        "The same connector through Kibana's API: `airgate kibana --config FILE --json`",
        "prints the body for POST /api/actions/connector (put the token into secrets.apiKey).",
    ]
    return "\n".join(lines) + "\n"


def warnings_for(wiring: Wiring) -> list[str]:
    warnings = []
    if looks_like_placeholder(wiring.server_name) or wiring.server_name == "localhost":
        warnings.append(f"[listen] server_name is {wiring.server_name!r}: set it to the name "
                        "Kibana connects to; the URL and allowedHosts use it")
    if wiring.tokens_problem:
        warnings.append(wiring.tokens_problem)
    if wiring.trust.public is None:
        warnings.append(wiring.trust.detail + "; the CA lines were printed in case it is private")
    elif wiring.trust.assumed:
        warnings.append(wiring.trust.detail + "; run as root to check it")
    return warnings


def kibana_main(args: argparse.Namespace) -> int:
    try:
        wiring = build_wiring(load_settings(args.config))
    except (ConfigError, KibanaError, ValueError) as error:
        print(f"airgate kibana: {error}", file=sys.stderr)
        return 2
    for warning in warnings_for(wiring):
        print(f"airgate kibana: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(connector_body(wiring), indent=2))
    else:
        sys.stdout.write(render_text(wiring))
    return 0
