"""`airgate check`: validate a config the way start-up would, without starting anything.

Files readable, certificate matches key, ports parse, tokens file well-formed, secrets files
present; every problem found is reported, not only the first. Secret files that are empty or
still hold the guide's placeholder are warned about (the check still passes). Prints the
effective settings (paths resolved; secrets are only ever file paths, and inline-looking ones
in extra_args are masked). The launcher's runtime and GPUs are checked at launch and by
`airgate doctor`, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from proxy.migrate.findings import looks_like_placeholder
from proxy.settings import ConfigError, Settings, load_settings, masked
from proxy.tls import tls_problems
from proxy.tokens import TokenFileError, TokenStore


def _readable(key: str, path: str) -> str | None:
    if path and not os.access(path, os.R_OK):
        return f"{key} = {path!r} is not readable: create it or fix its permissions"
    return None


def secret_files(settings: Settings) -> list[tuple[str, str, tuple[str, str]]]:
    """(key, path, (what belongs in the file, the other way out)) per secret file setting."""
    return [
        ("upstream.api_key_file", settings.upstream.api_key_file,
         ("the key vLLM requires (VLLM_API_KEY)", "")),
        ("metrics.token_file", settings.metrics.token_file,
         ("the token Prometheus is to send", "")),
        ("launcher.api_key_file", settings.launcher.api_key_file,
         ("the key vLLM is to require (VLLM_API_KEY)", "")),
        ("launcher.hf_token_file", settings.launcher.hf_token_file,
         ("your Hugging Face token",
          ", or set launcher.hf_token_file = \"\" for a model that needs none")),
    ]


def secret_warnings(settings: Settings) -> list[str]:
    """Secret files that start-up would read as they are but that hold no real secret yet: empty,
    or still the guide's placeholder (`xxxx`, `<secret token>`: what `airgate import-nginx`
    warns about). Never shows a file's content."""
    keys_by_path: dict[str, list[str]] = {}
    fix_by_path: dict[str, tuple[str, str]] = {}
    for key, path, fix in secret_files(settings):
        if path:
            keys_by_path.setdefault(path, []).append(key)
            fix_by_path.setdefault(path, fix)
    found: list[str] = []
    for path, keys in keys_by_path.items():
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except (OSError, UnicodeDecodeError):
            continue  # unreadable: a problem, reported by problems()
        names, (what, other) = " and ".join(keys), fix_by_path[path]
        if not value:
            found.append(f"{names}: the file {path!r} is empty: write {what} into it{other}")
        elif looks_like_placeholder(value):
            found.append(f"{names}: the file {path!r} still holds a placeholder (like the "
                         f"guide's xxxx), not a real secret: replace its content with {what}"
                         f"{other}")
    return found


def problems(settings: Settings) -> list[str]:
    """Every problem found, each naming the key and the fix; none: start-up would get going."""
    found = tls_problems(settings.listen)
    try:
        TokenStore.load(settings.auth.tokens_file)
    except TokenFileError as error:
        found.append(f"auth.tokens_file: {error}")
    for key, path, _ in secret_files(settings):
        problem = _readable(key, path)
        if problem:
            found.append(problem)
    found.extend(launcher_problems(settings))
    if settings.launcher.api_key_file and not settings.upstream.api_key_file:
        found.append("launcher.api_key_file is set but upstream.api_key_file is not: vLLM will "
                     "refuse the proxy; set upstream.api_key_file to the same file")
    return found


def launcher_problems(settings: Settings) -> list[str]:
    """[launcher] values that can be judged without starting anything (whether docker and the
    GPUs are there is for `airgate launch` and `airgate doctor`)."""
    from proxy.launcher.command import LaunchError, check_extra_args
    from proxy.launcher.presets import preset_flags

    found: list[str] = []
    try:
        preset_flags(settings.launcher.preset)
    except ValueError as error:
        found.append(str(error))
    try:
        check_extra_args(settings.launcher)
    except LaunchError as error:
        found.append(str(error))
    host, port = settings.upstream.hostport
    if settings.launcher.port != port and host in ("127.0.0.1", "localhost"):
        found.append(f"launcher.port is {settings.launcher.port} but upstream.url points at port "
                     f"{port}: make them the same, or the proxy will never reach vLLM")
    return found


def check_main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"airgate: {error}", file=sys.stderr)
        return 2
    found = problems(settings)
    print(json.dumps(masked(settings), indent=2))
    for problem in found:
        print(f"airgate: {problem}", file=sys.stderr)
    for warning in secret_warnings(settings):
        print(f"airgate: warning: {warning}", file=sys.stderr)
    if found:
        return 1
    print(f"airgate: {args.config} is valid", file=sys.stderr)
    return 0
