"""`airgate demo` (what `make run` runs): the real proxy on https://127.0.0.1:8443 in front of
the built-in stand-in vLLM, with a throw-away CA, certificate and token. Nothing leaves the
machine; everything it creates lives in one temporary directory, removed on exit."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import trustme

from proxy.server import ProxyServer, configure_logging, install_uvloop, serve
from proxy.settings import load_settings
from proxy.simulator import SimulatorConfig, start_simulator
from proxy.tokens import append_token

MODEL = "demo-model"


def write_demo_files(directory: Path, host: str, port: int, upstream: str) -> tuple[Path, str]:
    ca = trustme.CA()
    leaf = ca.issue_cert(host, "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    token = append_token(directory / "tokens", "demo")
    config = directory / "airgate.toml"
    config.write_text(
        "# written by `airgate demo`; see config/airgate.toml for every key\n"
        f'[listen]\nhttps = "{host}:{port}"\nhttp = ""\nserver_name = "{host}"\n'
        'cert = "server.pem"\nkey = "server.pem"\n\n'
        '[auth]\ntokens_file = "tokens"\n\n'
        f'[upstream]\nurl = "{upstream}"\n\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n\n'
        "# what the stand-in serves (read by `airgate doctor` and `airgate kibana`)\n"
        f'[launcher]\nmodel = "{MODEL}"\n'
    )
    token_file = directory / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return config, token


def instructions(url: str, ca: Path, token: str, config: Path, metrics_port: int) -> str:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello world"}]})
    stream_body = json.dumps({"model": MODEL, "stream": True,
                              "messages": [{"role": "user", "content": "Tell me a story"}]})
    return f"""
airgate demo is running: {url} -> a stand-in vLLM (model "{MODEL}") on loopback.

  token (shown once): {token}
  CA certificate:     {ca}
  config:             {config}

Kibana's connector test request:
  curl --cacert {ca} {url}/v1/chat/completions \\
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{body}'

A streamed answer (tokens arrive as they are generated):
  curl -N --cacert {ca} {url}/v1/chat/completions \\
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{stream_body}'

Python (openai SDK):
  {sys.executable} -c 'import openai; c = openai.OpenAI(base_url="{url}/v1", \
    api_key="{token}", http_client=openai.DefaultHttpxClient(verify="{ca}")); \
    print(c.chat.completions.create(model="{MODEL}", \
    messages=[{{"role": "user", "content": "Hello world"}}]).choices[0].message.content)'

Readiness: curl --cacert {ca} {url}/healthz
Check it end to end (while the demo runs):
  {Path(sys.executable).parent / "airgate"} doctor --config {config} \\
    --token-file {config.parent / "token"}

Metrics (Prometheus): curl http://127.0.0.1:{metrics_port}/metrics
Access log: below, in Nginx's combined format (token name as the user).

Press Ctrl-C to stop.
"""


async def run_demo(host: str, port: int) -> int:
    directory = Path(tempfile.mkdtemp(prefix="airgate-demo-"))
    simulator = await start_simulator(SimulatorConfig(model=MODEL, ttft=0.25, token_interval=0.04,
                                                      default_tokens=24))
    try:
        config, token = write_demo_files(directory, host, port, simulator.url)
        settings = load_settings(config)
        configure_logging(settings)

        def started(server: ProxyServer) -> None:
            url = f"https://{host}:{server.https_port}"
            print(instructions(url, directory / "ca.pem", token, config, server.metrics_port),
                  flush=True)

        try:
            return await serve(settings, on_started=started)
        except OSError as error:
            print(f"airgate demo: {error}; pass --port to use another port", file=sys.stderr)
            return 1
    finally:
        await simulator.close()
        shutil.rmtree(directory, ignore_errors=True)


def demo_main(args: argparse.Namespace) -> int:
    install_uvloop()
    return asyncio.run(run_demo(args.host, args.port))
