"""Small requests to one server, sent together: the client side of the batch operations.

``CoalescingRemote`` wraps a ``Remote`` and keeps its interface. Each kind of small
request (a small stripe up or down, a commit, a record lookup) goes out at once when no
request of its kind is on the way to that server; while one is, later ones wait and then
leave together as one batch (docs/protocol.md, section 10, "Batches"). A lone store or
fetch therefore sends exactly what it did before, with no added wait, while many at once
(``store_many``, ``fetch_many``) share requests: the cost that limits small files on two
cores is per request, not per byte. Every item keeps its own outcome: one file's failure
is not another's.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Generic, TypeVar

from ._batch import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, MAX_BATCH_RECORD_BYTES
from ._errors import SplitStoreError, UsageError
from ._remote import Remote, StripeReader
from ._storage import ObjectRecord

__all__ = ["BATCHED_STRIPE_BYTES", "CoalescingRemote"]

#: Stripes up to this size travel in batches; larger ones stream on their own.
BATCHED_STRIPE_BYTES = 64 * 1024
# What a record adds to its NDJSON line beyond its manifest's base64 text.
_RECORD_LINE_OVERHEAD = 256

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Batcher(Generic[Item, Result]):
    """Calls of one kind to one server: one at once if the way is clear, else batched."""

    def __init__(
        self,
        send_one: Callable[[Item], Awaitable[Result]],
        send_many: Callable[[list[Item]], Awaitable[Sequence[Result | SplitStoreError]]],
        size: Callable[[Item], int],
        max_bytes: int,
    ) -> None:
        self._send_one = send_one
        self._send_many = send_many
        self._size = size
        self._max_bytes = max_bytes
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._waiting: set[asyncio.Future[Result]] = set()  # every call not yet answered
        self._busy = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, item: Item) -> Result:
        if self._closed:
            raise UsageError("the client was closed while this file was in progress")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)
        self._pending.append((item, future))
        self._start()
        return await future

    def _start(self) -> None:
        if self._busy or self._closed:
            return
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        size = 0
        while self._pending and len(batch) < MAX_BATCH_ITEMS:
            item, future = self._pending[0]
            if future.done():  # its caller was cancelled: nothing of it is sent
                self._pending.pop(0)
                continue
            item_size = self._size(item)
            if batch and size + item_size > self._max_bytes:
                break
            batch.append(self._pending.pop(0))
            size += item_size
        if not batch:
            return
        self._busy = True
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        outcomes: Sequence[Result | SplitStoreError | Exception]
        try:
            if len(items) == 1:
                try:
                    outcomes = [await self._send_one(items[0])]
                except SplitStoreError as exc:
                    outcomes = [exc]
            else:
                outcomes = await self._send_many(items)
                if len(outcomes) != len(items):  # the adapters check; never leave a caller
                    raise AssertionError("a batch answered for another number of items")
        except Exception as exc:  # the whole request failed: so did each of its items
            # Each caller gets an error of its own: a store adds its note to the message.
            outcomes = [exc, *(_copy_of(exc) for _ in batch[1:])]
        finally:
            self._busy = False
            self._start()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Calls still waiting, queued or in a batch cancelled before it began: cancelled.
        for future in list(self._waiting):
            future.cancel()
        self._pending.clear()


def _copy_of(exc: Exception) -> Exception:
    try:
        return copy.copy(exc)
    except Exception:  # an exception that cannot be rebuilt from its args: shared
        return exc


class CoalescingRemote:
    """A ``Remote`` whose small requests are batched with others of their kind."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.label = remote.label
        self.kind = remote.kind
        self._puts: _Batcher[tuple[str, str, bytes], str] = _Batcher(
            self._put_one, remote.put_stripes, lambda item: len(item[2]), MAX_BATCH_BYTES
        )
        self._gets: _Batcher[tuple[str, str, int], bytes | None] = _Batcher(
            _alone, self._get_many, lambda item: item[2], MAX_BATCH_BYTES
        )
        self._commits: _Batcher[tuple[str, ObjectRecord], None] = _Batcher(
            self._commit_one,
            remote.commit_records,
            lambda item: len(item[1].manifest) * 4 // 3 + _RECORD_LINE_OVERHEAD,
            MAX_BATCH_RECORD_BYTES,
        )
        self._records: _Batcher[str, ObjectRecord] = _Batcher(
            remote.get_record, remote.get_records, lambda item: 1, MAX_BATCH_ITEMS
        )

    # -- batched ---------------------------------------------------------------------------

    async def put_stripe(
        self, object_id: str, version_id: str, length: int, body: AsyncIterator[bytes]
    ) -> str:
        if length > BATCHED_STRIPE_BYTES:
            return await self.remote.put_stripe(object_id, version_id, length, body)
        data = b"".join([piece async for piece in body])
        return await self._puts.call((object_id, version_id, data))

    def get_stripe(
        self, object_id: str, version_id: str, *, expected_length: int | None = None
    ) -> AbstractAsyncContextManager[StripeReader]:
        if expected_length is None or expected_length > BATCHED_STRIPE_BYTES:
            return self.remote.get_stripe(object_id, version_id, expected_length=expected_length)
        return self._get_small(object_id, version_id, expected_length)

    @asynccontextmanager
    async def _get_small(
        self, object_id: str, version_id: str, expected_length: int
    ) -> AsyncIterator[StripeReader]:
        data = await self._gets.call((object_id, version_id, expected_length))
        if data is None:  # alone, or too large for a batch after all: stream it
            async with self.remote.get_stripe(object_id, version_id) as reader:
                yield reader
        else:
            yield _HeldStripe(data)

    async def commit(self, object_id: str, record: ObjectRecord) -> None:
        await self._commits.call((object_id, record))

    async def get_record(self, object_id: str) -> ObjectRecord:
        return await self._records.call(object_id)

    # -- passed through --------------------------------------------------------------------

    async def ping(self) -> None:
        await self.remote.ping()

    def list_records(self) -> AsyncIterator[tuple[str, ObjectRecord]]:
        return self.remote.list_records()

    async def delete(self, object_id: str) -> None:
        await self.remote.delete(object_id)

    async def put_stripes(self, stripes: Sequence[tuple[str, str, bytes]]) -> list[str]:
        return await self.remote.put_stripes(stripes)

    async def get_stripes(
        self, stripes: Sequence[tuple[str, str]]
    ) -> list[bytes | SplitStoreError | None]:
        return await self.remote.get_stripes(stripes)

    async def commit_records(
        self, records: Sequence[tuple[str, ObjectRecord]]
    ) -> list[SplitStoreError | None]:
        return await self.remote.commit_records(records)

    async def get_records(self, object_ids: Sequence[str]) -> list[ObjectRecord | SplitStoreError]:
        return await self.remote.get_records(object_ids)

    async def close(self) -> None:
        for batcher in (self._puts, self._gets, self._commits, self._records):
            await batcher.close()
        await self.remote.close()

    # -- helpers ---------------------------------------------------------------------------

    async def _put_one(self, item: tuple[str, str, bytes]) -> str:
        object_id, version_id, data = item
        return await self.remote.put_stripe(object_id, version_id, len(data), _once(data))

    async def _commit_one(self, item: tuple[str, ObjectRecord]) -> None:
        await self.remote.commit(*item)

    async def _get_many(
        self, items: list[tuple[str, str, int]]
    ) -> list[bytes | SplitStoreError | None]:
        return await self.remote.get_stripes([(o, v) for o, v, _ in items])


async def _alone(item: tuple[str, str, int]) -> None:
    """A lone small stripe streams as before: no batch request for one."""
    return None


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _HeldStripe:
    """A stripe that came in a batch, read from memory."""

    def __init__(self, data: bytes) -> None:
        self.length = len(data)
        self._view = memoryview(data)
        self._done = 0

    async def read(self, n: int) -> bytes:
        piece = self._view[self._done : self._done + n]
        self._done += len(piece)
        return bytes(piece)
