"""Settings, the example config, `airgate check` and `airgate token new`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import TLSFiles, Tokens, write_config
from proxy.settings import PATH_FIELDS, ConfigError, Settings, load_settings
from proxy.tokens import TokenStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "airgate.toml"


def airgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=ROOT, check=False)


def test_example_config_documents_every_key_with_its_default() -> None:
    documented = tomllib.loads(EXAMPLE.read_text())
    defaults = Settings.model_construct().model_dump(mode="json")
    for section, fields in Settings.model_fields.items():
        assert fields.annotation is not None
        assert set(documented[section]) == set(defaults[section]), section
        example = load_settings(EXAMPLE).model_dump(mode="json")[section]
        for key, value in defaults[section].items():
            if key in PATH_FIELDS.get(section, ()):
                continue  # resolved against the config's directory
            assert example[key] == value, f"{section}.{key}"


def test_environment_overrides_one_nested_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml", {"upstream": {"url": "http://127.0.0.1:8000",
                                                             "read_timeout": 30}})
    os.environ["AIRGATE_UPSTREAM__URL"] = "http://127.0.0.1:8001"
    try:
        settings = load_settings(config)
    finally:
        del os.environ["AIRGATE_UPSTREAM__URL"]
    assert settings.upstream.url == "http://127.0.0.1:8001"
    assert settings.upstream.read_timeout == 30  # the rest of the section stays from the file


def test_relative_paths_and_credentials(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a.toml", {"auth": {"tokens_file": "tokens"},
                                                "upstream": {"api_key_file": "credential:vllm"}})
    os.environ["CREDENTIALS_DIRECTORY"] = "/run/credentials/airgate.service"
    try:
        settings = load_settings(config)
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    assert settings.auth.tokens_file == str(tmp_path / "tokens")
    assert settings.upstream.api_key_file == "/run/credentials/airgate.service/vllm"
    with pytest.raises(ConfigError, match="LoadCredential"):
        load_settings(config)


@pytest.mark.parametrize("section,values,names", [
    ({"listen": {"https": "0.0.0.0"}}, None, "listen.https"),
    ({"upstream": {"url": "https://vllm:8000"}}, None, "upstream.url"),
    ({"upstream": {"max_body": "lots"}}, None, "upstream.max_body"),
    ({"upstream": {"allow": ["DELETE /v1/models"]}}, None, "upstream.allow"),
    ({"upstream": {"pool_idle_timeout": 6}}, None, "upstream.pool_idle_timeout"),
    ({"listen": {"htps": "0.0.0.0:443"}}, None, "listen.htps"),
])
def test_bad_values_name_the_key(tmp_path: Path, section: dict[str, dict[str, object]],
                                 values: None, names: str) -> None:
    config = write_config(tmp_path / "a.toml", section)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert names in str(raised.value)


def test_missing_config_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(tmp_path / "nope.toml")


def _valid_config(tmp_path: Path, tls: TLSFiles, tokens: Tokens) -> Path:
    return write_config(tmp_path / "airgate.toml", {
        "listen": {"https": "127.0.0.1:8443", "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
    })


def test_check_accepts_a_valid_config_and_prints_effective_settings(
    tmp_path: Path, tls: TLSFiles, tokens: Tokens
) -> None:
    result = airgate("check", "--config", str(_valid_config(tmp_path, tls, tokens)))
    assert result.returncode == 0, result.stderr
    assert '"https": "127.0.0.1:8443"' in result.stdout
    assert "is valid" in result.stderr
    assert tokens.kibana not in result.stdout + result.stderr


def test_check_rejects_a_key_that_does_not_match_the_certificate(
    tmp_path: Path, tls: TLSFiles, tokens: Tokens
) -> None:
    other = tls.ca.issue_cert("other.example.com")
    other_key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(other_key))
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"cert": str(tls.cert_pem), "key": str(other_key)},
        "auth": {"tokens_file": str(tokens.path)},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 1
    assert "does not match" in result.stderr and "listen.key" in result.stderr


def test_check_names_unreadable_files(tmp_path: Path, tls: TLSFiles) -> None:
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"cert": str(tmp_path / "missing.pem"), "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tmp_path / "no-tokens")},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 1
    assert "listen.cert" in result.stderr
    assert "airgate token new" in result.stderr


def test_check_reports_every_file_problem_at_once(tmp_path: Path, tls: TLSFiles) -> None:
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "missing.key"),
                   "client_ca": str(tmp_path / "missing-ca.pem")},
        "auth": {"tokens_file": str(tmp_path / "no-tokens")},
        "upstream": {"api_key_file": str(tmp_path / "no-key")},
        "launcher": {"hf_token_file": str(tmp_path / "no-hf-token")},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("airgate: ")]
    for wanted in (f"listen.cert = '{tmp_path / 'missing.pem'}' cannot be read",
                   f"listen.key = '{tmp_path / 'missing.key'}' cannot be read",
                   f"listen.client_ca '{tmp_path / 'missing-ca.pem'}' cannot be loaded",
                   "auth.tokens_file:",
                   "upstream.api_key_file = ",
                   "launcher.hf_token_file = "):
        assert sum(wanted in line for line in lines) == 1, (wanted, result.stderr)
    assert "make it readable by airgate" in result.stderr  # each names its fix
    assert "is valid" not in result.stderr


def test_check_reports_a_bad_client_ca_beside_a_bad_certificate(
        tmp_path: Path, tls: TLSFiles, tokens: Tokens) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"cert": str(garbage), "key": str(tls.cert_pem), "client_ca": str(garbage)},
        "auth": {"tokens_file": str(tokens.path)},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 1
    assert "cannot load listen.cert" in result.stderr
    assert "listen.client_ca" in result.stderr and "cannot be loaded" in result.stderr


def test_check_warns_about_placeholder_and_empty_secret_files(
        tmp_path: Path, tls: TLSFiles, tokens: Tokens) -> None:
    key, hf_token = tmp_path / "vllm-api-key", tmp_path / "hf-token"
    key.write_text("xxxx\n")  # the guide's `--env VLLM_API_KEY=xxxx`, as import-nginx wrote it
    hf_token.write_text("")
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"https": "127.0.0.1:8443", "cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
        "upstream": {"api_key_file": str(key)},
        "launcher": {"api_key_file": str(key), "hf_token_file": str(hf_token)},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 0, result.stderr  # warnings do not fail the check
    assert "is valid" in result.stderr
    assert (f"airgate: warning: upstream.api_key_file and launcher.api_key_file: the file "
            f"'{key}' still holds a placeholder") in result.stderr
    assert "replace its content with the key vLLM requires" in result.stderr
    assert f"airgate: warning: launcher.hf_token_file: the file '{hf_token}' is empty: write " \
           "your Hugging Face token into it" in result.stderr

    key.write_text("a-real-key-4f9c2a7e1b3d5f60718293a4\n")
    hf_token.write_text("hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ012345\n")
    result = airgate("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_token_new_prints_once_and_stores_only_the_digest(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    result = airgate("token", "new", "kibana", "--file", str(path))
    assert result.returncode == 0
    token = result.stdout.strip()
    assert len(token) >= 43
    text = path.read_text()
    assert token not in text and text.startswith("kibana sha256:")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TokenStore.load(path).lookup(token.encode()) == "kibana"
    again = airgate("token", "new", "kibana", "--file", str(path))
    assert again.returncode == 2 and "already has" in again.stderr


def test_plain_tokens_work_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\nlegacy plain:s3cret\n")
    store = TokenStore.load(path)
    assert store.lookup(b"s3cret") == "legacy"
    assert store.lookup(b"s3cre") is None
    assert "plain text" in caplog.text and "s3cret" not in caplog.text.replace(
        "plain:s3cret", "")


@pytest.mark.parametrize("line", ["kibana", "kibana sha256:abc", "kibana md5:00", "bad name x y"])
def test_malformed_token_lines_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"ok sha256:{'0' * 64}\n{line}\n")
    with pytest.raises(Exception, match=":2:"):
        TokenStore.load(path)


def test_cli_help_lists_every_command() -> None:
    result = airgate("--help")
    assert result.returncode == 0
    for command in ("serve", "run", "launch", "check", "token", "demo"):
        assert command in result.stdout
    assert sys.executable  # the CLI ran under the test interpreter


def test_check_catches_launcher_mistakes(tmp_path: Path, tls: TLSFiles, tokens: Tokens) -> None:
    config = write_config(tmp_path / "airgate.toml", {
        "listen": {"cert": str(tls.cert_pem), "key": str(tls.cert_pem)},
        "auth": {"tokens_file": str(tokens.path)},
        "upstream": {"url": "http://127.0.0.1:8000"},
        "launcher": {"preset": "mistrall", "port": 8001, "extra_args": ["--port", "9000"]},
    })
    result = airgate("check", "--config", str(config))
    assert result.returncode == 1
    assert "launcher.preset 'mistrall' is unknown" in result.stderr
    assert "--port" in result.stderr and "launcher.port is 8001" in result.stderr
