"""What both servers do, independent of the wire: the HTTPS and TCP servers are adapters.

Requests arrive here already parsed and authenticated to a tenant (``TenantRegistry``,
asked by the servers on every request). This module picks that tenant's store, enforces
its quota, validates arguments, streams bodies to and from storage (whose blocking calls
run in worker threads), and raises StorageError with a wire error code on every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar

import orjson

from . import _batch
from ._batch import StripeItem
from ._direct import DIRECT_BLOCK_BYTES, DirectReader
from ._storage import (
    MAX_STRIPE_BYTES,
    STRIPE_OVERHEAD_BYTES,
    ObjectRecord,
    StorageError,
    StripeStore,
    StripeUpload,
)
from ._syncing import SYNC_EVERY_BYTES
from ._tenants import Tenant
from ._threads import in_thread, in_thread_to_the_end, outlast

__all__ = ["ServerLimits", "StorageService", "TenantStores"]

_T = TypeVar("_T")

# Bytes read from a stripe at once, and handed on: one direct read's block.
IO_BATCH_BYTES = DIRECT_BLOCK_BYTES
# Bytes of a stripe being received handed to a worker thread at once: each hand-off wakes
# a thread and passes the GIL, so fewer of them count (4 MiB instead of 1 cut the
# servers' user CPU of a 512 MiB store by 10-15% and gave 5-9% more MB/s, alternating).
# An upload holds at most two batches (one written while the next arrives), each up to
# this plus one piece (a TCP frame is at most 1 MiB): about 10 MiB per connection.
WRITE_BATCH_BYTES = 4 * 1024 * 1024
# Uploaded pieces below this size are copied together into one buffer of their batch.
SMALL_PIECE_BYTES = 64 * 1024
# Stripes from this size on are read past the page cache: as large as the files that
# SyncingWriter writes past it, so a small stripe is read as it was written.
DIRECT_READ_MIN_BYTES = SYNC_EVERY_BYTES


# Listing lines handed over from the worker thread at once: fewer hand-offs, flat memory.
LISTING_BATCH_BYTES = 512 * 1024
# Listings read many small files, each read letting go of the GIL: two listings in two
# threads of one process (both servers in one, as the tests and the demo run them) spent
# most of their time handing the GIL back and forth, taking three times as long as one
# after the other. One thread for all listings of the process runs them in turn.
_LISTING_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitstore-listing")
# Clean-ups of failed uploads, held here so they run to their end however their caller ends.
_CLEANUPS: set[asyncio.Future[None]] = set()


@dataclass(frozen=True)
class ServerLimits:
    """Time-outs and sizes that bound what a client can make a server do."""

    #: Seconds for a new connection to finish TLS and authenticate.
    handshake_timeout: float = 10.0
    #: Seconds a connection may sit idle between requests, or stall inside one.
    idle_timeout: float = 60.0
    #: Open connections per server, counted from the TCP accept (before TLS); more are
    #: closed at once.
    max_connections: int = 256
    #: Open connections per client address (an IPv6 client per /64); more are closed at once.
    max_connections_per_client: int = 32
    #: Seconds an HTTPS client has to send a request's line and headers: from the end of
    #: the TLS handshake for the first request, from its first byte for later ones.
    header_timeout: float = 10.0
    #: Largest stripe a client may declare; a larger one is refused before any byte of it.
    max_stripe_bytes: int = MAX_STRIPE_BYTES
    #: Free disk bytes a server keeps back (a stripe that would eat into them is refused).
    reserve_bytes: int = 0


class TenantStores(Protocol):
    """Each tenant's own store (``DataFolder`` on local disk)."""

    def tenant(self, name: str) -> StripeStore:
        """The store of ``name``, opened (blocking) if it is not yet."""

    def opened(self, name: str) -> StripeStore | None:
        """The store of ``name`` if it is open already, without blocking."""


