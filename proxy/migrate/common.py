"""Shared by every step of `airgate import-nginx`: the node and value types, the file
names and Nginx constants, and the one exception that stops an import.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

# A crossplane node: {"directive": str, "line": int, "args": [str], "block"?: [...]}.
Node = dict[str, Any]
TomlValue = str | int | float | bool | list[str]

DEFAULT_UPSTREAM = "http://127.0.0.1:8000"
VLLM_KEY_FILE = "vllm-api-key"
HF_TOKEN_FILE = "hf-token"
HF_CACHE_IN_CONTAINER = "/root/.cache/huggingface"
# Nginx resolves a relative certificate path against its prefix; /etc/nginx on every distro.
NGINX_PREFIX = PurePosixPath("/etc/nginx")
MODERN_TLS = frozenset({"TLSv1.2", "TLSv1.3"})
REDIRECT_CODES = frozenset({"301", "302", "307", "308"})
DENY_CODES = frozenset({"401", "403"})
TOKEN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")
PLACEHOLDER_WORDS = frozenset({
    "secret", "token", "secret token", "secret-token", "secret_token", "changeme", "change-me",
    "password", "example", "todo", "apikey", "api-key", "api_key", "key", "replaceme",
})
PLACEHOLDER_PREFIXES = ("your", "replace", "changeme", "insert", "put-")


class ImportFailure(Exception):
    """The input cannot be imported at all; the message names the file and the fix."""
