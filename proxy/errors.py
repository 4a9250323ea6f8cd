"""OpenAI-shaped JSON error responses, pre-rendered where they sit on a hot path.

Kibana shows `error.message` to the user, so every message says what happened and what fixes it.
"""

from __future__ import annotations

import json
from http import HTTPStatus

REASONS = {status.value: status.phrase for status in HTTPStatus}


def error_body(message: str, type_: str, code: str | int | None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


def response_bytes(
    status: int,
    body: bytes,
    *,
    extra_headers: tuple[tuple[str, str], ...] = (),
    content_type: str = "application/json",
    keep_alive: bool = True,
) -> bytes:
    """A whole HTTP/1.1 response, head and body, ready to write."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | int | None = None,
    *,
    extra_headers: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
) -> bytes:
    return response_bytes(
        status, error_body(message, type_, code), extra_headers=extra_headers, keep_alive=keep_alive
    )


def normalise_upstream_error(status: int, body: bytes, request_id: str, keep_alive: bool) -> bytes:
    """vLLM's error bodies in the one shape Kibana reads: {"error": {"message", ...}}.

    vLLM <= 0.10.0 sends {"object":"error","message":...}; newer ones nest it; an engine that
    died sends an empty 500; vLLM's own 401 means airgate's upstream key is wrong — the client's
    token was fine, so that must not reach the client as a 401.
    """
    message = ""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    code: str | int | None = status
    param = None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            message = str(inner.get("message", ""))
            type_ = str(inner.get("type", type_))
            code = inner.get("code", code)
            param = inner.get("param")
        elif isinstance(inner, str):
            message = inner
        elif "message" in data:
            message = str(data["message"])
            type_ = str(data.get("type", type_))
            code = data.get("code", code)
            param = data.get("param")
    if status == 401:
        status = 502
        type_ = "server_error"
        code = "upstream_auth"
        message = ("vLLM refused airgate's key: set [upstream] api_key_file to the same key "
                   "vLLM was started with (VLLM_API_KEY / [launcher] api_key_file)")
    elif not message:
        if status >= 500:
            message = (f"the model server failed with {status} and no details (the engine may "
                       "have died; see the launcher's log)")
        else:
            message = body[:500].decode("utf-8", "replace") or f"vLLM answered {status}"
    payload = json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()
    return response_bytes(status, payload, keep_alive=keep_alive,
                          extra_headers=(("X-Request-Id", request_id),))