class StorageService:
    """The operations of both servers, each on behalf of one authenticated tenant.

    Quotas: a tenant's bytes on this server (``StripeStore.used_bytes``) plus the declared
    lengths of its uploads in flight may not go over its ``quota_bytes``. An upload is
    admitted or refused before any of its body is read, and counted as in flight until it
    ends, so parallel uploads cannot together squeeze past the quota.
    """

    def __init__(self, stores: TenantStores) -> None:
        self.stores = stores
        # Declared bytes of uploads in progress, per tenant. Only touched on the event
        # loop, so the check and the reservation in put_stripe are one step.
        self._in_flight: dict[str, int] = {}

    async def _store(self, tenant: Tenant) -> StripeStore:
        store = self.stores.opened(tenant.name)
        if store is None:  # first use since start: opening counts its bytes on disk
            store = await asyncio.to_thread(self.stores.tenant, tenant.name)
        return store

    def _admit(self, tenant: Tenant, store: StripeStore, more: int, what: str) -> None:
        """Refuse ``more`` bytes with ``quota_exceeded`` if they do not fit the quota."""
        quota = tenant.quota_bytes
        if not quota:
            return
        used = store.used_bytes() + self._in_flight.get(tenant.name, 0)
        if used + more > quota:
            raise StorageError(
                "quota_exceeded",
                f"tenant {tenant.name!r} would go over its quota: {what} needs {more:,} "
                f"bytes, and {used:,} of {quota:,} are used",
            )

    async def put_stripe(
        self,
        tenant: Tenant,
        object_id: str,
        version_id: str,
        length: object,
        body: AsyncIterator[bytes],
    ) -> tuple[int, str]:
        """Receive a stripe of exactly ``length`` bytes; return (length, digest)."""
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise StorageError("bad_request", "length must be a whole number of bytes")
        store = await self._store(tenant)
        claim = length + STRIPE_OVERHEAD_BYTES
        release = self._reserve(tenant, store, claim, "this stripe")
        try:
            return await self._receive(store, object_id, version_id, length, body)
        finally:
            release()

    def _reserve(
        self, tenant: Tenant, store: StripeStore, claim: int, what: str
    ) -> Callable[[], None]:
        """Admit ``claim`` bytes against the quota and count them as in flight until the
        returned function is called."""
        if claim <= 0:  # nothing to hold (a batch all of whose items were refused)
            return lambda: None
        self._admit(tenant, store, claim, what)
        self._in_flight[tenant.name] = self._in_flight.get(tenant.name, 0) + claim

        def release() -> None:
            left = self._in_flight[tenant.name] - claim
            if left:
                self._in_flight[tenant.name] = left
            else:
                del self._in_flight[tenant.name]

        return release

    async def put_stripes(
        self,
        tenant: Tenant,
        items: list[StripeItem],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> list[tuple[int, str]]:
        """Store a batch of stripes (their bytes back to back); each one's (length, digest).

        The batch is admitted against the quota as a whole before its body is read.
        """
        store = await self._store(tenant)
        claim = sum((item.length or 0) + STRIPE_OVERHEAD_BYTES for item in items)
        release = self._reserve(tenant, store, claim, f"this batch of {len(items)} stripes")
        try:
            body = await read_body()
        except BaseException:
            release()
            raise
        # One hop for the whole batch (it removes what it staged if it fails).
        digests = await _claimed_in_thread(release, _batch.write_stripes, store, items, body)
        return [(item.length or 0, d) for item, d in zip(items, digests, strict=True)]

    async def get_stripes(
        self, tenant: Tenant, items: list[StripeItem]
    ) -> tuple[list[dict[str, Any]], list[bytes]]:
        """A batch of stripes: each one's answer, and the bytes of those found."""
        store = await self._store(tenant)
        return await asyncio.to_thread(_batch.read_stripes, store, items)

    async def commit_records(
        self, tenant: Tenant, entries: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Commit each record of a batch as ``commit`` would; each one's answer, in order."""
        store = await self._store(tenant)
        records: list[tuple[str, ObjectRecord | StorageError]] = []
        admitted = 0
        for object_id, fields in entries:
            try:
                record = ObjectRecord.from_json(fields)
                size = len(json.dumps(record.to_json()))
                # Each record is admitted with those admitted before it counted in.
                self._admit(tenant, store, admitted + size, "this batch of records")
            except StorageError as exc:
                records.append((object_id, exc))
                continue
            admitted += size
            records.append((object_id, record))
        # Counted as in flight until written: commits running at once are each admitted
        # with the others' records counted in.
        release = self._reserve(tenant, store, admitted, "this batch of records")
        return await _claimed_in_thread(release, _batch.commit_each, store, records)

    async def get_records(self, tenant: Tenant, object_ids: list[str]) -> bytes:
        """The current records of a batch of objects as NDJSON, one line per id."""
        store = await self._store(tenant)
        return await asyncio.to_thread(_batch.record_lines, store, object_ids)

    async def _receive(
        self,
        store: StripeStore,
        object_id: str,
        version_id: str,
        length: int,
        body: AsyncIterator[bytes],
    ) -> tuple[int, str]:
        upload = await _begin(store, object_id, version_id, length)
        # One batch is written (and hashed) in a worker thread while the next one arrives,
        # so the network and the disk work at the same time.
        writing: asyncio.Future[None] | None = None
        finishing: asyncio.Future[str] | None = None
        try:
            batch: list[bytes | bytearray] = []
            batched = received = 0
            async for piece in body:
                # Checked here as it arrives, not only when its batch is written: a client
                # sending more than it declared is refused before more of it is held.
                received += len(piece)
                if received > length:
                    raise StorageError("bad_request", f"more than the declared {length} bytes sent")
                _add_to_batch(batch, piece)
                batched += len(piece)
                if batched >= WRITE_BATCH_BYTES:
                    if writing is not None:
                        await asyncio.shield(writing)
                    writing = in_thread(_write_all, upload, batch)
                    batch, batched = [], 0
            if writing is not None:
                await asyncio.shield(writing)
            # The rest and the fsync in one hop: a small stripe is all in this last batch.
            finishing = in_thread(_write_all_and_finish, upload, batch)
            digest = await asyncio.shield(finishing)
        except BaseException:
            # A task of its own, shielded: a further cancellation cannot skip the abort.
            await asyncio.shield(_clean_up(_abort_after(upload, writing, finishing)))
            raise
        return length, digest

    async def open_stripe(
        self, tenant: Tenant, object_id: str, version_id: str
    ) -> tuple[int, StripeChunks]:
        """Open a stripe for reading; return its length and its bytes, to be closed."""
        store = await self._store(tenant)
        f, length = await asyncio.to_thread(store.open_stripe, object_id, version_id)
        return length, StripeChunks(f, length)

    async def commit(self, tenant: Tenant, object_id: str, fields: dict[str, Any]) -> None:
        record = ObjectRecord.from_json(fields)
        store = await self._store(tenant)
        # What the new record adds (what the commit frees is not subtracted beforehand),
        # in flight until written, as a stripe is.
        size = len(json.dumps(record.to_json()))
        release = self._reserve(tenant, store, size, "this record")
        await _claimed_in_thread(release, store.commit, object_id, record)

    async def get_record(self, tenant: Tenant, object_id: str) -> ObjectRecord:
        store = await self._store(tenant)
        return await asyncio.to_thread(store.get_record, object_id)

    async def delete(self, tenant: Tenant, object_id: str) -> None:
        store = await self._store(tenant)
        await asyncio.to_thread(store.delete, object_id)

    async def list_lines(self, tenant: Tenant) -> AsyncIterator[bytes]:
        """The tenant's committed records as NDJSON, a batch of lines at a time."""
        store = await self._store(tenant)
        records = store.list_records()
        loop = asyncio.get_running_loop()
        while True:
            batch = await loop.run_in_executor(
                _LISTING_THREAD, _next_lines, records, LISTING_BATCH_BYTES
            )
            if not batch:
                return
            yield batch


async def _begin(store: StripeStore, object_id: str, version_id: str, length: int) -> StripeUpload:
    """``store.begin_stripe`` off the loop, its temp file removed if the caller is cancelled.

    A connection dropped while the worker thread opens the file cancels the await, not
    the thread: the file it opens then belongs to no one, so a clean-up task aborts it.
    """
    starting = in_thread(store.begin_stripe, object_id, version_id, length)
    try:
        return await asyncio.shield(starting)
    except BaseException:
        _clean_up(_abort_when_opened(starting))
        raise


async def _claimed_in_thread(
    release: Callable[[], None], work: Callable[..., _T], *args: Any
) -> _T:
    """``work(*args)`` in a worker thread, with ``release`` called once it has ended. A
    cancelled caller leaves the thread to end by itself, and the claim lasts as long: the
    bytes it writes are in flight until they are counted as stored."""
    running = in_thread(work, *args)
    running.add_done_callback(lambda _: release())
    running.add_done_callback(_consumed)
    return await asyncio.shield(running)


def _consumed(future: asyncio.Future[Any]) -> None:
    """Mark a future's error as seen: its caller may have gone, and was told then."""
    if not future.cancelled():
        future.exception()


def _clean_up(work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run ``work`` as a task held in _CLEANUPS: it runs to its end however its caller ends."""
    task = asyncio.ensure_future(work)
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
    return task


# The clean-ups below run to their end through cancellations too: a server shutting down
# (asyncio.run on its way out) cancels every task, these included, and an abort skipped
# then would leave a part-written stripe in tmp/. The cancellation is raised after.


async def _abort_when_opened(starting: asyncio.Future[StripeUpload]) -> None:
    cancelled = await _cancelled_while(outlast(starting))
    if not starting.cancelled() and starting.exception() is None:
        with contextlib.suppress(OSError, StorageError):  # no one is left to tell
            cancelled |= await _cancelled_while(in_thread_to_the_end(starting.result().abort))
    if cancelled:
        raise asyncio.CancelledError


async def _abort_after(upload: StripeUpload, *pending: asyncio.Future[Any] | None) -> None:
    """Abort ``upload`` once the writes still running in their threads have ended (they
    were awaited through a shield, so a cancellation left them running)."""
    cancelled = False
    for future in pending:
        if future is not None:
            cancelled |= await _cancelled_while(outlast(future))  # its error retrieved
    cancelled |= await _cancelled_while(in_thread_to_the_end(upload.abort))
    if cancelled:
        raise asyncio.CancelledError


async def _cancelled_while(work: Coroutine[Any, Any, Any]) -> bool:
    """Await ``work``, which ends its own work before raising a cancellation; whether
    it was cancelled."""
    try:
        await work
    except asyncio.CancelledError:
        return True
    return False


class StripeChunks:
    """A stored stripe's bytes, IO_BATCH_BYTES at a time, up to its announced length.

    Up to the length and no further read to find the end: a small stripe is one hop to a
    worker thread, not two. A large one (DIRECT_READ_MIN_BYTES or more) is read with
    O_DIRECT where the file system has it, past the page cache (``_direct``), and each read
    starts as the chunk before it is handed on, so the disk works while that chunk is
    sent. ``aclose`` closes the file whether or not reading began (an async generator that
    never started would leave that to the garbage collector), so callers hold it in
    ``contextlib.aclosing``; a read still running in its thread closes it when it ends.
    """

    def __init__(self, f: BinaryIO, length: int) -> None:
        self._f = f
        self._left = length
        try:
            self._direct = DirectReader.start(f) if length >= DIRECT_READ_MIN_BYTES else None
        except BaseException:
            f.close()
            raise
        self._reading: asyncio.Future[bytes] | None = None
        self._closed = False

    def __aiter__(self) -> StripeChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._reading is None:
            if self._left <= 0 or self._closed:
                await self.aclose()
                raise StopAsyncIteration
            self._reading = self._start_read()
        try:
            # Shielded, and kept till it ends: a cancelled response leaves the read to end
            # in its thread, and the file is closed after it (aclose).
            data = await asyncio.shield(self._reading)
        except OSError as exc:  # a failing disk: say so rather than just hang up
            self._reading = None
            await self.aclose()
            raise StorageError("internal", f"cannot read the stripe: {exc}") from exc
        self._reading = None
        if not data:  # cut short under us: the client finds the stripe short
            await self.aclose()
            raise StopAsyncIteration
        self._left -= len(data)
        if self._left > 0 and self._direct is not None and not self._closed:
            self._reading = self._start_read()  # the next block, while this one is sent
        return data

    def _start_read(self) -> asyncio.Future[bytes]:
        n = min(IO_BATCH_BYTES, self._left)
        read = self._f.read if self._direct is None else self._direct.read
        return asyncio.get_running_loop().run_in_executor(None, read, n)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        reading, self._reading = self._reading, None
        if reading is not None and not reading.done():
            reading.add_done_callback(self._close_after)
        else:
            if reading is not None:
                self._close_after(reading)
            else:
                self._close_file()

    def _close_after(self, reading: asyncio.Future[bytes]) -> None:
        if not reading.cancelled():
            reading.exception()  # a read-ahead nobody waits for any more: its error is moot
        self._close_file()

    def _close_file(self) -> None:
        # Never while a read runs (aclose waits for it to end); an ordinary read's own
        # lock would make close wait, a direct read has none.
        self._f.close()
        if self._direct is not None:
            self._direct.close()


def _add_to_batch(batch: list[bytes | bytearray], piece: bytes) -> None:
    """Add an uploaded piece to a write batch, small pieces joined together: a client
    sending tiny DATA frames must not make a batch of millions of objects, each several
    times its bytes' size (WRITE_BATCH_BYTES must stay what a batch holds)."""
    if len(piece) >= SMALL_PIECE_BYTES:
        batch.append(piece)
    elif batch and isinstance(batch[-1], bytearray):
        batch[-1] += piece
    else:
        batch.append(bytearray(piece))


def _write_all(upload: StripeUpload, pieces: list[bytes | bytearray]) -> None:
    for piece in pieces:
        upload.write(piece)


def _write_all_and_finish(upload: StripeUpload, pieces: list[bytes | bytearray]) -> str:
    _write_all(upload, pieces)
    return upload.finish()


def _next_lines(records: Iterator[tuple[str, ObjectRecord]], max_bytes: int) -> bytes:
    """The next records' NDJSON lines, about ``max_bytes`` of them (b"" at the end)."""
    lines = []
    size = 0
    for object_id, record in records:
        line = orjson.dumps({"object_id": object_id, **record.to_json()})
        lines.append(line)
        size += len(line) + 1
        if size >= max_bytes:
            break
    return b"".join(line + b"\n" for line in lines)
