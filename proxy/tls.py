"""TLS server contexts: TLS 1.2 and newer, certificate chain and key from files.

A context is built whole before it is used, so a reload that fails (a half-written renewal, a key
that does not match) leaves the running context untouched.
"""

from __future__ import annotations

import ssl

from proxy.settings import ListenSettings


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message names the file and the fix."""


def build_server_context(listen: ListenSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # HTTP/1.1 only: the forwarding core speaks HTTP/1.1 (as does Kibana's connector).
    context.set_alpn_protocols(["http/1.1"])
    # Session tickets and renegotiation add nothing for a handful of long-lived clients.
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    for label, path in (("listen.cert", listen.cert), ("listen.key", listen.key)):
        problem = _unreadable(label, path)
        if problem:
            raise TLSConfigError(problem)
    _load_chain(context, listen)
    if listen.client_ca:
        _load_client_ca(context, listen.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_problems(listen: ListenSettings) -> list[str]:
    """Every problem with the listener's files at once, where start-up stops at the first
    (`airgate check`): each unreadable file, a certificate and key that do not load or match,
    a client CA that does not load."""
    found = [problem for problem in (_unreadable("listen.cert", listen.cert),
                                     _unreadable("listen.key", listen.key)) if problem]
    if not found:
        try:
            _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), listen)
        except TLSConfigError as error:
            found.append(str(error))
    if listen.client_ca:
        try:
            _load_client_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), listen.client_ca)
        except TLSConfigError as error:
            found.append(str(error))
    return found


def _unreadable(label: str, path: str) -> str | None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        return (f"{label} = {path!r} cannot be read ({error.strerror}); point it at the PEM file "
                "(e.g. Let's Encrypt's fullchain.pem / privkey.pem) and make it readable by "
                "airgate")
    return None


def _load_chain(context: ssl.SSLContext, listen: ListenSettings) -> None:
    try:
        context.load_cert_chain(listen.cert, listen.key)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error):
            raise TLSConfigError(
                f"listen.key {listen.key!r} does not match the certificate in listen.cert "
                f"{listen.cert!r}: use the key the certificate was issued for"
            ) from error
        raise TLSConfigError(
            f"cannot load listen.cert {listen.cert!r} / listen.key {listen.key!r}: "
            f"{error.reason or error}; both must be PEM (certificate chain first, then an "
            "unencrypted private key)"
        ) from error


def _load_client_ca(context: ssl.SSLContext, client_ca: str) -> None:
    try:
        context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as error:
        raise TLSConfigError(
            f"listen.client_ca {client_ca!r} cannot be loaded: {error}; "
            "give a PEM bundle of the CA that signs client certificates"
        ) from error
