"""The client's connection fed straight from the transport: every byte reaches the codec
in order, or with partial_data the reader's own buffer; reading pauses while the codec
holds too much and resumes as the reader takes events, writing waits while the peer does
not read, and the end of a connection (clean, cut off, or with an error) is told apart.
A real loopback peer, plain and TLS."""

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
from splitstore._codec_stream import (
    HIGH_WATER,
    PARTIAL_HIGH_WATER,
    RECEIVE_BYTES,
    CodecStream,
    open_codec_stream,
)
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


def client_conn(*, partial_data: bool = False) -> p.Connection:
    """A client codec that has sent its preface (the rest is sent as the answers come)."""
    conn = p.Connection(p.Role.CLIENT, partial_data=partial_data)
    conn.send(p.Preface(2, 2))
    return conn


def sends(wire: bytes) -> Peer:
    """A peer that sends ``wire`` at once, then closes its side cleanly."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(wire)
        await writer.drain()
        writer.close()

    return handle


def sends_in_pieces(wire: bytes, size: int, pause: float = 0.0) -> Peer:
    """A peer that sends ``wire`` in pieces of ``size`` (cutting frames anywhere), with
    ``pause`` seconds between them (so that the reader waits now and then), then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(wire), size):
            writer.write(wire[i : i + size])
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        writer.close()

    return handle


def mixed_payloads() -> list[bytes]:
    """DATA payloads of one byte, a few, whole frames and odd sizes."""
    return [os.urandom(n) for n in (1, 1000, p.MAX_DATA_FRAME, 70_000, p.MAX_DATA_FRAME)]


