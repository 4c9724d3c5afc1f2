"""The client's connection fed straight from the transport: every byte reaches the codec
in order, reading pauses while the codec holds too much and resumes as the reader takes
events, writing waits while the peer does not read, and the end of a connection (clean,
cut off, or with an error) is told apart. A real loopback peer, plain and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from splitstore import _protocol as p
from splitstore._codec_stream import HIGH_WATER, RECEIVE_BYTES, CodecStream, open_codec_stream
from splitstore._setup import SetupPaths, init_setup
from splitstore._tls import client_ssl_context, server_ssl_context

Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _deliver(data: bytes, to: p.Connection) -> list[object]:
    to.receive_data(data)
    events: list[object] = []
    while (event := to.next_event()) is not p.NEED_DATA:
        events.append(event)
    return events


def server_bytes(payloads: list[bytes]) -> bytes:
    """All a server sends in answer to a client's opening and one request: the preface
    reply, READY, then RESPONSE, DATA (one frame per payload), END."""
    client, server = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
    _deliver(client.send(p.Preface(2, 2)), server)
    out = [server.send(p.PrefaceReply(2))]
    _deliver(out[-1], client)
    _deliver(client.send(p.Hello("t")), server)
    out.append(server.send(p.Ready()))
    _deliver(out[-1], client)
    _deliver(client.send(p.Request("get_stripe", {})) + client.send(p.End()), server)
    out.append(server.send(p.Response({})))
    for payload in payloads:
        out.extend(bytes(part) for part in server.send_data(payload))
    out.append(server.send(p.End()))
    return b"".join(out)


def client_conn() -> p.Connection:
    """A client codec that has sent its preface (the rest is sent as the answers come)."""
    conn = p.Connection(p.Role.CLIENT)
    conn.send(p.Preface(2, 2))
    return conn


def sends(wire: bytes) -> Peer:
    """A peer that sends ``wire`` at once, then closes its side cleanly."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire)
        await writer.drain()
        writer.close()

    return handle


@asynccontextmanager
async def peer(handle: Peer, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def connected(handle: Peer, setup: SetupPaths | None = None) -> AsyncIterator[CodecStream]:
    """A client stream to a peer running ``handle``: TLS with ``setup``'s certificates."""
    server_ctx = server_ssl_context(setup.server_cert, setup.server_key) if setup else None
    async with peer(handle, server_ctx) as port:
        ctx = client_ssl_context(setup.ca_cert) if setup else None
        stream = await open_codec_stream(client_conn(), "127.0.0.1", port, ssl_context=ctx)
        try:
            yield stream
        finally:
            stream.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await stream.wait_closed()


async def events_until_end(stream: CodecStream) -> list[object]:
    """Every event of the exchange, reading as the client link does."""
    conn, seen = stream.conn, list[object]()
    while True:
        event = stream.next_event()
        if event is p.NEED_DATA:
            if not await stream.receive():
                conn.receive_data(b"")
            continue
        seen.append(event)
        if isinstance(event, p.PrefaceReply):
            conn.send(p.Hello("t"))
        elif isinstance(event, p.Ready):
            conn.send(p.Request("get_stripe", {}))
            conn.send(p.End())
        elif isinstance(event, p.End | p.ConnectionClosed):
            return seen


async def paused_in_time(stream: CodecStream, seconds: float = 10.0) -> bool:
    """Whether the transport stops reading within ``seconds`` (polled: no fixed sleep)."""
    assert stream._transport is not None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while stream._transport.is_reading():
                await asyncio.sleep(0.01)
    return not stream._transport.is_reading()


def payloads_of(events: list[object]) -> bytes:
    return b"".join(e.payload for e in events if isinstance(e, p.Data))


@pytest.mark.parametrize("tls", [False, True])
def test_every_byte_reaches_the_codec_in_order(tmp_path: Path, tls: bool) -> None:
    setup = init_setup(tmp_path / "setup") if tls else None
    payloads = [os.urandom(n) for n in (1, 1000, p.MAX_DATA_FRAME, 70_000, p.MAX_DATA_FRAME)]
    wire = server_bytes(payloads)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(wire), 9_999):  # in pieces that cut frames anywhere
            writer.write(wire[i : i + 9_999])
            await writer.drain()
        writer.close()

    async def run() -> list[object]:
        async with connected(handle, setup) as stream:
            return await events_until_end(stream)

    events = asyncio.run(run())
    assert isinstance(events[-1], p.End)
    assert payloads_of(events) == b"".join(payloads)


def test_reading_pauses_while_the_codec_holds_too_much() -> None:
    """A reader that falls behind stops the transport's reading (TCP then holds the
    sender back) instead of the codec's buffer growing without bound."""
    payloads = [os.urandom(p.MAX_DATA_FRAME) for _ in range(24)]  # 24 MiB
    handle = sends(server_bytes(payloads))

    async def run() -> tuple[int, bool, list[object]]:
        async with connected(handle) as stream:
            reading = not await paused_in_time(stream)  # nobody reads meanwhile
            held = stream.conn.buffered_bytes
            return held, reading, await events_until_end(stream)

    held, reading, events = asyncio.run(run())
    assert HIGH_WATER <= held <= HIGH_WATER + RECEIVE_BYTES
    assert not reading
    assert payloads_of(events) == b"".join(payloads)  # and it all came once read


