"""Reading the Nginx file with crossplane, and small helpers over its nodes (comments,
token names, redirects, `return 401` blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import crossplane

from proxy.migrate.common import DENY_CODES, REDIRECT_CODES, TOKEN_NAME_CHARS, ImportFailure, Node


def parse_nginx(path: Path) -> list[Node]:
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file; pass the Nginx site file "
                            "(for example /etc/nginx/sites-available/default)")
    # check_ctx/check_args off: a site file is a fragment of nginx.conf, not a whole one.
    payload = crossplane.parse(str(path), single=True, comments=True, catch_errors=True,
                               check_ctx=False, check_args=False)
    if payload["errors"]:
        error = payload["errors"][0]
        raise ImportFailure(f"{path}:{error.get('line') or '?'}: {error['error']}; fix the file "
                            "(`nginx -t` reports the same problem) and run import-nginx again")
    parsed: list[Node] = payload["config"][0]["parsed"]
    return parsed


def real_nodes(block: Iterable[Node]) -> list[Node]:
    return [node for node in block if node["directive"] != "#"]


def trailing_comment(block: Sequence[Node], index: int) -> str:
    """The `# comment` that shares a line with block[index], or ''."""
    if index + 1 < len(block):
        after = block[index + 1]
        if after["directive"] == "#" and after["line"] == block[index]["line"]:
            return str(after.get("comment", "")).strip()
    return ""


def token_name(text: str, taken: set[str], fallback: str) -> str:
    """A tokens-file NAME from a comment ('# alice (SOC)' -> 'alice-SOC'), unique in `taken`."""
    cleaned = "".join(char if char in TOKEN_NAME_CHARS else "-" for char in text.strip())
    while "--" in cleaned:
        cleaned = cleaned.replace("--", "-")
    base = cleaned.strip("-.")[:60] or fallback
    name, number = base, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    taken.add(name)
    return name


def redirect_target(node: Node) -> str | None:
    """The https:// target of `return 301 https://...`, else None."""
    args = node["args"]
    if node["directive"] == "return" and len(args) == 2 and args[0] in REDIRECT_CODES:
        target = str(args[1])
        return target if target.startswith("https://") else None
    return None


def is_deny_block(block: Sequence[Node]) -> bool:
    return any(node["directive"] == "return" and node["args"][:1] and node["args"][0] in DENY_CODES
               for node in real_nodes(block))