@asynccontextmanager
async def peer(handle: Peer, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def connected(
    handle: Peer, setup: SetupPaths | None = None, *, partial_data: bool = False
) -> AsyncIterator[CodecStream]:
    """A client stream to a peer running ``handle``: TLS with ``setup``'s certificates."""
    server_ctx = server_ssl_context(setup.server_cert, setup.server_key) if setup else None
    async with peer(handle, server_ctx) as port:
        ctx = client_ssl_context(setup.ca_cert) if setup else None
        conn = client_conn(partial_data=partial_data)
        stream = await open_codec_stream(conn, "127.0.0.1", port, ssl_context=ctx)
        try:
            yield stream
        finally:
            stream.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await stream.wait_closed()


async def events_until_end(
    stream: CodecStream, into: bytearray | None = None, direct: list[int] | None = None
) -> list[object]:
    """Every event of the exchange, reading as the client link does. With ``into``, the
    rest of a payload under way is received straight into it (after what it holds), each
    such receipt's size appended to ``direct``, and the bytes of Data events are added to
    it too: it ends up holding the whole body."""
    conn, seen = stream.conn, list[object]()
    while True:
        event = stream.next_event()
        if event is p.NEED_DATA:
            if into is not None and conn.payload_left:
                start = len(into)
                into.extend(bytes(conn.payload_left))
                with memoryview(into) as view:
                    got = await stream.receive_into(view[start:])
                del into[start + got :]
                if direct is not None:
                    direct.append(got)
                if not got:
                    conn.receive_data(b"")
            elif not await stream.receive():
                conn.receive_data(b"")
            continue
        if into is not None and isinstance(event, p.Data):
            into += event.payload
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
    payloads = mixed_payloads()
    handle = sends_in_pieces(server_bytes(payloads), 9_999)

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


@pytest.mark.parametrize("tls", [False, True])
def test_payload_bytes_arrive_straight_in_the_readers_buffer(tmp_path: Path, tls: bool) -> None:
    """With partial_data, a reader waiting in receive_into gets the rest of a payload
    decrypted (or received) straight into its buffer: the body is whole and in order, and
    most of it never passed through the codec."""
    setup = init_setup(tmp_path / "setup") if tls else None
    payloads = mixed_payloads()
    handle = sends_in_pieces(server_bytes(payloads), 99_999, pause=0.001)

    async def run() -> tuple[list[object], bytearray, list[int]]:
        body, direct = bytearray(), list[int]()
        async with connected(handle, setup, partial_data=True) as stream:
            events = await events_until_end(stream, body, direct)
        return events, body, direct

    events, body, direct = asyncio.run(run())
    assert isinstance(events[-1], p.End)
    assert body == b"".join(payloads)
    assert sum(direct) > len(body) // 2


def test_partial_data_reading_pauses_at_a_lower_mark() -> None:
    """No DATA frame needs to be whole, so a connection whose reader is busy elsewhere
    holds little: the rest waits in the kernel, and goes to the reader's buffer."""
    payloads = [os.urandom(p.MAX_DATA_FRAME) for _ in range(8)]
    handle = sends(server_bytes(payloads))

    async def run() -> tuple[int, bool, bytearray]:
        body = bytearray()
        async with connected(handle, partial_data=True) as stream:
            reading = not await paused_in_time(stream)  # nobody reads meanwhile
            held = stream.conn.buffered_bytes
            await events_until_end(stream, body)
            return held, reading, body

    held, reading, body = asyncio.run(run())
    assert PARTIAL_HIGH_WATER <= held <= PARTIAL_HIGH_WATER + RECEIVE_BYTES
    assert not reading
    assert body == b"".join(payloads)


def test_a_connection_cut_mid_payload_is_not_an_end_for_a_direct_reader() -> None:
    payload = os.urandom(1_000_000)
    handle = sends(server_bytes([payload])[:-500_000])  # stops in the middle of the DATA frame

    async def run() -> bytearray:
        body = bytearray()
        async with connected(handle, partial_data=True) as stream:
            with pytest.raises(p.ProtocolViolation, match="middle of a frame"):
                await events_until_end(stream, body)
            assert await stream.receive() is False  # and stays at its end
        return body

    body = asyncio.run(run())
    assert 0 < len(body) < len(payload)
    assert body == payload[: len(body)]


def test_a_serving_stream_answers_after_the_peers_eof_and_can_discard() -> None:
    """As the TCP server uses it (plain TCP): the session starts from on_connect, a
    client's half-close leaves our side open for the answer, and once discarding, what
    still arrives is read and dropped, never added to the codec's buffer."""
    preface = p.Connection(p.Role.CLIENT).send(p.Preface(2, 2))
    seen: list[object] = []
    held: list[int] = []

    async def serve(stream: CodecStream) -> None:
        while (event := stream.next_event()) is p.NEED_DATA:
            assert await stream.receive()
        seen.append(event)
        stream.discard_incoming()
        while await stream.receive():  # the rest of what the client sends, then its EOF
            held.append(stream.conn.buffered_bytes)
        stream.write(stream.conn.send(p.PrefaceReply(2)))
        await stream.drain()
        stream.close()

    async def run() -> bytes:
        tasks: list[asyncio.Task[None]] = []

        def factory() -> CodecStream:
            conn = p.Connection(p.Role.SERVER, partial_data=True)
            start = lambda s: tasks.append(asyncio.create_task(serve(s)))  # noqa: E731
            return CodecStream(conn, on_connect=start, half_close=True)

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(preface + os.urandom(3 * RECEIVE_BYTES))
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(10):
            answer = await reader.read()
            await asyncio.gather(*tasks)
        writer.close()
        server.close()
        await server.wait_closed()
        return answer

    answer = asyncio.run(run())
    assert seen == [p.Preface(2, 2)]
    assert held
    assert len(set(held)) == 1  # what came before discarding, and nothing since
    assert held[0] <= RECEIVE_BYTES
    assert answer.startswith(p.MAGIC)


def test_receive_into_refuses_when_no_payload_is_under_way() -> None:
    """Its 0 means the peer closed: a call that could only fill nothing is a mistake."""
    handle = sends(server_bytes([os.urandom(10)]))

    async def run() -> None:
        async with connected(handle, partial_data=True) as stream:
            assert stream.conn.payload_left == 0
            with pytest.raises(RuntimeError):
                await stream.receive_into(memoryview(bytearray(10)))

    asyncio.run(run())


def test_a_stripe_body_longer_than_announced_is_refused_not_drained_for_ever() -> None:
    """After its reader has taken a stripe's announced length, the rest of the body is
    read to reuse the connection: a server sending DATA without end is stopped at the
    first byte too many."""
    import asyncio

    from splitstore import ProtocolError
    from splitstore._tcp_client import _TcpStripe

    class Endless:
        remote = type("Remote", (), {"label": "tcp server at 127.0.0.1:1"})()
        sent = 0

        async def body(self) -> AsyncIterator[bytes]:
            while True:
                self.sent += 1
                yield b"x"

    link = Endless()
    stripe = _TcpStripe(link, 0)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="more than the 0 bytes"):
        asyncio.run(stripe.drain())
    assert link.sent == 1
