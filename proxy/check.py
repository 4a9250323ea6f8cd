"""`airgate check`: validate a config the way start-up would, without starting anything.

Files readable, certificate matches key, ports parse, tokens file well-formed, secrets files
present. Prints the effective settings (paths resolved; secrets are only ever file paths, and
inline-looking ones in extra_args are masked). The launcher's runtime and GPUs are checked at
launch and by `airgate doctor`, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from proxy.settings import ConfigError, Settings, load_settings, masked
from proxy.tls import TLSConfigError, build_server_context
from proxy.tokens import TokenFileError, TokenStore


def _readable(key: str, path: str) -> str | None:
    if path and not os.access(path, os.R_OK):
        return f"{key} = {path!r} is not readable: create it or fix its permissions"
    return None


def problems(settings: Settings) -> list[str]:
    found: list[str] = []
    try:
        build_server_context(settings.listen)
    except TLSConfigError as error:
        found.append(str(error))
    try:
        TokenStore.load(settings.auth.tokens_file)
    except TokenFileError as error:
        found.append(f"auth.tokens_file: {error}")
    for key, path in (
        ("upstream.api_key_file", settings.upstream.api_key_file),
        ("metrics.token_file", settings.metrics.token_file),
        ("launcher.api_key_file", settings.launcher.api_key_file),
        ("launcher.hf_token_file", settings.launcher.hf_token_file),
    ):
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
    if found:
        return 1
    print(f"airgate: {args.config} is valid", file=sys.stderr)
    return 0
