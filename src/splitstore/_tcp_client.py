"""The client side of the TCP protocol: pooled connections around the sans-IO codec."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from . import _protocol as p
from ._batch import MAX_BATCH_BYTES, MAX_BATCH_ITEMS
from ._bulk import BULK_READ_MIN_BYTES, BulkStripe, Endpoint
from ._codec_stream import CodecStream, open_codec_stream
from ._errors import ProtocolError, ServerUnavailableError, SplitStoreError
from ._remote import (
    MAX_LISTING_LINE,
    ListingParser,
    StripeReader,
    connection_error,
    parse_record,
    read_commit_results,
    read_put_stripes_reply,
    read_record_lines,
    record_lines_body,
    split_stripes,
    stripe_index,
    stripe_keys,
    upload_digest,
)
from ._storage import ObjectRecord
from ._tcp_bulk import TcpBulkOpener
from ._tcp_steps import (
    RECEIVE,
    body_piece,
    handshake_steps,
    next_event,
    response_fields,
    stripe_length,
)

__all__ = ["TcpRemote"]

T = TypeVar("T")

# Idle connections kept for reuse; more would only hold sockets open on the server.
POOL_SIZE = 4
# A pooled connection idle longer than this is closed, not reused: well inside a server's
# idle time-out (60 s by default), so a reused link is not one the server is just then
# dropping, its ERROR arriving as the answer to our next request (aiohttp's pool: 15 s).
POOL_IDLE_SECONDS = 15.0


class TcpRemote:
    kind = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        label: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.label = label or f"tcp server at {host}:{port}"
        self._token = token
        self._ssl = ssl_context
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        # Where the blocking connections of large fetches go (``_tcp_bulk``).
        self._bulk_at = Endpoint(
            host, port, token, ssl_context, connect_timeout, io_timeout, self.label
        )
        self._idle: list[_Link] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await _close_all(idle)

    # -- connections ---------------------------------------------------------------------

    @asynccontextmanager
    async def _link(self) -> AsyncIterator[_Link]:
        """A connection for one exchange, back to the pool only if the exchange finished."""
        link = await self._idle_link() or await self._connect()
        try:
            yield link
        except BaseException:
            await link.close()
            raise
        if link.reusable and len(self._idle) < POOL_SIZE:
            link.idle_since = asyncio.get_running_loop().time()
            self._idle.append(link)
        else:
            await link.close()

    async def _idle_link(self) -> _Link | None:
        """A pooled connection the server has not closed meanwhile (it was restarted, or
        dropped the connection after its idle time-out), or None. One holding unread
        bytes is not reused either: they answer no request (the ERROR of an idle time-out
        whose close has not arrived yet), and would be taken for the next one's answer.
        Nor is one idle for over POOL_IDLE_SECONDS, which the server may be dropping."""
        if self._idle:
            await asyncio.sleep(0)  # let a close that has already arrived be processed
        now = asyncio.get_running_loop().time()
        unusable: list[_Link] = []
        found = None
        while self._idle and found is None:
            link = self._idle.pop()
            stream = link.stream
            stale = now - link.idle_since > POOL_IDLE_SECONDS
            if stale or stream.is_closing() or stream.at_eof or stream.conn.buffered_bytes:
                unusable.append(link)
            else:
                found = link
        await _close_all(unusable)  # together: each may wait up to a second for its peer
        return found

    async def _connect(self) -> _Link:
        with self._translating():
            async with asyncio.timeout(self._connect_timeout):
                conn = p.Connection(p.Role.CLIENT, partial_data=True)
                stream = await open_codec_stream(conn, self.host, self.port, ssl_context=self._ssl)
            link = _Link(stream, self)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await link.handshake(self._token)
            except BaseException:
                await link.close()
                raise
            return link

    # -- operations ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self._simple("ping", {})

    async def put_stripe(
        self, object_id: str, version_id: str, length: int, body: AsyncIterator[bytes]
    ) -> str:
        fields = {"object_id": object_id, "version_id": version_id, "length": length}
        reply = await self._with_body(p.Request("put_stripe", fields), body)
        return upload_digest(reply, length, self.label)

    @asynccontextmanager
    async def get_stripe(
        self, object_id: str, version_id: str, *, expected_length: int | None = None
    ) -> AsyncIterator[StripeReader]:
        if expected_length is not None and expected_length >= BULK_READ_MIN_BYTES:
            async with self._bulk_stripe(object_id, version_id) as bulk:
                yield bulk
            return
        async with self._link() as link:
            with self._translating():
                async with self._exchange():  # the head; each read of the body has its own
                    request = {"object_id": object_id, "version_id": version_id}
                    await link.request("get_stripe", request)
                    length = stripe_length(await link.read_response(), self.label)
            stripe = _TcpStripe(link, length)
            yield stripe  # the caller's errors are its own; reads translate themselves
            with self._translating(in_body=True):
                await stripe.drain()

    @asynccontextmanager
    async def _bulk_stripe(self, object_id: str, version_id: str) -> AsyncIterator[BulkStripe]:
        """A large stripe, on a blocking connection of its own read in bulk threads."""
        opener = TcpBulkOpener(self._bulk_at, lambda: self._translating(in_body=True))
        opening = opener.stripe(
            lambda addresses: opener.open(addresses, object_id, version_id), self._translating
        )
        async with opening as stripe:
            yield stripe

    async def commit(self, object_id: str, record: ObjectRecord) -> None:
        await self._simple("commit", {"object_id": object_id, **record.to_json()})

    async def get_record(self, object_id: str) -> ObjectRecord:
        reply = await self._simple("get_record", {"object_id": object_id})
        return parse_record(reply.get("record"), self.label)

    async def list_records(self) -> AsyncIterator[tuple[str, ObjectRecord]]:
        async with self._link() as link:
            with self._translating():
                await link.request("list", {})
                await link.read_response()
                listing = ListingParser(self.label)
                async for piece in link.body():
                    for item in listing.feed(piece):
                        yield item
                listing.close()

    async def delete(self, object_id: str) -> None:
        await self._simple("delete", {"object_id": object_id})

    # -- batches -------------------------------------------------------------------------

    async def put_stripes(self, stripes: Sequence[tuple[str, str, bytes]]) -> list[str]:
        request = p.Request("put_stripes", {"stripes": stripe_index(stripes)})
        reply = await self._with_body(request, b"".join(data for _, _, data in stripes))
        return read_put_stripes_reply(reply, [len(d) for _, _, d in stripes], self.label)

    async def commit_records(
        self, records: Sequence[tuple[str, ObjectRecord]]
    ) -> list[SplitStoreError | None]:
        reply = await self._with_body(p.Request("commit_records", {}), record_lines_body(records))
        return read_commit_results(reply, len(records), self.label)

    async def get_records(self, object_ids: Sequence[str]) -> list[ObjectRecord | SplitStoreError]:
        _, body = await self._fetch_body(
            "get_records", {"object_ids": list(object_ids)}, MAX_BATCH_ITEMS * MAX_LISTING_LINE
        )
        return read_record_lines(body, object_ids, self.label)

    async def get_stripes(
        self, stripes: Sequence[tuple[str, str]]
    ) -> list[bytes | SplitStoreError | None]:
        index = stripe_keys(stripes)
        reply, body = await self._fetch_body("get_stripes", {"stripes": index}, MAX_BATCH_BYTES)
        return split_stripes(reply, body, len(stripes), self.label)

    async def _with_body(
        self, request: p.Request, body: bytes | AsyncIterator[bytes]
    ) -> dict[str, Any]:
        """One exchange with a request body, held in memory or streamed; the reply."""
        async with self._link() as link:
            with self._translating():
                await link.send(request)
                try:
                    if isinstance(body, bytes):
                        if body:
                            await link.send_data(body)
                    else:
                        async for piece in body:
                            await link.send_data(piece)
                    await link.send(p.End({}))
                except TimeoutError:
                    raise  # the server stopped reading: waiting for its reply would too
                except (ConnectionError, OSError):
                    # The server may have refused mid-upload (disk full, ...) and closed:
                    # its ERROR frame says why, so read it before blaming the network.
                    async with self._exchange():
                        await link.read_reply()
                    raise
                async with self._exchange():
                    return await link.read_reply()

    async def _fetch_body(
        self, op: str, fields: dict[str, Any], limit: int
    ) -> tuple[dict[str, Any], bytes]:
        """One exchange whose response body is read whole, up to ``limit`` bytes."""
        async with self._link() as link:
            with self._translating():
                async with self._exchange():
                    await link.request(op, fields)
                    reply = await link.read_response()
                    parts, size = [], 0
                    async for piece in link.body():
                        size += len(piece)
                        if size > limit:
                            raise ProtocolError(
                                f"the {self.label} sent an oversized batch", server=self.label
                            )
                        parts.append(piece)
        return reply, b"".join(parts)

    # -- helpers -------------------------------------------------------------------------

    async def _simple(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        async with self._link() as link:
            with self._translating():
                async with self._exchange():
                    await link.request(op, fields)
                    return await link.read_reply()

    def _exchange(self) -> asyncio.Timeout:
        """The deadline of an exchange of bounded size (a request, its reply, a batch's
        body): io_timeout in all. Each read also has io_timeout of its own, so without it a
        server sending a byte now and then would hold the exchange for days."""
        return asyncio.timeout(self._io_timeout)

    @contextlib.contextmanager
    def _translating(self, *, in_body: bool = False) -> Iterator[None]:
        """Turn protocol, socket and TLS errors into SplitStoreErrors naming this server;
        ``in_body``: reading a stripe's body, past the TLS handshake."""
        label = self.label
        try:
            yield
        except p.ProtocolViolation as exc:
            raise ProtocolError(f"the {label} broke the protocol: {exc}", server=label) from exc
        except TimeoutError as exc:
            raise ServerUnavailableError(f"the {label} timed out", server=label) from exc
        except asyncio.IncompleteReadError as exc:
            raise ServerUnavailableError(
                f"the connection to the {label} failed: {exc}", server=label
            ) from exc
        except OSError as exc:  # ssl.SSLError and ConnectionError included
            raise connection_error(exc, label, in_body=in_body) from exc


