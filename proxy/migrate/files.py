"""The files `airgate import-nginx` writes besides its output, all mode 0600: the tokens file
(digests only) and the secret files beside it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from proxy.migrate.common import ImportFailure
from proxy.migrate.findings import Findings, looks_like_placeholder
from proxy.migrate.models import Secret, TokenLine
from proxy.migrate.nginx_nodes import token_name
from proxy.tokens import TokenFileError, TokenStore, digest


def open_private(path: Path, flags: int) -> int:
    """Open `path` for writing, created 0600, and force 0600 on a file that already existed."""
    fd = os.open(path, flags | os.O_WRONLY | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def write_tokens_file(path: Path, tokens: Sequence[TokenLine], findings: Findings) -> None:
    """Append a `NAME sha256:HEX` line per token not yet in `path` (created 0600)."""
    existing = TokenStore(())
    text = ""
    if path.exists():
        try:
            text = path.read_text()
            existing = TokenStore.parse(text, str(path))
        except (OSError, TokenFileError) as error:
            raise ImportFailure(f"cannot use the tokens file {path}: {error}; fix it or pass "
                                "--tokens-file NEW_PATH") from error
    known = {stored: name for stored, name in existing.entries}
    taken = set(existing.names)
    lines: list[str] = []
    for token in tokens:
        hashed = digest(token.secret)
        if hashed in known:
            findings.note(token.where, "token", f"already in {path} as {known[hashed]!r}")
            continue
        name = token_name(token.name, taken, token.name)
        known[hashed] = name
        lines.append(f"{name} sha256:{hashed.hex()}\n")
    if not text and not lines:
        lines.append(f"# NAME sha256:HEX lines; add one with `airgate token new NAME --file "
                     f"{path}`\n")
    fd = open_private(path, os.O_APPEND)
    with os.fdopen(fd, "a") as handle:
        if text and not text.endswith("\n") and lines:
            handle.write("\n")
        handle.writelines(lines)


def write_secret_file(path: Path, secret: Secret, findings: Findings) -> None:
    """Write the secret (no newline, so readers that do not strip still get it exactly).

    An existing file that already holds a value is kept: it may be the value the operator wrote
    by hand after an earlier import."""
    current = path.read_text() if path.exists() else ""
    if secret.value is None:
        fd = open_private(path, 0)  # an empty 0600 file for the operator to fill
        os.close(fd)
        return
    if current.strip() and current.strip() != secret.value:
        findings.warn(secret.where, secret.origin, f"{path} already holds a different value; "
                      "kept it (delete the file and import again to replace it)")
        fd = open_private(path, 0)
        os.close(fd)
        return
    fd = open_private(path, os.O_TRUNC)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret.value)
    if looks_like_placeholder(secret.value):
        findings.warn(secret.where, secret.origin, f"{secret.label or secret.origin} looks like "
                      f"the guide's placeholder; it was written to {path.name} anyway: replace "
                      "the file's content with the real value")
