"""`airgate import-nginx` on the seed guides' Nginx site and docker commands, and on variants."""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.nginx_import import (
    import_main,
    listen_address,
    looks_like_placeholder,
    nginx_bytes,
    nginx_seconds,
    toml_string,
)
from proxy.settings import Settings, load_settings
from proxy.tokens import TokenStore

REPO = Path(__file__).resolve().parents[1]
SEEDS = Path(__file__).parent / "data" / "seeds"
SEED_NGINX = SEEDS / "seed000-nginx-default.conf"
SEED000_DOCKER = SEEDS / "seed000-docker-run.sh"
SEED001_DOCKER = SEEDS / "seed001-docker-run.sh"
SEED_TOKEN = "<secret token>"
SECRET_ENV = ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_HF")

MAP_SITE = r"""
map $http_authorization $airgate_ok {
    "Bearer 4f9c2a7e1b3d5f60718293a4b5c6d7e8" 1;   # Kibana prod
    "Bearer 0a1b2c3d4e5f60718293a4b5c6d7e8f9" 1;
    "Bearer revoked-token-aaaaaaaaaaaaaaaa" 0;
    ~^Bearer\ x 1;
    default 0;
}
upstream vllm { server 127.0.0.1:8001; server 127.0.0.1:8002; }
server {
    listen 80;
    listen [::]:80;
    server_name llm.example.com;
    location /.well-known/acme-challenge/ { root /var/www/html; }
    location / { return 301 https://$host$request_uri; }
}
server {
    listen 8443 ssl;
    server_name llm.example.com llm;
    ssl_certificate certs/llm.pem;
    ssl_certificate_key /etc/ssl/private/llm.key;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2;
    ssl_ciphers HIGH:!aNULL;
    client_max_body_size 50m;
    access_log /var/log/nginx/llm.access.log;
    include snippets/extra.conf;
    location /v1/ {
        if ($airgate_ok = 0) { add_header WWW-Authenticate Bearer; return 401; }
        proxy_pass http://vllm/v1/;
        proxy_read_timeout 10m;
        proxy_connect_timeout 3s;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header Authorization "Bearer vllm-internal-key-123456";
    }
    location /health { return 200; }
}
"""
MAP_SECRETS = ("4f9c2a7e1b3d5f60718293a4b5c6d7e8", "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
               "vllm-internal-key-123456")


