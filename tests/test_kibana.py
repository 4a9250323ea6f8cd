"""`airgate kibana`: the connector fields, the kibana.yml lines, and the --json API body."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from proxy.kibana import (
    API_KEY_PLACEHOLDER,
    certificate_trust,
    connector_body,
    kibana_main,
    kibana_yml,
    placeholder_wiring,
    trust_with_openssl,
)
from proxy.tokens import append_token

REPO = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "data" / "seeds"
MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_config(directory: Path, ca: trustme.CA, *, https: str = "0.0.0.0:443",
                 self_signed: bool = False, extra: str = "",
                 launcher: str = 'preset = "mistral"') -> Path:
    cert = ca.issue_cert("llm.test")
    cert_file, key_file = directory / "fullchain.pem", directory / "privkey.pem"
    if self_signed:
        ca.cert_pem.write_to_path(str(cert_file))  # a CA certificate signs itself
    else:
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    config = directory / "airgate.toml"
    config.write_text(f"""
[listen]
https = "{https}"
server_name = "llm.test"
cert = "fullchain.pem"
key = "privkey.pem"

[auth]
tokens_file = "tokens"

{extra}

[launcher]
model = "{MODEL}"
{launcher}
""")
    return config


def run_kibana(config: Path, capsys: pytest.CaptureFixture[str], *,
               as_json: bool = False) -> tuple[int, str, str]:
    status = kibana_main(argparse.Namespace(config=config, json=as_json))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_text_output_for_a_private_ca(tmp_path: Path, ca: trustme.CA,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ca)
    token = append_token(tmp_path / "tokens", "kibana")
    status, out, err = run_kibana(config, capsys)
    assert status == 0, err

    assert "Other (OpenAI Compatible Service)" in out
    assert "https://llm.test/v1/chat/completions" in out
    assert f"Default model:           {MODEL}" in out
    assert "the token printed by `airgate token new`" in out
    assert f"tokens in {tmp_path / 'tokens'}: kibana" in out
    assert "Native function calling: on" in out
    assert "leave Streaming on" in out
    assert token not in out and token not in err

    assert 'xpack.actions.allowedHosts: ["llm.test"]' in out
    assert "xpack.actions.customHostSettings:" in out
    assert '  - url: "https://llm.test:443"' in out
    assert '      certificateAuthoritiesFiles: ["/etc/kibana/certs/airgate-ca.pem"]' in out
    assert "not in this machine's CA store" in out
    assert "xpack.actions.responseTimeout: 16m" in out


def test_feature_flag_lines_are_the_seeds(tmp_path: Path, ca: trustme.CA,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    append_token(tmp_path / "tokens", "kibana")
    _, out, _ = run_kibana(write_config(tmp_path, ca), capsys)
    seed_lines = [line.rstrip() for line in (SEEDS / "seed000-kibana.yml").read_text().splitlines()]
    assert "\n".join(seed_lines) in out


def test_self_signed_certificate_is_named(tmp_path: Path, ca: trustme.CA,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    append_token(tmp_path / "tokens", "kibana")
    _, out, _ = run_kibana(write_config(tmp_path, ca, self_signed=True), capsys)
    assert "the certificate is self-signed: copy" in out
    assert "fullchain.pem" in out
    assert "xpack.actions.customHostSettings:" in out


def test_certificate_path_is_never_broken_across_lines(
    tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]
) -> None:
    # A long path with hyphens: the operator copies it from the comment as one piece.
    home = tmp_path / "very-long-directory-name-for-the-airgate-test" / "etc-airgate-tls-files"
    home.mkdir(parents=True)
    append_token(home / "tokens", "kibana")
    _, out, _ = run_kibana(write_config(home, ca, self_signed=True), capsys)
    assert str(home / "fullchain.pem") in out.replace("\n# ", " ").split()


def test_port_alias_and_served_name(tmp_path: Path, ca: trustme.CA,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    append_token(tmp_path / "tokens", "kibana")
    config = write_config(tmp_path, ca, https="0.0.0.0:8443",
                          extra='[upstream]\nmodel_alias = "default"\nread_timeout = 1800',
                          launcher='served_model_name = "mistral-small"\npreset = ""')
    status, out, _ = run_kibana(config, capsys)
    assert status == 0
    assert "https://llm.test:8443/v1/chat/completions" in out
    assert '  - url: "https://llm.test:8443"' in out
    assert "Default model:           default  ([upstream] model_alias for mistral-small" in out
    assert "Native function calling: off" in out
    assert "xpack.actions.responseTimeout: 31m" in out

    status, out, _ = run_kibana(config, capsys, as_json=True)
    body = json.loads(out)
    assert body["config"]["defaultModel"] == "default"
    assert body["name"] == "vLLM via airgate - mistral-small"
    assert "enableNativeFunctionCalling" not in body["config"]


def test_json_body_for_the_connector_api(tmp_path: Path, ca: trustme.CA,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    token = append_token(tmp_path / "tokens", "kibana")
    status, out, err = run_kibana(write_config(tmp_path, ca), capsys, as_json=True)
    assert status == 0, err
    assert json.loads(out) == {
        "name": "vLLM via airgate - Mistral-Small-3.2-24B-Instruct-2506",
        "connector_type_id": ".gen-ai",
        "config": {
            "apiProvider": "Other",
            "apiUrl": "https://llm.test/v1/chat/completions",
            "defaultModel": MODEL,
            "enableNativeFunctionCalling": True,
        },
        "secrets": {"apiKey": API_KEY_PLACEHOLDER},
    }
    assert token not in out


def test_missing_tokens_and_placeholder_name_are_warned(
        tmp_path: Path, ca: trustme.CA, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ca)
    config.write_text(config.read_text().replace('"llm.test"', '"<yourdomainname.com>"'))
    status, out, err = run_kibana(config, capsys)
    assert status == 0
    assert "server_name is '<yourdomainname.com>'" in err
    assert "cannot read tokens file" in err
    assert "https://<yourdomainname.com>/v1/chat/completions" in out


def test_config_problems_exit_2(tmp_path: Path, ca: trustme.CA,
                                capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_kibana(tmp_path / "missing.toml", capsys)
    assert (status, out) == (2, "")
    assert "not found" in err
    status, out, err = run_kibana(write_config(tmp_path, ca, https=""), capsys)
    assert (status, out) == (2, "")
    assert "[listen] https is empty" in err


# --------------------------------------------------------------------------- certificate trust


def test_trust_judgements(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = tmp_path / "leaf.pem"
    ca.issue_cert("llm.test").cert_chain_pems[0].write_to_path(str(leaf))
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())

    private = certificate_trust(str(leaf), roots=[])
    assert (private.public, private.self_signed) == (False, False)
    public = certificate_trust(str(leaf), roots=[root])
    assert public.public is True
    other_root = x509.load_pem_x509_certificate(trustme.CA().cert_pem.bytes())
    assert certificate_trust(str(leaf), roots=[other_root]).public is False

    self_signed = tmp_path / "self.pem"
    ca.cert_pem.write_to_path(str(self_signed))
    judged = certificate_trust(str(self_signed), roots=[root])
    assert (judged.public, judged.self_signed) == (False, True)


def test_unreadable_certificates(tmp_path: Path) -> None:
    assert certificate_trust(str(tmp_path / "missing.pem")).public is None
    letsencrypt = certificate_trust("/etc/letsencrypt/live/nope.example/fullchain.pem")
    assert (letsencrypt.public, letsencrypt.assumed) == (True, True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert certificate_trust(str(garbage)).public is None


def test_openssl_fallback(tmp_path: Path, ca: trustme.CA) -> None:
    if subprocess.run(["which", "openssl"], capture_output=True).returncode != 0:
        pytest.skip("no openssl command")
    leaf = tmp_path / "leaf.pem"
    ca.issue_cert("llm.test").cert_chain_pems[0].write_to_path(str(leaf))
    assert trust_with_openssl(str(leaf)).public is False
    self_signed = tmp_path / "self.pem"
    ca.cert_pem.write_to_path(str(self_signed))
    assert trust_with_openssl(str(self_signed)).self_signed is True


# --------------------------------------------------------------------------- templates and seeds


def test_deploy_templates_match_the_command() -> None:
    wiring = placeholder_wiring()
    connector = (REPO / "deploy" / "kibana" / "connector.json").read_text()
    assert connector == json.dumps(connector_body(wiring), indent=2) + "\n"
    yml = (REPO / "deploy" / "kibana" / "kibana.yml").read_text()
    assert yml.endswith(kibana_yml(wiring))


def test_kibana_on_the_imported_seed(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    imported = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "import-nginx",
         str(SEEDS / "seed000-nginx-default.conf"),
         "--docker-command", str(SEEDS / "seed001-docker-run.sh")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True)
    (tmp_path / "airgate.toml").write_text(imported.stdout)
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "kibana", "--config", "airgate.toml", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["config"]["apiUrl"] == "https://<yourdomainname.com>/v1/chat/completions"
    assert body["config"]["defaultModel"] == MODEL
    assert "assumed Let's Encrypt" in result.stderr
