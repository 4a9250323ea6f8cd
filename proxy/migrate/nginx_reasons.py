"""Why an Nginx directive was not translated: the reason printed for each directive that
has no airgate counterpart.
"""

from __future__ import annotations

# Directives with no airgate counterpart, and why; anything not listed gets a generic reason.
NOT_TRANSLATED: dict[str, str] = {
    "add_header": "airgate sets its own response headers",
    "proxy_set_header": "airgate forwards request headers itself and has no header rewriting",
    "proxy_hide_header": "airgate has no header rewriting",
    "proxy_pass_header": "airgate has no header rewriting",
    "proxy_redirect": "vLLM sends no redirects to rewrite",
    "proxy_send_timeout": "airgate has no separate send timeout (see [upstream] read_timeout)",
    "proxy_cache": "airgate caches nothing: every completion is generated afresh",
    "gzip": "airgate does not compress responses",
    "ssl_ciphers": "airgate uses Python's TLS 1.2+ cipher defaults",
    "ssl_prefer_server_ciphers": "airgate uses Python's TLS 1.2+ cipher defaults",
    "ssl_ecdh_curve": "airgate uses Python's TLS 1.2+ defaults",
    "ssl_dhparam": "airgate uses Python's TLS defaults (ECDHE key exchange needs no DH file)",
    "ssl_session_cache": "TLS session resumption is left to Python's ssl defaults",
    "ssl_session_timeout": "TLS session resumption is left to Python's ssl defaults",
    "ssl_session_tickets": "TLS session resumption is left to Python's ssl defaults",
    "ssl_stapling": "OCSP stapling is not offered",
    "ssl_stapling_verify": "OCSP stapling is not offered",
    "ssl_trusted_certificate": "OCSP stapling is not offered",
    "allow": "airgate does not filter client addresses; use the host firewall",
    "deny": "airgate does not filter client addresses; use the host firewall",
    "limit_req": "no per-address rate limit; see [auth] requests_per_minute and fail_limit",
    "limit_conn": "no per-address connection limit; see [auth] max_concurrent (per token)",
    "auth_basic": "Kibana's connector sends a bearer token; airgate checks [auth] tokens_file",
    "auth_basic_user_file": "Kibana's connector sends a bearer token; use [auth] tokens_file",
    "auth_request": "airgate checks bearer tokens itself ([auth] tokens_file)",
    "root": "airgate serves no files",
    "index": "airgate serves no files",
    "try_files": "airgate serves no files",
    "alias": "airgate serves no files",
    "error_page": "airgate answers errors with OpenAI-style JSON, which Kibana shows as is",
    "error_log": "airgate logs to standard error (the journal under systemd); see [log] level",
    "rewrite": "airgate forwards paths unchanged",
    "return": "only the redirect to HTTPS and the 401 of the token check are translated",
    "include": "not followed (import-nginx reads one file); inline what it includes, "
               "or run import-nginx on that file",
    "http2": "airgate speaks HTTP/1.1, which is what Kibana's connector uses",
    "large_client_header_buffers": "see [server] max_header_size",
    "client_body_timeout": "airgate bounds the request head only ([server] header_timeout)",
}
NOT_TRANSLATED_PREFIXES: dict[str, str] = {
    "proxy_ssl_": "airgate talks plain HTTP to vLLM on loopback",
    "proxy_cache": "airgate caches nothing",
    "gzip_": "airgate does not compress responses",
    "limit_": "no per-address limits; see [auth] requests_per_minute, max_concurrent, fail_limit",
}
GENERIC_REASON = "airgate has no setting for this"


def reason_for(directive: str) -> str:
    if directive in NOT_TRANSLATED:
        return NOT_TRANSLATED[directive]
    for prefix, reason in NOT_TRANSLATED_PREFIXES.items():
        if directive.startswith(prefix):
            return reason
    return GENERIC_REASON
