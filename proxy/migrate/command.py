"""`airgate import-nginx` itself: runs the Nginx and docker sides, writes the files, prints the
config and the findings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.migrate.common import VLLM_KEY_FILE, ImportFailure
from proxy.migrate.docker import translate_docker
from proxy.migrate.files import write_secret_file, write_tokens_file
from proxy.migrate.findings import Findings
from proxy.migrate.models import LauncherPlan, Secret, SiteConfig
from proxy.migrate.nginx import translate_nginx
from proxy.migrate.toml_out import (
    auth_section,
    launcher_section,
    listen_section,
    log_section,
    render_config,
    server_section,
    upstream_section,
)
from proxy.settings import LauncherSettings, parse_hostport


def upstream_port(url: str) -> int:
    return parse_hostport(url.removeprefix("http://"), default_host="127.0.0.1")[1]


def collect_secrets(site: SiteConfig, plan: LauncherPlan | None) -> dict[str, Secret]:
    secrets: dict[str, Secret] = dict(plan.secrets) if plan else {}
    if site.upstream_key is not None:
        given = secrets.get(VLLM_KEY_FILE)
        if given is None or given.value is None:
            secrets[VLLM_KEY_FILE] = site.upstream_key
    return secrets


def cross_check(site: SiteConfig, plan: LauncherPlan | None, findings: Findings,
                docker: Path) -> None:
    if plan is None or plan.port is None:
        return
    port = upstream_port(site.upstream_url)
    if port != plan.port:
        findings.warn(f"{docker}:1", "-p", f"vLLM is published on port {plan.port} but Nginx "
                      f"proxied to port {port}; make [launcher] port and [upstream] url agree")


def run_import(args: argparse.Namespace, findings: Findings) -> tuple[str, str]:
    """Translate, write the tokens and secret files, and return (config text, summary)."""
    tokens_path = Path(args.tokens_file).absolute()
    site = translate_nginx(args.file, findings, tokens_path)
    docker: Path | None = args.docker_command
    plan = translate_docker(docker, findings) if docker is not None else None
    if docker is not None:
        cross_check(site, plan, findings, docker)
    if not tokens_path.parent.is_dir():
        raise ImportFailure(f"directory {tokens_path.parent} does not exist: create it or pass "
                            "--tokens-file PATH")
    write_tokens_file(tokens_path, site.tokens, findings)
    secret_files: dict[str, Path] = {}
    for secret in collect_secrets(site, plan).values():
        path = tokens_path.parent / secret.file_name
        write_secret_file(path, secret, findings)
        secret_files[secret.file_name] = path
    sections = [listen_section(site), auth_section(tokens_path),
                upstream_section(site, secret_files.get(VLLM_KEY_FILE))]
    sections += [s for s in (server_section(site), log_section(site)) if s is not None]
    if plan is not None:
        sections.append(launcher_section(plan, secret_files))
    summary = f"{len(site.tokens)} token(s) as digests in {tokens_path}"
    if secret_files:
        summary += "; secrets in " + ", ".join(str(path) for path in secret_files.values())
    summary += f"; {findings.skipped_count} item(s) not translated (listed above)"
    return render_config(args.file, docker, sections), summary


def launcher_defaults_note() -> str:
    """Said when there is no docker command: `airgate run` would start vLLM from the defaults."""
    defaults = LauncherSettings()
    return ("note: no --docker-command, so [launcher] keeps its defaults (runtime "
            f"{defaults.runtime}, image {defaults.image}, model {defaults.model}, gpus "
            f"{defaults.gpus}, tensor_parallel_size {defaults.tensor_parallel_size}), not "
            "necessarily your vLLM: before `airgate run`, import again with --docker-command FILE "
            "holding the guide's `docker run` line, or add a [launcher] section with your "
            "values")


def import_main(args: argparse.Namespace) -> int:
    findings = Findings()
    try:
        config, summary = run_import(args, findings)
    except (ImportFailure, OSError) as error:
        for item in findings.in_input_order():
            print(item.render(), file=sys.stderr)
        fix = "" if isinstance(error, ImportFailure) else (
            ": check that the tokens file's directory is writable, or pass --tokens-file PATH")
        print(f"airgate import-nginx: {error}{fix}", file=sys.stderr)
        return 2
    sys.stdout.write(config)
    for item in findings.in_input_order():
        print(item.render(), file=sys.stderr)
    if args.docker_command is None:
        print(f"airgate import-nginx: {launcher_defaults_note()}", file=sys.stderr)
    print(f"airgate import-nginx: {summary}", file=sys.stderr)
    return 0
