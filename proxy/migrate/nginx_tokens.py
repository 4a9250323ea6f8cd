"""The bearer-token check of an Nginx site (`if (...) { return 401; }`, literal or through a
`map` of $http_authorization), turned into tokens-file entries; the base class of
NginxTranslator.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from proxy.migrate.common import Node
from proxy.migrate.findings import Findings, looks_like_placeholder
from proxy.migrate.models import MapBlock, SiteConfig, TokenLine
from proxy.migrate.nginx_nodes import is_deny_block, real_nodes, token_name
from proxy.migrate.nginx_reasons import reason_for


class NginxTokenCheck:
    """The token-check half of NginxTranslator, and its `at`/`skip` reporting helpers."""

    path: Path
    findings: Findings
    tokens_file: Path
    site: SiteConfig
    maps: dict[str, MapBlock]
    used_maps: set[str]
    token_names: set[str]

    def at(self, node: Node) -> str:
        return f"{self.path}:{node['line']}"

    def skip(self, node: Node, reason: str | None = None) -> None:
        self.findings.skipped(self.at(node), node["directive"], reason or reason_for(
            node["directive"]))

    # ---- the bearer-token check

    def _if(self, node: Node, context: str) -> None:
        block: list[Node] = node.get("block", [])
        if not is_deny_block(block):
            self.skip(node, "only token checks of the form `if (...) { return 401; }` are "
                            "translated")
            return
        for inner in real_nodes(block):
            if inner["directive"] != "return":
                self.skip(inner, "inside the token check: airgate answers 401 with its own "
                                 "JSON body")
        args: list[str] = node["args"]
        if len(args) == 3 and args[0].lower() == "$http_authorization" and args[1] == "!=":
            self._literal_token(node, args[2])
        elif (condition := self._map_condition(args)) is not None:
            self._map_tokens(node, *condition)
        else:
            self.skip(node, "the condition is not `$http_authorization != \"Bearer ...\"` nor a "
                            "check of a map of $http_authorization; add tokens with "
                            "`airgate token new`")

    def _map_condition(self, args: list[str]) -> tuple[str, Callable[[str], bool]] | None:
        """`!$ok`, `$ok = 0`, `$ok = ""` or `$ok != 1`: (variable, which map values allow)."""
        if len(args) == 1 and args[0].startswith("!$") and args[0][1:] in self.maps:
            return args[0][1:], lambda value: value not in {"", "0"}
        if len(args) == 3 and args[0] in self.maps:
            variable, operator, operand = args
            if operator == "=" and operand in {"", "0"}:
                return variable, lambda value: value not in {"", "0"}
            if operator == "!=":
                return variable, lambda value: value == operand
        return None

    def _literal_token(self, node: Node, expected: str) -> None:
        scheme, _, secret = expected.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            self.skip(node, "the compared value is not \"Bearer <token>\"")
            return
        self._add_token(secret.strip(), token_name("kibana", self.token_names, "kibana"),
                        self.at(node), "if")

    def _map_tokens(self, node: Node, variable: str, allowed: Callable[[str], bool]) -> None:
        mapping = self.maps[variable]
        self.used_maps.add(variable)
        if allowed(mapping.default):
            self.findings.warn(mapping.where, "map", "its default lets any Authorization "
                               "header through; airgate requires one of the listed tokens")
        for number, (key, value, comment, where) in enumerate(mapping.entries, 1):
            if not allowed(value):
                continue
            scheme, _, secret = key.partition(" ")
            if key.startswith("~") or scheme.lower() != "bearer" or not secret.strip():
                self.findings.skipped(where, "map", "only literal \"Bearer <token>\" keys become "
                                      "tokens (regular expressions cannot be turned into digests)")
                continue
            name = token_name(comment, self.token_names, f"token{number}")
            self._add_token(secret.strip(), name, where, "map")

    def _add_token(self, secret: str, name: str, where: str, subject: str) -> None:
        self.site.tokens.append(TokenLine(name, secret, where))
        if looks_like_placeholder(secret):
            self.findings.warn(where, subject, f"token {name!r} looks like the guide's "
                               "placeholder; it was imported anyway (as a digest), so Kibana "
                               "keeps working until you replace it: delete its line from the "
                               f"tokens file and run `airgate token new {name} --file "
                               f"{self.tokens_file}`")
        elif len(secret) < 16:
            self.findings.warn(where, subject, f"token {name!r} is shorter than 16 characters; "
                               "replace it with one from `airgate token new`")

    def _report_unused_maps(self) -> None:
        for variable, mapping in self.maps.items():
            if variable not in self.used_maps:
                self.findings.skipped(mapping.where, "map", f"{variable} is not checked by any "
                                      "`if (...) { return 401; }`, so its tokens were not imported")
