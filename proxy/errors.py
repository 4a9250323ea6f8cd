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