class _Link:
    """One open connection and its protocol state."""

    def __init__(self, stream: CodecStream, remote: TcpRemote) -> None:
        self.stream, self.remote = stream, remote
        self.conn = stream.conn
        self.reusable = False
        self.idle_since = 0.0  # the loop's time when it was last put in the pool

    async def handshake(self, token: str) -> None:
        steps = handshake_steps(token, self.remote.label)
        step = next(steps)
        with contextlib.suppress(StopIteration):
            while True:
                if step is RECEIVE:
                    step = steps.send(await self.next())
                else:
                    await self.send(step)
                    step = next(steps)
        self.reusable = True

    async def request(self, op: str, fields: dict[str, Any]) -> None:
        self.reusable = False
        await self.send(p.Request(op, fields))
        await self.send(p.End({}))

    async def read_response(self) -> dict[str, Any]:
        event = await self.next()
        if isinstance(event, p.Error):
            # An ERROR after our END leaves the connection usable; one mid-upload closes it.
            self.reusable = self.conn.our_state is p.State.IDLE
        return response_fields(event, self.remote.label)

    async def read_reply(self) -> dict[str, Any]:
        """A response with an empty body."""
        fields = await self.read_response()
        async for _ in self.body():
            raise p.ProtocolViolation("unexpected body")
        return fields

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            piece = self._body_piece(await self.next())
            if piece is None:
                return
            yield piece

    async def body_into(self, view: memoryview) -> tuple[int, bytes | None]:
        """Fill ``view`` from the response body, DATA payload bytes that had not arrived
        yet going straight into it (``CodecStream.receive_into``). Return how many bytes
        were filled, and what the body holds beyond them: bytes that arrived beyond
        ``view`` (the next call's first), or None where the body has ended, which is
        then the only reason for filling fewer than ``len(view)``."""
        filled, size = 0, len(view)
        while filled < size:
            event = self._poll()
            if event is p.NEED_DATA:
                if self.conn.payload_left:
                    filled += await self._await_more(self.stream.receive_into(view[filled:]))
                else:
                    await self._await_more(self.stream.receive())
                continue
            piece = self._body_piece(event)
            if piece is None:
                return filled, None
            take = min(len(piece), size - filled)
            view[filled : filled + take] = memoryview(piece)[:take]
            filled += take
            if take < len(piece):
                return filled, piece[take:]
        return filled, b""

    def _body_piece(self, event: Any) -> bytes | None:
        """A body event's bytes; None at the END."""
        piece = body_piece(event, self.remote.label)
        if piece is None:
            self.reusable = True
        return piece

    async def send(self, event: Any) -> None:
        self.stream.write(self.conn.send(event))
        async with asyncio.timeout(self.remote._io_timeout):
            await self.stream.drain()

    async def send_data(self, payload: bytes) -> None:
        self.stream.writelines(self.conn.send_data(payload))
        async with asyncio.timeout(self.remote._io_timeout):
            await self.stream.drain()

    async def next(self) -> Any:
        while True:
            event = self._poll()
            if event is not p.NEED_DATA:
                return event
            await self._await_more(self.stream.receive())

    def _poll(self) -> Any:
        """The next event, or NEED_DATA."""
        return next_event(self.stream.next_event, ended=self.stream.ended)

    async def _await_more(self, arrival: Awaitable[T]) -> T:
        """Wait, within the I/O time-out, for ``arrival``: bytes reaching the codec or
        the reader's buffer, or the connection's end (``CodecStream.ended``)."""
        async with asyncio.timeout(self.remote._io_timeout):
            return await arrival

    async def close(self) -> None:
        self.reusable = False
        self.stream.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.stream.wait_closed()


