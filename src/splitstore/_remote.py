"""What the client needs from a server, whatever the wire: one interface, two adapters.

``HttpsRemote`` and ``TcpRemote`` implement ``Remote``; the client core never knows
which one it talks to. Both translate wire error codes with ``raise_for_code`` so that a
refusal reads the same whichever server sent it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import NoReturn, Protocol

from ._errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ServerError,
    StorageFullError,
)
from ._storage import ObjectRecord

__all__ = ["Remote", "StripeReader", "raise_for_code"]


class StripeReader(Protocol):
    """A stripe being downloaded."""

    #: The length the server announced.
    length: int

    async def read(self, n: int) -> bytes:
        """Return exactly ``n`` bytes, or fewer only where the stream ended."""
        ...


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
        ...

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
    raise ServerError(f"the {label} failed: {message} ({code})", server=label)
