"""What both servers do, independent of the wire: the HTTPS and TCP servers are adapters.

Requests arrive here already parsed; this module checks tokens, validates arguments,
streams bodies to and from storage (whose blocking calls run in worker threads), and
raises StorageError with a wire error code on every failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import read_token
from ._storage import ObjectRecord, StorageError, StripeStore

__all__ = ["ServerLimits", "StorageService", "TokenChecker"]

# Bytes handed to a worker thread at once: large enough that thread hand-offs cost
# nothing next to the disk write, small enough to keep memory flat.
IO_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Time-outs and sizes that bound what a client can make a server do."""

    #: Seconds for a new connection to finish TLS and authenticate.
    handshake_timeout: float = 10.0
    #: Seconds a connection may sit idle between requests, or stall inside one.
    idle_timeout: float = 60.0
    #: Open connections per server; more are refused at once.
    max_connections: int = 256
    #: Free disk bytes a server keeps back (a stripe that would eat into them is refused).
    reserve_bytes: int = 0


class TokenChecker:
    """Accepts the bearer token in a token file, comparing hashes in constant time."""

    def __init__(self, token_file: Path) -> None:
        self._digest = hashlib.sha256(read_token(token_file).encode()).digest()

    def accepts(self, token: str | None) -> bool:
        if not token:
            return False
        offered = hashlib.sha256(token.encode("utf-8", "replace")).digest()
        return hmac.compare_digest(offered, self._digest)


class StorageService:
    def __init__(self, store: StripeStore) -> None:
        self.store = store

    async def put_stripe(
        self, object_id: str, version_id: str, length: object, body: AsyncIterator[bytes]
    ) -> tuple[int, str]:
        """Receive a stripe of exactly ``length`` bytes; return (length, sha256)."""
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise StorageError("bad_request", "length must be a whole number of bytes")
        upload = await asyncio.to_thread(self.store.begin_stripe, object_id, version_id, length)
        try:
            batch: list[bytes] = []
            batched = 0
            async for piece in body:
                batch.append(piece)
                batched += len(piece)
                if batched >= IO_BATCH_BYTES:
                    await asyncio.to_thread(_write_all, upload, batch)
                    batch, batched = [], 0
            if batch:
                await asyncio.to_thread(_write_all, upload, batch)
            digest = await asyncio.to_thread(upload.finish)
        except BaseException:
            await asyncio.to_thread(upload.abort)
            raise
        return length, digest

    async def open_stripe(
        self, object_id: str, version_id: str
    ) -> tuple[int, AsyncIterator[bytes]]:
        """Open a stripe for reading; return its length and an iterator over its bytes."""
        f, length = await asyncio.to_thread(self.store.open_stripe, object_id, version_id)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        data = await asyncio.to_thread(f.read, IO_BATCH_BYTES)
                    except OSError as exc:  # a failing disk: say so rather than just hang up
                        raise StorageError("internal", f"cannot read the stripe: {exc}") from exc
                    if not data:
                        return
                    yield data
            finally:
                f.close()

        return length, chunks()

    async def commit(self, object_id: str, fields: dict[str, Any]) -> None:
        record = ObjectRecord.from_json(fields)
        await asyncio.to_thread(self.store.commit, object_id, record)

    async def get_record(self, object_id: str) -> ObjectRecord:
        return await asyncio.to_thread(self.store.get_record, object_id)

    async def delete(self, object_id: str) -> None:
        await asyncio.to_thread(self.store.delete, object_id)

    async def list_lines(self) -> AsyncIterator[bytes]:
        """The committed records as NDJSON, a batch of lines at a time."""
        records = self.store.list_records()
        while True:
            batch = await asyncio.to_thread(_next_lines, records, 256)
            if not batch:
                return
            yield batch


def _write_all(upload: Any, pieces: list[bytes]) -> None:
    for piece in pieces:
        upload.write(piece)


def _next_lines(records: Iterator[tuple[str, ObjectRecord]], count: int) -> bytes:
    lines = []
    for object_id, record in records:
        lines.append(json.dumps({"object_id": object_id, **record.to_json()}))
        if len(lines) >= count:
            break
    return "".join(line + "\n" for line in lines).encode()