@pytest.mark.parametrize("tls", [False, True])
def test_reading_resumes_as_the_reader_takes_events(tmp_path: Path, tls: bool) -> None:
    """A reader that finds what it wants in the codec's buffer never waits for bytes, so
    taking events must resume reading by itself: a connection left paused after a whole
    response (and put back in the pool) would never see the peer's close."""
    setup = init_setup(tmp_path / "setup") if tls else None
    payloads = [os.urandom(p.MAX_DATA_FRAME) for _ in range(12)]  # 12 MiB
    handle = sends(server_bytes(payloads))

    async def run() -> tuple[bool, list[object]]:
        async with connected(handle, setup) as stream:
            paused = await paused_in_time(stream)  # nobody reads meanwhile
            seen: list[object] = []
            async with asyncio.timeout(10):
                while not (seen and isinstance(seen[-1], p.End)):
                    event = stream.next_event()  # never receive(): never waits for bytes
                    if event is p.NEED_DATA:
                        await asyncio.sleep(0.01)
                        continue
                    seen.append(event)
                    if isinstance(event, p.PrefaceReply):
                        stream.conn.send(p.Hello("t"))
                    elif isinstance(event, p.Ready):
                        stream.conn.send(p.Request("get_stripe", {}))
                        stream.conn.send(p.End())
                while not stream.at_eof:  # the peer's close is seen, unasked
                    await asyncio.sleep(0.01)
            return paused, seen

    paused, events = asyncio.run(run())
    assert paused
    assert payloads_of(events) == b"".join(payloads)


def test_a_clean_close_after_a_whole_response_is_an_end() -> None:
    handle = sends(server_bytes([os.urandom(1000)]))

    async def run() -> object:
        async with connected(handle) as stream:
            async with asyncio.timeout(5):
                await events_until_end(stream)
                assert stream.next_event() is p.NEED_DATA
                assert await stream.receive() is False  # an end, not an error
            stream.conn.receive_data(b"")
            return stream.next_event()

    assert isinstance(asyncio.run(run()), p.ConnectionClosed)


def test_writing_waits_while_the_peer_does_not_read() -> None:
    started = asyncio.Event()
    got: list[int] = []
    total = 32 * 1024 * 1024

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await started.wait()
        while len(data := await reader.read(1 << 20)):
            got.append(len(data))
        writer.close()

    async def run() -> None:
        async with connected(handle) as stream:
            sock = stream._transport.get_extra_info("socket") if stream._transport else None
            assert sock is not None
            # A small send buffer (no autotuning): the bytes cannot all leave.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            stream.write(os.urandom(total))  # more than the socket buffers hold
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await stream.drain()  # the peer is not reading
            started.set()
            async with asyncio.timeout(10):
                await stream.drain()  # and goes on once it does
            assert stream._drained is None  # nothing left waiting

    asyncio.run(run())
    assert sum(got) > 0


@pytest.mark.parametrize("tls", [False, True])
def test_writing_after_the_peer_closed_does_not_seem_to_succeed(tmp_path: Path, tls: bool) -> None:
    setup = init_setup(tmp_path / "setup") if tls else None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # a clean close

    async def run() -> None:
        async with connected(handle, setup) as stream:
            async with asyncio.timeout(5):
                assert await stream.receive() is False
            with contextlib.suppress(ConnectionError):  # if it is known lost already
                stream.write(b"x")
            with pytest.raises(ConnectionError):
                await stream.drain()

    asyncio.run(run())


def test_a_connection_cut_mid_frame_is_not_an_end() -> None:
    wire = server_bytes([os.urandom(100_000)])

    handle = sends(wire[:-50_000])  # stops in the middle of the DATA frame

    async def run() -> None:
        async with connected(handle) as stream:
            with pytest.raises(p.ProtocolViolation, match="middle of a frame"):
                await events_until_end(stream)
            assert stream.at_eof
            assert await stream.receive() is False  # and stays at its end

    asyncio.run(run())


def test_writing_to_a_lost_connection_raises() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # a reset, not a clean close

    async def run() -> None:
        async with connected(handle) as stream:
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionError):  # a reset, or just the end
                    assert await stream.receive() is False
                await stream.wait_closed()
            with pytest.raises(ConnectionError):
                stream.write(b"x")
            with pytest.raises(ConnectionError):
                await stream.drain()

    asyncio.run(run())


def test_a_reader_waiting_for_bytes_can_be_timed_out() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)  # says nothing
        writer.close()

    async def run() -> None:
        async with connected(handle) as stream:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stream.receive()
            assert stream._arrived is None  # nothing left waiting

    asyncio.run(run())


def test_a_reset_connection_raises_for_the_reader() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # closed with lingering off: a reset, not an end

    async def run() -> None:
        async with connected(handle) as stream:
            async with asyncio.timeout(5):
                with pytest.raises(ConnectionResetError):
                    await stream.receive()
                with pytest.raises(ConnectionResetError):
                    await stream.receive()  # and again: it does not turn into an end

    asyncio.run(run())
