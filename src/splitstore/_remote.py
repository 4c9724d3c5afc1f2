"""What the client needs from a server, whatever the wire: one interface, two adapters.

``HttpsRemote`` and ``TcpRemote`` implement ``Remote``; the client core never knows
which one it talks to. Both translate wire error codes with ``raise_for_code`` so that a
refusal reads the same whichever server sent it.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, Protocol

import orjson

from ._digest import is_new_digest
from ._errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    QuotaExceededError,
    ServerError,
    ServerUnavailableError,
    SplitStoreError,
    StorageFullError,
    TLSVerificationError,
)
from ._storage import MAX_RECORD_BYTES, ObjectRecord, StorageError
from ._tls import describe_ssl_error, find_ssl_error

__all__ = [
    "ListingParser",
    "Remote",
    "StripeReader",
    "connection_error",
    "error_for_code",
    "http_reply",
    "parse_record",
    "parse_reply",
    "raise_for_code",
    "read_commit_results",
    "read_put_stripes_reply",
    "read_record_lines",
    "record_lines_body",
    "server_text",
    "split_stripes",
    "stripe_index",
    "stripe_keys",
    "upload_digest",
    "why_unreachable",
]

# One listing line is an object id and a record.
MAX_LISTING_LINE = 2 * MAX_RECORD_BYTES


class StripeReader(Protocol):
    """A stripe being downloaded."""

    #: The length the server announced.
    length: int

    async def read(self, n: int) -> bytes | memoryview:
        """Return exactly ``n`` bytes, or fewer only where the stream ended."""


class Remote(Protocol):
    #: How messages name this server, e.g. "https server at 127.0.0.1:7443".
    label: str
    #: The server's kind as the manifest names it ("https" or "tcp").
    kind: str

    async def ping(self) -> None: ...
    async def put_stripe(
        self, object_id: str, version_id: str, length: int, body: AsyncIterator[bytes]
    ) -> str:
        """Upload a stripe; return the digest the server computed (``_digest``)."""

    def get_stripe(
        self, object_id: str, version_id: str, *, expected_length: int | None = None
    ) -> AbstractAsyncContextManager[StripeReader]:
        """Download a stripe; ``expected_length`` (the manifest's) lets a small one be
        batched with others (``CoalescingRemote``); the adapters need no such hint."""

    async def commit(self, object_id: str, record: ObjectRecord) -> None: ...
    async def get_record(self, object_id: str) -> ObjectRecord: ...
    def list_records(self) -> AsyncIterator[tuple[str, ObjectRecord]]: ...
    async def delete(self, object_id: str) -> None: ...
    async def close(self) -> None: ...

    # Batches of small items (docs/protocol.md, "Batches"): each as its single operation.
    async def put_stripes(self, stripes: Sequence[tuple[str, str, bytes]]) -> list[str]:
        """Upload (object_id, version_id, bytes) stripes; their digests as the server saw."""

    async def get_stripes(
        self, stripes: Sequence[tuple[str, str]]
    ) -> list[bytes | SplitStoreError | None]:
        """Each stripe's bytes, its error, or None: too large for a batch, ask alone."""

    async def commit_records(
        self, records: Sequence[tuple[str, ObjectRecord]]
    ) -> list[SplitStoreError | None]:
        """Commit each (object_id, record); each one's error, or None where it committed."""

    async def get_records(self, object_ids: Sequence[str]) -> list[ObjectRecord | SplitStoreError]:
        """Each object's current record, or its error (NotFoundError where it has none)."""


def raise_for_code(code: str, message: str, label: str) -> NoReturn:
    """Raise the SplitStoreError for a server's error code."""
    raise error_for_code(code, message, label)


SERVER_TEXT_CHARS = 300


def server_text(text: str) -> str:
    """A server's own words as one safe line: every character that is not printable (line
    breaks, escape sequences, bidirectional marks, lone surrogates) escaped, and at most
    SERVER_TEXT_CHARS characters of it (a server may send kilobytes)."""
    cut = text[:SERVER_TEXT_CHARS]
    shown = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in cut)
    return shown + ("..." if len(text) > SERVER_TEXT_CHARS else "")


