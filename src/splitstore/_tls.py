"""TLS contexts for the servers and the client, and plain-language TLS failure messages.

Both sides require TLS 1.2 or newer. The client always checks the certificate chain and
the host name; with a ``ca_file`` it trusts only that CA (the one ``splitstore init``
made), so a certificate from any other CA is refused even if the system would accept it.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from ._errors import ConfigError

__all__ = [
    "client_ssl_context",
    "describe_ssl_error",
    "find_ssl_error",
    "server_ssl_context",
]

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL's X509_V_ERR_* codes, as found in SSLCertVerificationError.verify_code.
_UNTRUSTED_ISSUER = "its certificate is not signed by a CA this client trusts (see ca_file)"
_VERIFY_TEXT: dict[int, str] = {
    2: _UNTRUSTED_ISSUER,  # unable to get issuer certificate
    7: "its certificate has an invalid signature",
    9: "its certificate is not valid yet (check both machines' clocks)",
    10: "its certificate has expired",
    18: "its certificate is self-signed and not trusted",
    19: "its certificate chain ends in a CA this client does not trust (see ca_file)",
    20: _UNTRUSTED_ISSUER,  # unable to get local issuer certificate
    21: _UNTRUSTED_ISSUER,  # unable to verify the first certificate
    23: "its certificate has been revoked",
    24: "its certificate is signed by a certificate that is not a CA",
    25: "its certificate chain is longer than its CA allows",
    26: "its certificate is not meant for a TLS server",
    28: "its certificate is rejected by the trusted CA's settings",
}
_HOSTNAME_MISMATCH = 62
_IP_ADDRESS_MISMATCH = 64
# Python words name mismatches as "... certificate is not valid for 'NAME'."
_MISMATCH_NAME = re.compile(r"not valid for '(.*)'")

# ssl.SSLError.reason values for failures that are not about the certificate.
_REASON_TEXT: dict[str, str] = {
    "WRONG_VERSION_NUMBER": "it did not answer with TLS (is TLS turned on for that server?)",
    "RECORD_LAYER_FAILURE": "it did not answer with TLS (is TLS turned on for that server?)",
    "UNSUPPORTED_PROTOCOL": "it does not offer TLS 1.2 or newer",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it does not accept TLS 1.2 or newer",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version is allowed by both sides",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the TLS handshake failed (no cipher or version in common)",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust this client's certificate",
    "UNEXPECTED_EOF_WHILE_READING": "it closed the connection during the TLS handshake",
}


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side context presenting ``cert_file`` (the chain, leaf first) and its key.

    Raises ConfigError naming the file at fault rather than OpenSSL's "PEM lib".
    """
    _check_readable(cert_file, "certificate file")
    _check_readable(key_file, "key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION

    def refuse_password() -> NoReturn:
        # Without a callback OpenSSL would prompt on the terminal and hang a server.
        raise ConfigError(f"key file {key_file} is encrypted; the server needs an unencrypted key")

    try:
        context.load_cert_chain(str(cert_file), str(key_file), password=refuse_password)
    except OSError as exc:
        if not isinstance(exc, ssl.SSLError):
            raise ConfigError(
                f"cannot read certificate {cert_file} or key {key_file}: {_os_text(exc)}"
            ) from exc
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"key file {key_file} does not belong to certificate {cert_file}"
            ) from exc
        raise ConfigError(
            f"certificate {cert_file} or key {key_file} is not valid PEM ({_ssl_reason(exc)})"
        ) from exc
    return context


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client-side context that checks the chain and the host name.

    With ``ca_file``, only the certificates in it are trusted; without it, the system's.
    """
    if ca_file is None:
        context = ssl.create_default_context()
    else:
        _check_readable(ca_file, "CA file")
        # PROTOCOL_TLS_CLIENT already requires a valid chain and a matching host name;
        # no load_default_certs(), so nothing but ca_file is trusted.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                raise ConfigError(
                    f"CA file {ca_file} holds no valid PEM certificate ({_ssl_reason(exc)})"
                ) from exc
            raise ConfigError(f"cannot read CA file {ca_file}: {_os_text(exc)}") from exc
    context.minimum_version = MINIMUM_TLS_VERSION
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind ``exc`` (itself, a cause, or one wrapped by aiohttp), if any.

    A certificate verification error wins over other ssl errors, since it says the most.
    """
    best: ssl.SSLError | None = None
    best_score = 0
    for candidate in _related_errors(exc):
        score = _detail_score(candidate)
        if isinstance(candidate, ssl.SSLError) and score > best_score:
            best, best_score = candidate, score
    return best


def describe_ssl_error(exc: BaseException) -> str:
    """Short text for why a TLS connection failed, to follow "cannot trust the ... at X: ".

    For example "its certificate is not signed by a CA this client trusts (see ca_file)"
    or "its certificate does not match the host name 'localhost'".
    """
    error = find_ssl_error(exc)
    if error is None:
        return str(exc) or type(exc).__name__
    if isinstance(error, ssl.SSLCertVerificationError):
        return _describe_verification(error)
    if isinstance(error, ssl.SSLEOFError):
        return "it closed the connection during the TLS handshake"
    # Errors built in Python (as aiohttp does) have no ``reason`` attribute at all.
    reason = getattr(error, "reason", None)
    if reason in _REASON_TEXT:
        return _REASON_TEXT[reason]
    return f"TLS failed: {_ssl_reason(error)}"


def _describe_verification(error: ssl.SSLCertVerificationError) -> str:
    code = getattr(error, "verify_code", None)
    message = getattr(error, "verify_message", None) or ""
    if code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
        # One wording for names and addresses: both are "the host" in the config.
        match = _MISMATCH_NAME.search(message)
        name = f" {match.group(1)!r}" if match else ""
        return f"its certificate does not match the host name{name}"
    if code in _VERIFY_TEXT:
        return _VERIFY_TEXT[code]
    return f"certificate verify failed: {message or _ssl_reason(error)}"


def _detail_score(exc: BaseException) -> int:
    """How much an error can tell: aiohttp's wrappers subclass the ssl errors but carry
    no verify_code or reason, so the originals they wrap rank higher."""
    if not isinstance(exc, ssl.SSLError):
        return 0
    if getattr(exc, "verify_code", None) is not None:
        return 3
    if getattr(exc, "reason", None) is not None:
        return 2
    return 1


def _related_errors(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: aiohttp's attributes, then causes and contexts."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for attribute in ("certificate_error", "os_error"):
            inner = getattr(current, attribute, None)
            if isinstance(inner, BaseException):
                pending.append(inner)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None:
            pending.append(current.__context__)


def _check_readable(path: Path, what: str) -> None:
    """Raise ConfigError naming ``path`` unless it is a file we can open."""
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {_os_text(exc)}") from exc


def _os_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.lower().replace("_", " ")
    return exc.strerror or str(exc) or type(exc).__name__
