"""What the client needs from a server, whatever the wire: one interface, two adapters.

``HttpsRemote`` and ``TcpRemote`` implement ``Remote``; the client core never knows
which one it talks to. Both translate wire error codes with ``raise_for_code`` so that a
refusal reads the same whichever server sent it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn, Protocol

from ._errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    QuotaExceededError,
    ServerError,
    StorageFullError,
)
from ._storage import ObjectRecord, StorageError

__all__ = ["Remote", "StripeReader", "parse_record", "parse_reply", "raise_for_code"]


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
        doc = json.loads(raw)
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
