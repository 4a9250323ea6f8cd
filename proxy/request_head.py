"""Small facts about a request head: its request id, a secret in its query, printable text.

Kept out of the forwarding core so that the core reads as the path of one request."""

from __future__ import annotations

import itertools
import os

# Request ids: a random per-process prefix and a counter, 32 hex digits like a UUID's. Unique
# without a getrandom() system call per request (they identify, they are not secrets).
_id_prefix = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_request_id() -> bytes:
    return f"{_id_prefix}{next(_id_counter):016x}".encode()


def _reseed_request_ids() -> None:
    global _id_prefix, _id_counter  # each forked worker gets its own prefix
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_request_ids)


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(33 <= byte < 127 for byte in value)


SECRET_PARAMS = frozenset({b"token", b"access_token", b"api_key", b"apikey", b"key", b"bearer",
                           b"auth", b"authorization", b"password"})


def has_secret_param(query: bytes) -> bool:
    return any(part.partition(b"=")[0].lower() in SECRET_PARAMS for part in query.split(b"&"))


def printable(path: bytes) -> str:
    text = path[:200].decode("latin-1")
    return "".join(ch if ch.isprintable() else "?" for ch in text)
