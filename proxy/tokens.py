"""Bearer tokens: a file of `NAME sha256:HEX` lines, compared in constant time as digests.

The token itself is never stored (unless an operator writes a `plain:` line, which is warned
about), never logged, and never leaves this module: callers get the NAME of the token that
matched, which is what logs and metrics show.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOKEN_PREFIX = "ag-"


class TokenFileError(Exception):
    """The tokens file cannot be used; the message names the file, the line and the fix."""


def digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True, slots=True)
class TokenStore:
    """Maps sha256(token) -> NAME. Lookup hashes the candidate once, then compares it with
    every stored digest using hmac.compare_digest so timing tells nothing about which digest
    (or how much of one) matched."""

    entries: tuple[tuple[bytes, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self.entries))

    def lookup(self, token: bytes) -> str | None:
        candidate = hashlib.sha256(token).digest()
        found: str | None = None
        for stored, name in self.entries:
            if hmac.compare_digest(stored, candidate):
                found = name
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenStore:
        entries: list[tuple[bytes, str]] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not _NAME.match(parts[0]):
                raise TokenFileError(
                    f"{source}:{number}: expected 'NAME sha256:HEX' "
                    f"(NAME of letters, digits, '_.@-'); create lines with `airgate token new`"
                )
            name, value = parts
            kind, _, data = value.partition(":")
            if kind == "sha256":
                try:
                    raw = bytes.fromhex(data)
                except ValueError:
                    raw = b""
                if len(raw) != 32:
                    raise TokenFileError(f"{source}:{number}: sha256: needs 64 hex digits")
                entries.append((raw, name))
            elif kind == "plain" and data:
                log.warning("%s:%d: token %r is stored in plain text; replace the line with "
                            "'%s sha256:%s'", source, number, name, name, digest(data).hex())
                entries.append((digest(data), name))
            else:
                raise TokenFileError(
                    f"{source}:{number}: value must start with 'sha256:' or 'plain:'"
                )
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise TokenFileError(
                f"cannot read tokens file {path}: {error.strerror}; create it with "
                f"`airgate token new NAME --file {path}`"
            ) from error
        store = cls.parse(text, str(path))
        if not store.entries:
            log.warning("tokens file %s has no tokens: every request will get 401", path)
        return store


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 bits of randomness


def append_token(path: Path, name: str) -> str:
    """Create a token, append its digest line to `path` (created 0600), return the token."""
    if not _NAME.match(name):
        raise TokenFileError(f"token name {name!r}: use 1-64 letters, digits or '_.@-'")
    if path.exists() and name in TokenStore.load(path).names:
        raise TokenFileError(f"{path} already has a token named {name!r}; pick another name "
                             "or delete that line first to rotate it")
    if not path.parent.is_dir():
        raise TokenFileError(f"directory {path.parent} does not exist: create it first "
                             f"(install -d -m 0750 {path.parent}) or pass another --file")
    token = new_token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as error:
        raise TokenFileError(f"cannot write {path}: {error.strerror}") from error
    with os.fdopen(fd, "a") as handle:
        if handle.tell() > 0 and not path.read_text().endswith("\n"):
            handle.write("\n")
        handle.write(f"{name} sha256:{digest(token).hex()}\n")
    return token


def token_main(args: argparse.Namespace) -> int:
    try:
        token = append_token(args.file, args.name)
    except TokenFileError as error:
        print(f"airgate: {error}", file=sys.stderr)
        return 2
    print(token)
    print(f"# token {args.name!r} added to {args.file} (only its digest is stored); "
          "this is the only time it is shown", file=sys.stderr)
    return 0
