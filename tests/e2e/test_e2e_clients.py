"""Real clients through airgate to real vLLM: the openai Python SDK, curl, and Node (the
`openai` npm package and axios, sent the way Kibana's connector sends)."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import httpx2
import openai
import pytest
from e2e_support import HERE, SERVED_NAME, Airgate, chat_body

NODE_SCRIPTS = HERE / "node"


def sdk(airgate: Airgate) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{airgate.url}/v1", api_key=airgate.token, max_retries=0,
                         http_client=httpx2.Client(verify=airgate.ssl_context, timeout=60))


# ------------------------------------------------------------------ openai (Python)
def test_openai_python_sdk(airgate: Airgate) -> None:
    with sdk(airgate) as client:
        completion = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Hello world"}],
            max_tokens=16)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_openai_python_sdk_streamed(airgate: Airgate) -> None:
    with sdk(airgate) as client:
        stream = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Hello world"}],
            max_tokens=16, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    # Asked for usage: the usage-only chunk must come through, last.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1])


def test_openai_python_sdk_sees_auth_error(airgate: Airgate) -> None:
    client = openai.OpenAI(base_url=f"{airgate.url}/v1", api_key="ag-wrong", max_retries=0,
                           http_client=httpx2.Client(verify=airgate.ssl_context, timeout=30))
    with client, pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.status_code == 401


# ------------------------------------------------------------------ curl
def curl(airgate: Airgate, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--cacert", str(airgate.ca_file),
         "-H", f"Authorization: Bearer {airgate.token}", "-H", "Content-Type: application/json",
         *args], capture_output=True, text=True, timeout=60, check=False)


def test_curl(airgate: Airgate) -> None:
    done = curl(airgate, "-d", json.dumps(chat_body(max_tokens=8)),
                f"{airgate.url}/v1/chat/completions")
    assert done.returncode == 0, done.stderr + done.stdout
    answer = json.loads(done.stdout)
    assert answer["usage"]["completion_tokens"] == 8


def test_curl_streamed(airgate: Airgate) -> None:
    done = curl(airgate, "-N", "-d", json.dumps(chat_body(max_tokens=8, stream=True)),
                f"{airgate.url}/v1/chat/completions")
    assert done.returncode == 0, done.stderr + done.stdout
    events = [line.removeprefix("data: ") for line in done.stdout.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------ Node (Kibana's clients)
def node(script: str, mode: str, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(["node", str(NODE_SCRIPTS / script), mode], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"node {script} {mode}: {done.stderr}{done.stdout}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_node_axios_connector_test(node_env: dict[str, str]) -> None:
    result = node("kibana_connector.js", "test", node_env)
    assert result["status"] == 200 and result["role"] == "assistant"
    assert result["usage"]["total_tokens"] > 0


def test_node_axios_streamed_like_kibana(node_env: dict[str, str]) -> None:
    result = node("kibana_connector.js", "stream", node_env)
    assert result["status"] == 200 and result["done"]
    assert result["contentType"].startswith("text/event-stream")
    assert result["finishReason"] == "length" and result["text"]
    assert result["chunks"] >= 64  # one per token (max_tokens 64), plus the role chunk


def test_node_openai_sdk(node_env: dict[str, str]) -> None:
    result = node("openai_sdk.js", "chat", node_env)
    assert result["role"] == "assistant" and result["usage"]["completion_tokens"] == 16


def test_node_openai_sdk_streamed(node_env: dict[str, str]) -> None:
    result = node("openai_sdk.js", "stream", node_env)
    assert result["finishReason"] == "length" and result["text"]