def error_for_code(code: str, message: str, label: str) -> SplitStoreError:
    """The SplitStoreError for a server's error code (its message and code made safe)."""
    code, message = server_text(code), server_text(message)
    if code == "unauthorized":
        return AuthenticationError(f"the {label} refused the access token", server=label)
    if code == "not_found":
        return NotFoundError(f"the {label} has no such object")
    if code == "conflict":
        return ConflictError(f"the {label} refused: {message}", server=label)
    if code == "insufficient_storage":
        return StorageFullError(f"the {label} is out of space: {message}", server=label)
    if code == "quota_exceeded":
        return QuotaExceededError(f"the {label}: {message}", server=label)
    return ServerError(f"the {label} failed: {message} ({code})", server=label)


def parse_reply(raw: bytes, label: str) -> dict[str, Any]:
    """A server's JSON reply, which must be an object."""
    try:
        doc = orjson.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"the {label} sent a reply that is not JSON", server=label) from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"the {label} sent a reply that is not a JSON object", server=label)
    return doc


# TLS errors that only say the connection ended.
_CLOSED_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def why_unreachable(exc: BaseException) -> str | None:
    """Why no connection could be opened at all (the host name does not resolve, nothing
    listens on the port), in words; None for any other failure."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve its host name ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    return None


def connection_error(exc: OSError, label: str, *, in_body: bool = False) -> SplitStoreError:
    """The SplitStoreError for a socket or TLS failure in talking to the server ``label``.
    A TLS error is taken for one in setting up TLS (the certificate, the handshake)
    unless ``in_body``: in the middle of a body it is the connection failing."""
    cert = find_ssl_error(exc)
    if isinstance(cert, _CLOSED_TLS):  # the peer went away: nothing about trust
        where = "mid-transfer" if in_body else "during the TLS handshake"
        return ServerUnavailableError(f"the {label} closed the connection {where}", server=label)
    if cert is not None and not in_body:
        return TLSVerificationError(
            f"cannot trust the {label}: {describe_ssl_error(cert)}", server=label
        )
    unreachable = why_unreachable(exc)
    if unreachable is not None:
        return ServerUnavailableError(f"cannot connect to the {label}: {unreachable}", server=label)
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return ServerUnavailableError(f"the connection to the {label} failed: {reason}", server=label)


def http_reply(status: int, raw: bytes, label: str) -> dict[str, Any]:
    """The HTTPS server's JSON reply of status ``status``; its error raised for 4xx/5xx."""
    if status >= 400:
        try:
            err = orjson.loads(raw)["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "internal", f"HTTP {status}"
        raise_for_code(code, message, label)
    return parse_reply(raw, label)


def parse_record(doc: Any, label: str) -> ObjectRecord:
    """A record from a server's reply, validated as strictly as the servers validate it."""
    try:
        return ObjectRecord.from_json(doc)
    except StorageError as exc:
        raise ProtocolError(
            f"the {label} sent a malformed record: {exc.message}", server=label
        ) from exc


class ListingParser:
    """The records of a server's NDJSON listing, fed its bytes as they arrive.

    Cutting whole pieces into lines here costs far less than a readline per record.
    """

    def __init__(self, label: str) -> None:
        self._label = label
        self._pending = b""

    def feed(self, piece: bytes) -> list[tuple[str, ObjectRecord]]:
        *lines, self._pending = (self._pending + piece).split(b"\n")
        if len(self._pending) > MAX_LISTING_LINE:
            self._bad()
        out = []
        for line in lines:
            if len(line) > MAX_LISTING_LINE:
                self._bad()
            doc = parse_reply(line, self._label)
            out.append((str(doc.get("object_id")), parse_record(doc, self._label)))
        return out

    def close(self) -> None:
        """The listing ended: it must have ended with a whole line."""
        if self._pending:
            self._bad()

    def _bad(self) -> NoReturn:
        raise ProtocolError(f"the {self._label} sent a bad listing", server=self._label)


# -- batch replies, as strictly checked as single ones ----------------------------------


def stripe_index(stripes: Sequence[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    return [{"object_id": o, "version_id": v, "length": len(d)} for o, v, d in stripes]


def stripe_keys(stripes: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"object_id": o, "version_id": v} for o, v in stripes]


def record_lines_body(records: Sequence[tuple[str, ObjectRecord]]) -> bytes:
    return b"".join(orjson.dumps({"object_id": o, **r.to_json()}) + b"\n" for o, r in records)


def _items(reply: dict[str, Any], key: str, n: int, label: str) -> list[dict[str, Any]]:
    items = reply.get(key)
    if (
        not isinstance(items, list)
        or len(items) != n
        or not all(isinstance(i, dict) for i in items)
    ):
        raise ProtocolError(f"the {label} sent a malformed batch reply", server=label)
    return items


def _item_error(item: dict[str, Any], label: str) -> SplitStoreError | None:
    error = item.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        raise ProtocolError(f"the {label} sent a malformed batch reply", server=label)
    return error_for_code(str(error.get("code")), str(error.get("message")), label)


def read_put_stripes_reply(reply: dict[str, Any], lengths: Sequence[int], label: str) -> list[str]:
    items = _items(reply, "stripes", len(lengths), label)
    return [upload_digest(item, n, label) for item, n in zip(items, lengths, strict=True)]


def upload_digest(reply: dict[str, Any], length: int, label: str) -> str:
    """The digest a server's answer to an upload gives of what it stored."""
    digest = reply.get("digest")
    if digest is None and "sha256" in reply:
        raise ProtocolError(
            f"the {label} runs an older splitstore than this client (it answered an upload "
            "with a SHA-256, not a stripe digest): upgrade the server",
            server=label,
        )
    # What a server makes of a new stripe is always BLAKE3 (sha256: only names old data).
    if reply.get("length") != length or not is_new_digest(digest):
        raise ProtocolError(f"the {label} sent a malformed upload reply", server=label)
    return str(digest)


def read_commit_results(reply: dict[str, Any], n: int, label: str) -> list[SplitStoreError | None]:
    results: list[SplitStoreError | None] = []
    for item in _items(reply, "results", n, label):
        error = _item_error(item, label)
        if error is None and item.get("status") != "ok":
            raise ProtocolError(f"the {label} sent a malformed batch reply", server=label)
        results.append(error)
    return results


def read_record_lines(
    raw: bytes, object_ids: Sequence[str], label: str
) -> list[ObjectRecord | SplitStoreError]:
    """A get_records body: one line per asked id, in order."""
    lines = raw.split(b"\n")
    if lines.pop() != b"" or len(lines) != len(object_ids):
        raise ProtocolError(f"the {label} sent a malformed batch of records", server=label)
    out: list[ObjectRecord | SplitStoreError] = []
    for line, object_id in zip(lines, object_ids, strict=True):
        doc = parse_reply(line, label)
        if doc.get("object_id") != object_id:
            raise ProtocolError(f"the {label} answered for another object", server=label)
        error = _item_error(doc, label)
        out.append(error if error is not None else parse_record(doc, label))
    return out


def split_stripes(
    reply: dict[str, Any], body: bytes, n: int, label: str
) -> list[bytes | SplitStoreError | None]:
    """A get_stripes answer: each stripe's bytes (cut from ``body``), error, or None."""
    out: list[bytes | SplitStoreError | None] = []
    done = 0
    for item in _items(reply, "stripes", n, label):
        error = _item_error(item, label)
        if error is not None:
            too_large = isinstance(item["error"], dict) and item["error"].get("code") == "too_large"
            out.append(None if too_large else error)
            continue
        length = item.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ProtocolError(f"the {label} sent a bad stripe length", server=label)
        if done + length > len(body):
            break
        out.append(body[done : done + length])
        done += length
    if len(out) != n or done != len(body):
        raise ProtocolError(f"the {label}'s batch of stripes does not add up", server=label)
    return out