@pytest.fixture(autouse=True)
def _no_secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # `-e NAME` reads the environment; the developer's own tokens must not leak into tests.
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in SECRET_ENV}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "proxy.cli", "import-nginx", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def run_import(tmp_path: Path, nginx: Path, docker: Path | None = None,
               capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    args = argparse.Namespace(file=nginx, docker_command=docker, tokens_file=tmp_path / "tokens")
    status = import_main(args)
    assert capsys is not None
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def load(tmp_path: Path, config: str) -> Settings:
    path = tmp_path / "airgate.toml"
    path.write_text(config)
    return load_settings(path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sha256_line(name: str, secret: str) -> str:
    return f"{name} sha256:{hashlib.sha256(secret.encode()).hexdigest()}"


# --------------------------------------------------------------------------- the seeds


def test_seed_config_and_docker_command_via_the_cli(tmp_path: Path) -> None:
    result = run_cli(tmp_path, str(SEED_NGINX), "--docker-command", str(SEED000_DOCKER))
    assert result.returncode == 0, result.stderr
    settings = load(tmp_path, result.stdout)

    assert settings.listen.https == "0.0.0.0:443"
    assert settings.listen.http == "0.0.0.0:80"
    assert settings.listen.server_name == "<yourdomainname.com>"
    assert settings.listen.cert == "/etc/letsencrypt/live/<yourdomainname.com>/fullchain.pem"
    assert settings.listen.key == "/etc/letsencrypt/live/<yourdomainname.com>/privkey.pem"
    assert settings.upstream.url == "http://127.0.0.1:8000"
    assert settings.auth.tokens_file == str(tmp_path / "tokens")

    tokens = tmp_path / "tokens"
    assert tokens.read_text().splitlines() == [sha256_line("kibana", SEED_TOKEN)]
    assert mode(tokens) == 0o600
    # The token that Kibana already sends through Nginx is accepted as it is.
    assert TokenStore.load(tokens).lookup(SEED_TOKEN.encode()) == "kibana"

    launcher = settings.launcher
    assert launcher.image == "vllm/vllm-openai:v0.9.1"
    assert launcher.model == "mistralai/[YOUR_MODEL_ID]"
    assert launcher.preset == "mistral"
    assert launcher.gpus == "all"
    assert launcher.tensor_parallel_size == 2
    assert launcher.gpu_memory_utilization == 0.90
    assert launcher.hf_cache == "/root/.cache/huggingface"
    assert launcher.port == 8000
    assert launcher.extra_args == ()
    assert launcher.api_key_file == str(tmp_path / "vllm-api-key")
    assert launcher.hf_token_file == str(tmp_path / "hf-token")
    assert settings.upstream.api_key_file == launcher.api_key_file
    for name in ("vllm-api-key", "hf-token"):
        assert mode(tmp_path / name) == 0o600
        assert (tmp_path / name).read_text() == "xxxx"

    output = result.stdout + result.stderr
    assert SEED_TOKEN not in output and "xxxx" not in output
    err = result.stderr
    assert "seed000-nginx-default.conf:15: if: warning: token 'kibana' looks like the guide's " \
           "placeholder" in err
    assert "seed000-nginx-default.conf:9: server_name: warning:" in err
    assert "seed000-nginx-default.conf:8: listen: note: http2" in err
    assert "seed000-docker-run.sh:8: --ipc: not translated:" in err
    assert "seed000-docker-run.sh:2: --name: not translated:" in err
    assert "seed000-docker-run.sh:7: -p: note: airgate publishes vLLM on 127.0.0.1 only" in err
    assert "seed000-docker-run.sh:10: --model: warning:" in err
    assert "HUGGING_FACE_HUB_TOKEN looks like the guide's placeholder" in err


def test_second_seed_docker_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_import(tmp_path, SEED_NGINX, SEED001_DOCKER, capsys)
    assert status == 0, err
    launcher = load(tmp_path, out).launcher
    assert launcher.model == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    assert launcher.preset == "mistral"
    assert (launcher.gpus, launcher.tensor_parallel_size) == ("all", 2)
    assert launcher.extra_args == ()
    assert "run `docker rm -f Mistral-Small-3.2-24B` before `airgate run`" in err
    assert "stop `docker rm" not in err
    assert "--model: warning" not in err
    assert "xxxx" not in out + err


def test_without_docker_command_there_is_no_launcher_section(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_import(tmp_path, SEED_NGINX, None, capsys)
    assert status == 0, err
    assert "[launcher]" not in out.replace("No [launcher]", "")
    settings = load(tmp_path, out)
    assert settings.upstream.api_key_file == ""
    assert not (tmp_path / "vllm-api-key").exists()
    # The defaults `airgate run` would start are said on standard error, never in the config.
    assert "note: no --docker-command, so [launcher] keeps its defaults" in err
    assert f"model {settings.launcher.model}" in err and "tensor_parallel_size 1" in err
    assert "before `airgate run`, import again with --docker-command FILE" in err
    assert "keeps its defaults" not in out


def test_with_docker_command_no_launcher_defaults_note(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_import(tmp_path, SEED_NGINX, SEED001_DOCKER, capsys)
    assert status == 0, err
    assert "keeps its defaults" not in err


def test_output_carries_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_import(tmp_path, SEED_NGINX, SEED000_DOCKER, capsys)
    assert "# from `listen 443 ssl http2` (line 8)" in out
    assert "# PLACEHOLDER from the Nginx file" in out
    assert "# from `proxy_pass http://localhost:8000/` (line 18)" in out


def test_importing_twice_adds_no_duplicate_token(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_import(tmp_path, SEED_NGINX, SEED000_DOCKER, capsys)
    status, _, err = run_import(tmp_path, SEED_NGINX, SEED000_DOCKER, capsys)
    assert status == 0
    assert (tmp_path / "tokens").read_text().splitlines() == [sha256_line("kibana", SEED_TOKEN)]
    assert "already in" in err


def test_existing_token_name_is_not_reused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tokens").write_text(sha256_line("kibana", "another-token-0123456789"))
    (tmp_path / "tokens").chmod(0o644)
    status, _, _ = run_import(tmp_path, SEED_NGINX, None, capsys)
    assert status == 0
    lines = (tmp_path / "tokens").read_text().splitlines()
    assert lines == [sha256_line("kibana", "another-token-0123456789"),
                     sha256_line("kibana-2", SEED_TOKEN)]
    assert mode(tmp_path / "tokens") == 0o600


def test_secret_file_written_by_hand_is_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "hf-token").write_text("hf_real_value")
    status, _, err = run_import(tmp_path, SEED_NGINX, SEED000_DOCKER, capsys)
    assert status == 0
    assert (tmp_path / "hf-token").read_text() == "hf_real_value"
    assert mode(tmp_path / "hf-token") == 0o600
    assert "already holds a different value; kept it" in err
    assert "hf_real_value" not in err


def test_kept_secret_file_gets_no_placeholder_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second import, after the operator wrote the real vLLM key: the file is kept, and the
    guide's `xxxx` (never written) is not warned about; hf-token (still written) is."""
    run_import(tmp_path, SEED_NGINX, SEED001_DOCKER, capsys)
    (tmp_path / "vllm-api-key").write_text("real-vllm-key-0123456789")
    status, _, err = run_import(tmp_path, SEED_NGINX, SEED001_DOCKER, capsys)
    assert status == 0, err
    assert (tmp_path / "vllm-api-key").read_text() == "real-vllm-key-0123456789"
    assert "vllm-api-key already holds a different value; kept it" in err
    assert "VLLM_API_KEY looks like the guide's placeholder" not in err
    assert "HUGGING_FACE_HUB_TOKEN looks like the guide's placeholder; it was written to " \
           "hf-token anyway" in err
    assert "real-vllm-key-0123456789" not in err


def test_placeholder_key_in_nginx_is_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.conf"
    site.write_text(SEED_NGINX.read_text().replace(
        "proxy_pass http://localhost:8000/;",
        'proxy_pass http://localhost:8000/;\n        proxy_set_header Authorization '
        '"Bearer xxxx";'))
    status, _, err = run_import(tmp_path, site, None, capsys)
    assert status == 0, err
    assert (tmp_path / "vllm-api-key").read_text() == "xxxx"
    assert "site.conf:19: proxy_set_header Authorization: warning: its Bearer key looks like " \
           "the guide's placeholder; it was written to vllm-api-key anyway" in err


# --------------------------------------------------------------------------- variants


def test_map_of_tokens_and_tuned_directives(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.conf"
    site.write_text(MAP_SITE)
    status, out, err = run_import(tmp_path, site, None, capsys)
    assert status == 0, err
    settings = load(tmp_path, out)

    assert (tmp_path / "tokens").read_text().splitlines() == [
        sha256_line("Kibana-prod", MAP_SECRETS[0]), sha256_line("token2", MAP_SECRETS[1])]
    assert TokenStore.load(tmp_path / "tokens").lookup(b"revoked-token-aaaaaaaaaaaaaaaa") is None

    assert settings.listen.https == "0.0.0.0:8443"
    assert settings.listen.http == "0.0.0.0:80"
    assert settings.listen.server_name == "llm.example.com"
    assert settings.listen.cert == "/etc/nginx/certs/llm.pem"
    assert settings.upstream.url == "http://127.0.0.1:8001"
    assert settings.upstream.read_timeout == 600
    assert settings.upstream.connect_timeout == 3
    assert settings.upstream.max_body == 50 * 1024 * 1024
    assert settings.upstream.api_key_file == str(tmp_path / "vllm-api-key")
    assert (tmp_path / "vllm-api-key").read_text() == MAP_SECRETS[2]
    assert mode(tmp_path / "vllm-api-key") == 0o600
    assert (settings.log.access, settings.log.access_file) == (
        "combined", "/var/log/nginx/llm.access.log")

    for secret in MAP_SECRETS:
        assert secret not in out and secret not in err
    expected = [
        "site.conf:6: map: not translated: only literal \"Bearer <token>\" keys",
        "site.conf:12: listen: not translated: airgate binds one address per listener",
        "site.conf:14: location: not translated: airgate's plain-HTTP listener only redirects",
        "site.conf:19: server_name: note: airgate uses one name",
        "site.conf:20: ssl_certificate: note: relative path",
        "site.conf:22: ssl_protocols: warning: airgate accepts TLS 1.2 and 1.3 only; clients "
        "limited to TLSv1 TLSv1.1",
        "site.conf:23: ssl_ciphers: not translated:",
        "site.conf:26: include: not translated:",
        "site.conf:27: location: note: airgate forwards only the routes in [upstream] allow",
        "site.conf:28: add_header: not translated: inside the token check",
        "site.conf:29: proxy_pass: note: upstream vllm has 2 servers",
        "site.conf:32: proxy_buffering: note: airgate never buffers",
        "site.conf:33: proxy_http_version: note:",
        "site.conf:34: proxy_set_header: not translated:",
        "site.conf:37: location: not translated:",
    ]
    for line in expected:
        assert line in err, line
    # One line per finding, each `file:line: directive: reason`, in file order.
    numbers = [int(line.split(":")[1]) for line in err.splitlines() if "site.conf:" in line]
    assert numbers == sorted(numbers)


def test_unused_map_and_foreign_if_are_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.conf"
    site.write_text("""
map $http_authorization $ok { "Bearer aaaaaaaaaaaaaaaaaaaa" 1; default 0; }
server {
    listen 443 ssl;
    server_name llm.example.com;
    ssl_certificate /c.pem;
    ssl_certificate_key /k.pem;
    location / {
        if ($request_method = PUT) { return 401; }
        proxy_pass http://127.0.0.1:8000;
    }
}
""")
    status, out, err = run_import(tmp_path, site, None, capsys)
    assert status == 0
    assert "site.conf:2: map: not translated: $ok is not checked" in err
    assert "site.conf:9: if: not translated:" in err
    assert "no bearer-token check found" in err
    assert load(tmp_path, out).listen.http == ""
    assert TokenStore.load(tmp_path / "tokens").entries == ()


def test_docker_environment_and_shell_variables(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "key-from-environment-0123456789")
    docker = tmp_path / "run.sh"
    docker.write_text("""```bash
$ sudo docker run -d --rm -e VLLM_API_KEY -e HF_TOKEN=$MY_HF --gpus '"device=0,1"' \\
    -p 127.0.0.1:9000:8000 -v /srv/hf:/root/.cache/huggingface:ro --shm-size 16g \\
    vllm/vllm-openai:v0.10.0 --model NousResearch/Hermes-3-Llama-3.1-8B \\
    --served-model-name hermes --tool-call-parser hermes --enable-auto-tool-choice \\
    --max-model-len 32768 --api-key=inline-key-ignored-for-env --host 0.0.0.0  # comment
```
""")
    status, out, err = run_import(tmp_path, SEED_NGINX, docker, capsys)
    assert status == 0, err
    settings = load(tmp_path, out)
    launcher = settings.launcher
    assert launcher.image == "vllm/vllm-openai:v0.10.0"
    assert launcher.model == "NousResearch/Hermes-3-Llama-3.1-8B"
    assert launcher.served_model_name == "hermes"
    assert launcher.preset == "hermes"
    assert launcher.gpus == "device=0,1"
    assert launcher.port == 9000
    assert launcher.hf_cache == "/srv/hf"
    assert launcher.extra_args == ("--max-model-len", "32768")
    # `-e VLLM_API_KEY` took the value from the environment; the later --api-key is reported.
    assert (tmp_path / "vllm-api-key").read_text() == "key-from-environment-0123456789"
    # `HF_TOKEN=$MY_HF` with MY_HF unset: an empty 0600 file to fill in, never a literal "$MY_HF".
    assert (tmp_path / "hf-token").read_text() == ""
    assert mode(tmp_path / "hf-token") == 0o600
    assert launcher.hf_token_file == str(tmp_path / "hf-token")
    assert "HF_TOKEN=$MY_HF names a shell variable that is not set here" in err
    assert "run.sh:2: -d: not translated" in err
    assert "run.sh:3: --shm-size: not translated" in err
    assert "run.sh:6: --host: not translated" in err
    assert "vLLM is published on port 9000 but Nginx proxied to port 8000" in err
    for secret in ("key-from-environment-0123456789", "inline-key-ignored-for-env"):
        assert secret not in out and secret not in err


def test_llama3_preset_and_unset_environment_variable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = tmp_path / "run.sh"
    docker.write_text("podman run --gpus all -e VLLM_API_KEY -p 8000:8000 img:1 "
                      "--model meta-llama/Llama-3.1-8B-Instruct --tool-call-parser llama3_json "
                      "--enable-auto-tool-choice --tensor-parallel-size=4\n")
    status, out, err = run_import(tmp_path, SEED_NGINX, docker, capsys)
    assert status == 0, err
    launcher = load(tmp_path, out).launcher
    assert (launcher.runtime, launcher.preset, launcher.tensor_parallel_size) == (
        "podman", "llama3", 4)
    assert "VLLM_API_KEY comes from the shell's environment, which does not set it here" in err
    assert (tmp_path / "vllm-api-key").read_text() == ""


def test_partial_mistral_flags_stay_in_extra_args(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = tmp_path / "run.sh"
    docker.write_text("docker run --gpus all img --model m/x --tokenizer-mode mistral "
                      "--enable-auto-tool-choice\n")
    status, out, _ = run_import(tmp_path, SEED_NGINX, docker, capsys)
    assert status == 0
    launcher = load(tmp_path, out).launcher
    assert launcher.preset == ""
    assert launcher.extra_args == ("--tokenizer-mode", "mistral", "--enable-auto-tool-choice")


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(("text", "message"), [
    ("server { listen 443 ssl; location / { proxy_pass http://x:1; }", "unexpected end of file"),
    ("server { listen 443 ssl; }\n", "no server block with proxy_pass"),
])
def test_unusable_nginx_file_fails_with_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    site = tmp_path / "site.conf"
    site.write_text(text)
    status, out, err = run_import(tmp_path, site, None, capsys)
    assert status == 2
    assert out == ""
    assert message in err and "site.conf" in err
    assert not (tmp_path / "tokens").exists()


def test_missing_files_fail_with_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_import(tmp_path, tmp_path / "nope.conf", None, capsys)
    assert (status, out) == (2, "")
    assert "no such file; pass the Nginx site file" in err
    status, out, err = run_import(tmp_path, SEED_NGINX, tmp_path / "nope.sh", capsys)
    assert (status, out) == (2, "")
    assert "cannot read" in err and "docker run" in err


def test_text_without_docker_run_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = tmp_path / "run.sh"
    docker.write_text("echo hello\n")
    status, _, err = run_import(tmp_path, SEED_NGINX, docker, capsys)
    assert status == 2
    assert "no `docker run ...` command found" in err


# --------------------------------------------------------------------------- value parsing


@pytest.mark.parametrize(("text", "seconds"), [
    ("60", 60), ("60s", 60), ("5m", 300), ("1m30s", 90), ("500ms", 0.5), ("1h", 3600)])
def test_nginx_seconds(text: str, seconds: float) -> None:
    assert nginx_seconds(text) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("1m", 1024**2), ("10M", 10 * 1024**2), ("512k", 512 * 1024), ("2g", 2 * 1024**3)])
def test_nginx_bytes(text: str, size: int) -> None:
    assert nginx_bytes(text) == size


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5s", "s5"])
def test_bad_nginx_times(text: str) -> None:
    with pytest.raises(ValueError):
        nginx_seconds(text)


@pytest.mark.parametrize("text", ["", "5x", "m", "1.5m", "-1"])
def test_bad_nginx_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        nginx_bytes(text)


@pytest.mark.parametrize(("spec", "address"), [
    ("80", "0.0.0.0:80"), ("*:443", "0.0.0.0:443"), ("127.0.0.1:8443", "127.0.0.1:8443"),
    ("[::]:443", "[::]:443"), ("localhost", "localhost:80"), ("unix:/run/x.sock", None)])
def test_listen_address(spec: str, address: str | None) -> None:
    assert listen_address(spec) == address


@pytest.mark.parametrize(("value", "placeholder"), [
    ("<secret token>", True), ("xxxx", True), ("mistralai/[YOUR_MODEL_ID]", True),
    ("changeme", True), ("your-token-here", True), ("ag-3q2Zb1Xr9", False),
    ("llm.example.com", False), ("mistralai/Mistral-Small-3.2-24B-Instruct-2506", False)])
def test_placeholders(value: str, placeholder: bool) -> None:
    assert looks_like_placeholder(value) is placeholder


@given(st.text())
def test_toml_strings_round_trip(value: str) -> None:
    assert tomllib.loads(f"key = {toml_string(value)}")["key"] == value