async def _close_all(links: list[_Link]) -> None:
    if links:
        await asyncio.gather(*(link.close() for link in links))


class _TcpStripe:
    def __init__(self, link: _Link, length: int) -> None:
        self.length = length
        self._link = link
        self._rest = b""  # what the last frame brought beyond the last read
        self._done = False
        self._taken = 0  # bytes handed out by read

    async def read(self, n: int) -> memoryview:
        import numpy as np  # on first use, as in _stripes

        # One buffer per read, which most payload bytes reach with no copy at all; left
        # uninitialised (a bytearray would be zeroed first), as every byte is written.
        view = np.empty(n, dtype=np.uint8).data
        have = min(n, len(self._rest))
        if have:
            view[:have] = self._rest[:have]
            self._rest = self._rest[have:]
        if have < n and not self._done:
            with self._link.remote._translating(in_body=True):
                filled, rest = await self._link.body_into(view[have:])
            have += filled
            self._done = rest is None
            self._rest = rest or b""
        self._taken += have
        return view if have == n else view[:have]  # short only where the stripe ended

    async def drain(self) -> None:
        """Read to the END frame so the connection can be reused: no further than the
        announced length, or a server sending DATA for ever would hold the fetch."""
        left = self.length - self._taken - len(self._rest)
        if not self._done:
            async for piece in self._link.body():
                left -= len(piece)
                if left < 0:
                    break
        if left < 0:
            label = self._link.remote.label
            raise ProtocolError(
                f"the {label} sent more than the {self.length} bytes it announced for a stripe",
                server=label,
            )
