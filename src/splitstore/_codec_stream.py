"""A connection's bytes fed to the sans-IO codec straight from asyncio's transport: the
client's connections, and the TCP server's behind its connection gate (``_limits``),
which hands bytes on through ``data_received``.

asyncio's streams copy every received byte several times on its way to the codec: the
TLS layer joins what it decrypted into a new ``bytes``, ``StreamReader`` appends it to its
buffer, and each ``read`` slices out another ``bytes``. A ``BufferedProtocol`` instead
has the TLS layer decrypt into a buffer of ours, and from there the bytes go to the codec
in one copy. On a 1 GiB fetch those copies were most of the client's event-loop time
spent moving bytes, and that thread is the one a fetch waits for.

A codec made with ``partial_data`` lets DATA payloads skip even that copy: a reader that
waits in ``receive_into`` has the TLS layer (or the socket, without TLS) decrypt the
payload straight into the reader's own buffer, and only frame headers, JSON frames and
what arrived while no reader waited pass through the codec's buffer. On a fetch, those
copies held the GIL for a quarter of the time the client's threads spent holding it
(docs/performance.md).

Reading stops while the codec holds ``high_water`` bytes not yet turned into events (the
reader is behind) and starts again as soon as the reader has taken it below that, through
``next_event``; the kernel's socket buffer and TCP's window hold back the sender
meanwhile, as with ``StreamReader``'s limit. A connection so holds at most ``high_water``
plus what one read delivers: ``RECEIVE_BYTES`` through ``get_buffer``, or what asyncio's
TLS layer decrypted at once through ``data_received`` (its reads of up to 256 KiB of
ciphertext: about 512 KiB at most). The codec's buffer may keep up to twice that
allocated, as it drops consumed bytes lazily.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from . import _protocol as p

__all__ = ["CodecStream", "open_codec_stream"]

# Bytes the TLS layer may decrypt into our buffer at a time: a few TLS records.
RECEIVE_BYTES = 256 * 1024
# Codec bytes not yet read as events at which reading pauses: above one largest frame,
# so a reader waiting for the rest of a frame never stops the bytes it waits for.
HIGH_WATER = 4 * 1024 * 1024
# The same with ``partial_data``, where no DATA frame needs to be whole: low, so that
# what arrives while the reader is busy elsewhere waits in the kernel, and most payload
# bytes go straight to the reader's buffer once it waits again.
PARTIAL_HIGH_WATER = 256 * 1024


class CodecStream(asyncio.BufferedProtocol):
    """One connection: what arrives goes into ``conn``; writes go to the transport."""

    def __init__(
        self,
        conn: p.Connection,
        *,
        high_water: int | None = None,
        on_connect: Callable[[CodecStream], object] | None = None,
        half_close: bool = False,
    ) -> None:
        """``on_connect`` is called once the connection is made (a server starts its
        session there); with ``half_close``, the peer's EOF leaves our side open for an
        answer (plain TCP only: TLS closes both sides)."""
        self.conn = conn
        self._on_connect = on_connect
        self._half_close = half_close
        partial = conn.partial_data
        if high_water is None:
            high_water = PARTIAL_HIGH_WATER if partial else HIGH_WATER
        largest_whole = p.MAX_JSON_FRAME if partial else p.MAX_DATA_FRAME
        self._high = max(high_water, p.HEADER_SIZE + largest_whole + 1)
        # Made on first use: a server's stream is fed through data_received and never
        # needs it, and 256 KiB of zeroed memory per connection adds up.
        self._buffer: memoryview | None = None
        # A reader's buffer for DATA payload bytes (``receive_into``), and how much of it
        # is filled; ``_direct``: the last get_buffer handed out a piece of it.
        self._target: memoryview | None = None
        self._filled = 0
        self._direct = False
        self._discarding = False  # what arrives is dropped (``discard_incoming``)
        self._transport: asyncio.Transport | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._eof = False  # the peer closed its side, or the connection was lost
        self._ended = False  # ``conn`` has been told so (``ended``)
        self._lost = False
        self._error: BaseException | None = None  # what the connection was lost with
        self._arrived: asyncio.Future[None] | None = None  # a reader waiting for bytes
        self._drained: asyncio.Future[None] | None = None  # a writer waiting for room
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the protocol, called by the transport ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self._target
        if target is not None and not self.conn.buffered_bytes:
            # Never past the payload's end: what follows it is the codec's to parse.
            room = min(len(target) - self._filled, self.conn.payload_left)
            if room > 0:
                self._direct = True
                return target[self._filled : self._filled + room]
        self._direct = False
        if self._buffer is None:
            self._buffer = memoryview(bytearray(RECEIVE_BYTES))
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if not nbytes:
            return  # nothing arrived (``receive_data(b"")`` would mean the peer closed)
        if self._direct:
            self.conn.receive_payload(nbytes)
            self._filled += nbytes
            self._wake_reader()
            return
        assert self._buffer is not None  # get_buffer came first
        self._received(self._buffer[:nbytes])

    def data_received(self, data: bytes) -> None:
        """Bytes handed on by a plain protocol in front of this one (the servers'
        connection gate, ``_limits``)."""
        if data:
            self._received(data)

    def _received(self, data: bytes | memoryview) -> None:
        if self._discarding:
            self._wake_reader()
            return
        self.conn.receive_data(data)
        if not self._reading_paused and self.conn.buffered_bytes >= self._high:
            assert self._transport is not None
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        over_tls = self._transport is not None and self._transport.get_extra_info("sslcontext")
        return self._half_close and not over_tls  # False: close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._wake_reader()
        self._wake_writer()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- for the connection's owner --------------------------------------------------

    @property
    def at_eof(self) -> bool:
        """The peer closed the connection (bytes it sent before may still be unread)."""
        return self._eof

    @property
    def ended(self) -> bool:
        """``receive`` found the connection at its end and told ``conn``, which holds
        every byte that came: from here on, a frame cut short was cut by the peer's
        going away, not sent malformed."""
        return self._ended

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def next_event(self) -> Any:
        """``conn.next_event()``, reading again once the codec is below the mark: a reader
        that finds all it wanted in the codec's buffer (a whole response) must not leave
        the connection paused, or the peer's close or error would never be seen."""
        event = self.conn.next_event()
        if self._reading_paused and self.conn.buffered_bytes < self._high:
            self._resume_reading()
        return event

    async def receive(self) -> bool:
        """Wait until more bytes reach ``conn``; False once nothing more will come, and
        ``conn`` has been told so (every byte that came is in it already).

        Call it when ``next_event()`` returned ``NEED_DATA``. Raises what the
        connection was lost with, if it was lost with an error, once all bytes received
        before are in ``conn``.
        """
        if self._reading_paused:
            self._resume_reading()
        if not self._eof:
            loop = asyncio.get_running_loop()
            self._arrived = loop.create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
            if not self._eof:
                return True
        if self._error is not None:
            raise self._error
        if not self._ended:
            self._ended = True
            self.conn.receive_data(b"")
        return False

    async def receive_into(self, target: memoryview) -> int:
        """Like ``receive``, for the rest of a DATA payload (``conn.payload_left``), which
        goes straight into ``target`` rather than into ``conn``; return how many bytes
        went there, 0 once nothing more will come (``conn`` is then told so).

        Call it when ``next_event()`` returned ``NEED_DATA`` in the middle of a payload
        (with ``partial_data``). Bytes go on arriving into ``target`` until this returns,
        never past the payload's end.
        """
        if not (len(target) and self.conn.payload_left) or self.conn.buffered_bytes:
            # Else bytes would go to the codec, and 0 would be taken for the peer's close.
            raise RuntimeError("receive_into needs a payload under way and nothing buffered")
        self._target, self._filled = target, 0
        try:
            await self.receive()
        finally:
            filled, self._target = self._filled, None
        return filled

    def discard_incoming(self) -> None:
        """Drop whatever arrives from now on, reading on: for a server that has refused
        and is closing, but lets a client still sending finish, so that the client's
        kernel does not reset the connection and lose the refusal."""
        self._discarding = True

    def write(self, data: bytes | memoryview) -> None:
        self._writable().write(data)

    def writelines(self, parts: list[Any]) -> None:
        self._writable().writelines(parts)

    async def drain(self) -> None:
        """Wait until the transport's buffer has room (or raise, if the connection is gone)."""
        if self._transport is None or self._transport.is_closing():
            # Closing (after the peer's EOF, or by us), the transport drops what is
            # written: say so now, not after connection_lost, which TLS takes a few
            # turns of the loop to reach.
            raise self._error or ConnectionResetError("the connection is closing")
        while self._writing_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        if self._lost:
            raise self._error or ConnectionResetError("the connection was lost")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping whatever is still buffered to be sent."""
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._transport is not None:
            self._transport.resume_reading()

    def _writable(self) -> asyncio.Transport:
        if self._transport is None or self._lost:
            raise ConnectionResetError("the connection was lost")
        return self._transport

    def _wake_reader(self) -> None:
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


async def open_codec_stream(
    conn: p.Connection,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
) -> CodecStream:
    """Connect (with TLS when ``ssl_context`` is given) and return the stream."""
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(
        lambda: CodecStream(conn),
        host,
        port,
        ssl=ssl_context,
        server_hostname=host if ssl_context else None,
    )
    return stream
