"""What the client needs from a server, whatever the wire: one interface, two adapters.

``HttpsRemote`` and ``TcpRemote`` implement ``Remote``; the client core never knows
which one it talks to. Both translate wire error codes with ``raise_for_code`` so that a
refusal reads the same whichever server sent it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, Protocol

import orjson

from ._errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    QuotaExceededError,
    ServerError,
    StorageFullError,
)
from ._storage import MAX_RECORD_BYTES, ObjectRecord, StorageError

__all__ = [
    "ListingParser",
    "Remote",
    "StripeReader",
    "parse_record",
    "parse_reply",
    "raise_for_code",
]

# One listing line is an object id and a record.
MAX_LISTING_LINE = 2 * MAX_RECORD_BYTES


class StripeReader(Protocol):
    """A stripe being downloaded."""

    #: The length the server announced.
    length: int

    async def read(self, n: int) -> bytes:
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
        """Upload a stripe; return the SHA-256 the server computed."""

    def get_stripe(
        self, object_id: str, version_id: str
    ) -> AbstractAsyncContextManager[StripeReader]: ...
    async def commit(self, object_id: str, record: ObjectRecord) -> None: ...
    async def get_record(self, object_id: str) -> ObjectRecord: ...
    def list_records(self) -> AsyncIterator[tuple[str, ObjectRecord]]: ...
    async def delete(self, object_id: str) -> None: ...
    async def close(self) -> None: ...


def raise_for_code(code: str, message: str, label: str) -> NoReturn:
    """Raise the SplitStoreError for a server's error code."""
    if code == "unauthorized":
        raise AuthenticationError(f"the {label} refused the access token", server=label)
    if code == "not_found":
        raise NotFoundError(f"the {label} has no such object")
    if code == "conflict":
        raise ConflictError(f"the {label} refused: {message}", server=label)
    if code == "insufficient_storage":
        raise StorageFullError(f"the {label} is out of space: {message}", server=label)
    if code == "quota_exceeded":
        raise QuotaExceededError(f"the {label}: {message}", server=label)
    raise ServerError(f"the {label} failed: {message} ({code})", server=label)


def parse_reply(raw: bytes, label: str) -> dict[str, Any]:
    """A server's JSON reply, which must be an object."""
    try:
        doc = orjson.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"the {label} sent a reply that is not JSON", server=label) from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"the {label} sent a reply that is not a JSON object", server=label)
    return doc


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
