"""The `airgate` command: one entry point, a sub-command per job.

Each sub-command lives in the module that owns its job; this file only parses arguments and
dispatches, importing lazily so that `airgate token new` does not load the server stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy.settings import DEFAULT_CONFIG

# sub-command -> ("module:function", help). The function takes the parsed argparse.Namespace
# and returns the exit status.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("proxy.server:serve_main", "run the proxy alone"),
    "run": ("proxy.server:run_main", "run the launcher and the proxy in one process"),
    "launch": ("proxy.launcher.commands:launch_main", "run the launcher alone"),
    "status": ("proxy.launcher.commands:status_main", "show the launcher's state"),
    "check": ("proxy.check:check_main", "validate a config and print the effective settings"),
    "token": ("proxy.tokens:token_main", "manage bearer tokens"),
    "demo": ("proxy.demo:demo_main", "a proxy with a built-in stand-in vLLM on 127.0.0.1:8443"),
    "import-nginx": ("proxy.nginx_import:import_main",
                     "translate the Elastic guide's Nginx site (and docker run line)"),
    "kibana": ("proxy.kibana:kibana_main", "print Kibana connector settings"),
    "doctor": ("proxy.doctor:doctor_main", "check a running setup end to end"),
    "bundle": ("proxy.bundle:bundle_main", "save the vLLM image and model for an air gap"),
    "unbundle": ("proxy.bundle:unbundle_main", "install a bundle on the air-gapped server"),
}


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", type=Path, default=DEFAULT_CONFIG,
        help=f"TOML config file (default {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airgate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text) for name, (_, text) in COMMANDS.items()}
    for name in ("serve", "run", "launch", "status", "check", "kibana", "doctor"):
        _add_config(parsers[name])
    parsers["launch"].add_argument(
        "--print", action="store_true", dest="print_only",
        help="print the exact command (secrets masked) and exit",
    )
    parsers["doctor"].add_argument("--token-file", type=Path,
                                   help="a file holding a bearer token (else $AIRGATE_TOKEN)")
    parsers["doctor"].add_argument("--ca", type=Path,
                                   help="CA file to trust (default: the configured certificate)")
    parsers["kibana"].add_argument("--json", action="store_true",
                                   help="print the connector as a Kibana API body")
    demo = parsers["demo"]
    demo.add_argument("--port", type=int, default=8443, help="HTTPS port (default 8443)")
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1)")

    token = parsers["token"].add_subparsers(dest="token_command", required=True)
    new = token.add_parser("new", help="create a token, print it once, append its digest")
    new.add_argument("name", help="the name logs and metrics show for this token (e.g. kibana)")
    new.add_argument("--file", "-f", type=Path, required=True,
                     help="the tokens file ([auth] tokens_file); created 0600 if missing")

    nginx = parsers["import-nginx"]
    nginx.add_argument("file", type=Path, help="the Nginx site config (e.g. "
                       "/etc/nginx/sites-enabled/default)")
    nginx.add_argument("--docker-command", type=Path,
                       help="a file holding the guide's `docker run ...` line: fills [launcher]")
    nginx.add_argument("--tokens-file", type=Path, default=Path("tokens"),
                       help="where the bearer token's digest is written (default: ./tokens); "
                       "secrets from the docker line go beside it")

    bundle = parsers["bundle"]
    _add_config(bundle)
    bundle.add_argument("--out", type=Path, help="directory to write the bundle into "
                        "(an interrupted run resumes there)")
    bundle.add_argument("--model-dir", type=Path, help="take the model from this local "
                        "directory instead of downloading it from the Hugging Face Hub")
    bundle.add_argument("--verify", type=Path, metavar="DIR",
                        help="re-check every checksum of an existing bundle and exit")
    unbundle = parsers["unbundle"]
    unbundle.add_argument("dir", type=Path, help="the bundle directory carried in")
    _add_config(unbundle)
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    handler: Callable[[argparse.Namespace], int] = getattr(module, function)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = _resolve(COMMANDS[args.command][0])
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
