"""Large stripes fetched on blocking connections in bulk threads (``_bulk``)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from splitstore import NotFoundError, ServerError, ServerUnavailableError, TLSVerificationError
from splitstore import _protocol as p
from splitstore._bulk import BULK_READ_MIN_BYTES, BULK_THREADS, in_bulk_thread
from splitstore._http_bulk import HttpBulkOpener
from splitstore._http_client import HttpsRemote
from splitstore._pipeline import PieceSink
from splitstore._remote import Remote, connection_error, why_unreachable
from splitstore._tcp_bulk import TcpBulkOpener
from splitstore._tcp_client import TcpRemote
from splitstore._tls import client_ssl_context, server_ssl_context

from .conftest import LiveServers

KINDS = ["https", "tcp"]
OID, VID = "a" * 64, "b" * 32
STRIPE = 2 * BULK_READ_MIN_BYTES  # what the scripted peers announce


def spy_on_opens(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record each bulk connection opened: its kind, and the thread that opened it."""
    opened: list[tuple[str, str]] = []
    for kind, opener in (("https", HttpBulkOpener), ("tcp", TcpBulkOpener)):
        real = opener.open

        def spying(self: Any, *args: Any, _kind: str = kind, _real: Any = real) -> Any:
            opened.append((_kind, threading.current_thread().name))
            return _real(self, *args)

        monkeypatch.setattr(opener, "open", spying)
    return opened


def test_a_large_file_is_fetched_over_bulk_connections(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = spy_on_opens(monkeypatch)
    big, small = os.urandom(3 * BULK_READ_MIN_BYTES + 12345), os.urandom(100_000)
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "small").write_bytes(small)
    with servers.client() as client:
        client.store(tmp_path / "big", "big")
        client.store(tmp_path / "small", "small")
        assert client.fetch("small", tmp_path / "small.out").read_bytes() == small
        assert opened == []  # small stripes stay on the pooled connections
        assert client.fetch("big", tmp_path / "big.out").read_bytes() == big
    assert sorted(kind for kind, _ in opened) == KINDS
    assert all(thread.startswith("splitstore-bulk") for _, thread in opened)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_stripe_is_not_found(servers: LiveServers, kind: str) -> None:
    expect_on_open(remote_for(servers, kind), NotFoundError)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bulk_connection_checks_the_certificate(
    servers: LiveServers, kind: str, tmp_path: Path
) -> None:
    from splitstore._setup import generate_ca

    (tmp_path / "other-ca.pem").write_bytes(generate_ca("some other CA").cert_pem)
    remote = remote_for(servers, kind, ca=tmp_path / "other-ca.pem")
    expect_on_open(remote, TLSVerificationError, match="cannot trust")


def expect_on_open(remote: Remote, error: type[Exception], match: str | None = None) -> None:
    """Opening a large stripe of ``remote`` raises ``error``."""

    async def scenario() -> None:
        try:
            with pytest.raises(error, match=match):
                async with remote.get_stripe(OID, VID, expected_length=STRIPE):
                    pass
        finally:
            await remote.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_a_peer_gone_in_the_handshake_is_not_a_trust_problem(
    servers: LiveServers, kind: str
) -> None:
    """A server that closes the connection during the TLS handshake is unavailable, as
    on the pooled connections; it says nothing about its certificate."""

    async def scenario() -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)  # the ClientHello
            writer.close()

        peer = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = peer.sockets[0].getsockname()[1]
        remote = remote_for(servers, kind, port=port)
        try:
            with pytest.raises(ServerUnavailableError, match="closed the connection"):
                async with remote.get_stripe(OID, VID, expected_length=STRIPE):
                    pass
        finally:
            await remote.close()
            peer.close()

    asyncio.run(scenario())


def test_tls_errors_in_a_body_are_the_connection_failing() -> None:
    """Past the handshake a TLS error is the connection failing, not distrust."""
    bad_mac = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")
    assert type(connection_error(bad_mac, "x", in_body=True)) is ServerUnavailableError
    assert type(connection_error(bad_mac, "x")) is TLSVerificationError
    for in_body in (False, True):
        gone = connection_error(ssl.SSLEOFError(8, "EOF"), "x", in_body=in_body)
        assert type(gone) is ServerUnavailableError
        assert "closed the connection" in str(gone)


UNKNOWN_HOST = "no-such-host.invalid"


@pytest.mark.parametrize("path", ["pooled", "bulk"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_host_name_that_does_not_resolve_is_named_alike_everywhere(
    servers: LiveServers, monkeypatch: pytest.MonkeyPatch, kind: str, path: str
) -> None:
    """The pooled connections (aiohttp's for HTTPS, ours for TCP) and the bulk ones say
    the same: no connection could be opened, because the name does not resolve. (The
    resolver is made to fail for that one name, so no test asks a DNS server.)"""
    real = asyncio.BaseEventLoop.getaddrinfo

    async def resolve(self: asyncio.BaseEventLoop, host: Any, *args: Any, **kw: Any) -> Any:
        if host == UNKNOWN_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await real(self, host, *args, **kw)

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", resolve)
    remote = remote_for(servers, kind, host=UNKNOWN_HOST)
    match = f"^cannot connect to the {kind} server at {UNKNOWN_HOST}:[0-9]+: cannot resolve "
    match += r"its host name \(Name or service not known\)$"
    if path == "bulk":
        expect_on_open(remote, ServerUnavailableError, match=match)
        return

    async def scenario() -> None:
        try:
            with pytest.raises(ServerUnavailableError, match=match):
                await remote.ping()
        finally:
            await remote.close()

    asyncio.run(scenario())


def test_a_refused_connection_is_worded_alike_by_errno_or_type() -> None:
    """aiohttp hands over a plain OSError when every address refused; ours, the type."""
    for exc in (ConnectionRefusedError(111, "refused"), OSError(errno.ECONNREFUSED, "x")):
        assert str(connection_error(exc, "x")) == "cannot connect to the x: connection refused"
    assert why_unreachable(OSError(errno.EPIPE, "Broken pipe")) is None


def test_a_cancelled_connect_ends_at_once(servers: LiveServers) -> None:
    """A listener whose queue is full never answers a connect (its SYN is dropped)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)

    remote = remote_for(servers, "tcp", port=address[1], connect_timeout=60.0)
    try:
        assert asyncio.run(cancel_an_open(remote)) < 5
    finally:
        for sock in (listener, *fillers):
            sock.close()


def test_a_cancelled_call_still_queued_for_a_bulk_thread_never_runs() -> None:
    """With every bulk thread busy, a cancelled call is dropped from the queue at once,
    rather than waiting for a thread only to stop at its first step."""
    release = threading.Event()
    ran = threading.Event()
    stopped = threading.Event()
    # A thread for the queued call in 3 s at the latest, were it left queued.
    timer = threading.Timer(3.0, release.set)

    async def scenario() -> float:
        busy = [
            asyncio.ensure_future(in_bulk_thread(release.wait, release.set))
            for _ in range(BULK_THREADS)
        ]
        await asyncio.sleep(0.2)  # every thread is now waiting on ``release``
        queued = asyncio.ensure_future(in_bulk_thread(ran.set, stopped.set))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        timer.start()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        took = time.monotonic() - started
        release.set()
        await asyncio.gather(*busy)
        return took

    try:
        assert asyncio.run(scenario()) < 1.0
    finally:
        timer.cancel()
        release.set()
    time.sleep(0.1)  # had it been left queued, a thread would run it now
    assert not ran.is_set()
    assert not stopped.is_set()  # nothing was running that needed stopping


def test_a_response_that_closes_the_connection_leaves_no_socket_open(
    servers: LiveServers,
) -> None:
    """http.client hands the socket to a response that says ``Connection: close``."""
    paths = servers.paths

    async def scenario() -> tuple[int, int]:
        held: list[asyncio.StreamWriter] = []

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % STRIPE + b"y" * STRIPE
            )
            await writer.drain()

        ctx = server_ssl_context(paths.server_cert, paths.server_key)
        peer = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
        port = peer.sockets[0].getsockname()[1]
        remote = remote_for(servers, "https", port=port)
        try:
            before = len(os.listdir("/proc/self/fd"))
            async with remote.get_stripe(OID, VID, expected_length=STRIPE) as stripe:
                await stripe.read(1000)  # the rest is never read
            for writer in held:  # the peer's side of the connection: not the client's
                writer.transport.abort()
            await asyncio.sleep(0.1)
            return before, len(os.listdir("/proc/self/fd"))
        finally:
            await remote.close()
            peer.close()

    before, after = asyncio.run(scenario())
    assert after == before


# -- peers that misbehave mid-body -----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_stalled_bulk_read_times_out(servers: LiveServers, kind: str) -> None:
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="timed out"):
        read_from_peer(servers, kind, stall=True, io_timeout=1.0)
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("kind", KINDS)
def test_a_body_cut_short_is_the_server_going_away(servers: LiveServers, kind: str) -> None:
    with pytest.raises(ServerUnavailableError, match="closed the connection mid-transfer"):
        read_from_peer(servers, kind, stall=False, io_timeout=10.0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_bulk_read_ends_its_thread_at_once(servers: LiveServers, kind: str) -> None:
    """The read's thread is blocked in recv with a long time-out: cancelling the read shuts
    the socket down, so the cancellation is through in well under that time-out."""

    took = read_from_peer(servers, kind, stall=True, io_timeout=60.0, around=cancel_soon)
    assert took < 5


async def cancel_an_open(remote: Remote) -> float:
    """Open a large stripe of ``remote`` and cancel that soon; how long the cancel took."""

    async def open_stripe() -> None:
        async with remote.get_stripe(OID, VID, expected_length=STRIPE):
            pass

    try:
        return await cancel_soon(open_stripe())
    finally:
        await remote.close()


async def cancel_soon(work: Awaitable[Any]) -> float:
    """Start ``work``, cancel it half a second later; how long the cancellation took."""
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0.5)
    assert not task.done()
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - started


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", ["handshake", "reply"])
def test_a_cancelled_open_ends_at_once(servers: LiveServers, kind: str, stage: str) -> None:
    """Cancelled while the connection is being opened (the peer never finishes the TLS
    handshake, or never answers the request), with long time-outs: through at once."""
    paths = servers.paths

    async def scenario() -> float:
        held: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await reader.read(65536)
            await asyncio.sleep(120)

        tls = (
            None
            if stage == "handshake"
            else server_ssl_context(paths.server_cert, paths.server_key)
        )
        peer = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=tls)
        port = peer.sockets[0].getsockname()[1]
        remote = remote_for(servers, kind, port=port, io_timeout=60.0, connect_timeout=60.0)
        try:
            return await cancel_an_open(remote)
        finally:
            for writer in held:
                writer.transport.abort()
            peer.close()

    assert asyncio.run(scenario()) < 5


def read_from_peer(
    servers: LiveServers,
    kind: str,
    *,
    stall: bool,
    io_timeout: float,
    around: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
) -> Any:
    """Read a stripe from a peer that sends a third of its body, then stalls (``stall``)
    or closes the connection."""
    paths = servers.paths

    async def scenario() -> Any:
        answer = _http_peer if kind == "https" else _tcp_peer
        held: list[asyncio.StreamWriter] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await answer(reader, writer)
            if stall:
                await asyncio.sleep(120)
            writer.close()

        ctx = server_ssl_context(paths.server_cert, paths.server_key)
        peer = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
        port = peer.sockets[0].getsockname()[1]
        remote = remote_for(servers, kind, port=port, io_timeout=io_timeout)

        async def read() -> None:
            async with remote.get_stripe(OID, VID, expected_length=STRIPE) as stripe:
                await stripe.read(STRIPE)

        try:
            return await (around or (lambda aw: aw))(read())
        finally:
            await remote.close()
            for writer in held:
                writer.transport.abort()
            peer.close()

    return asyncio.run(scenario())


async def _http_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % STRIPE + b"x" * (STRIPE // 3)
    )
    await writer.drain()


async def _tcp_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = p.Connection(p.Role.SERVER)

    async def next_event() -> Any:
        while (event := conn.next_event()) is p.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        return event

    await next_event()  # PREFACE
    writer.write(conn.send(p.PrefaceReply(p.PROTOCOL_VERSION)))
    await next_event()  # HELLO
    writer.write(conn.send(p.Ready({})))
    await next_event()  # REQUEST
    await next_event()  # END
    writer.write(conn.send(p.Response({"length": STRIPE})))
    writer.writelines(conn.send_data(b"x" * (STRIPE // 3)))
    await writer.drain()


def remote_for(
    servers: LiveServers,
    kind: str,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    ca: Path | None = None,
    io_timeout: float = 10.0,
    connect_timeout: float = 10.0,
) -> Remote:
    ctx = client_ssl_context(ca or servers.paths.ca_cert)
    port = port or servers.config.server(kind).port  # type: ignore[arg-type]
    token = servers.config.token()
    assert port is not None
    kind_of_remote = HttpsRemote if kind == "https" else TcpRemote
    return kind_of_remote(
        host, port, token, ctx, io_timeout=io_timeout, connect_timeout=connect_timeout
    )


@pytest.mark.parametrize("size", [200_000, 3 * BULK_READ_MIN_BYTES], ids=["pooled", "bulk"])
def test_a_local_failure_mid_fetch_is_not_blamed_on_a_server(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """An error raised by the fetch's own side while a stripe is open passes through the
    remote untranslated: a full disk is not the server's connection failing."""
    (tmp_path / "f").write_bytes(os.urandom(size))
    with servers.client() as client:
        client.store(tmp_path / "f", "f")

        def disk_full(self: PieceSink, pieces: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PieceSink, "take", disk_full)
        with pytest.raises(OSError, match="No space left") as info:
            client.fetch("f", tmp_path / "out")
    assert not isinstance(info.value, ServerError)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("call", ["get_record", "pooled stripe", "bulk stripe"])
def test_a_tcp_server_dripping_its_answer_times_out(servers: LiveServers, call: str) -> None:
    """A server that sends its answer a byte at a time, each well within the read
    time-out, is cut off by the deadline of the whole exchange (for a bulk connection,
    of the whole opening: its handshake is dripped too)."""

    async def scenario() -> float:
        held: list[asyncio.StreamWriter] = []

        async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            conn = p.Connection(p.Role.SERVER)

            async def next_event() -> Any:
                while (event := conn.next_event()) is p.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                return event

            async def slowly(data: bytes) -> None:
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0.2)

            async def quickly(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            handshake = slowly if call == "bulk stripe" else quickly
            await next_event()  # PREFACE
            await handshake(conn.send(p.PrefaceReply(p.PROTOCOL_VERSION)))
            await next_event()  # HELLO
            await handshake(conn.send(p.Ready({})))
            await next_event()  # REQUEST
            await next_event()  # END
            await slowly(conn.send(p.Response({"length": STRIPE, "padding": "x" * 200})))

        ctx = server_ssl_context(servers.paths.server_cert, servers.paths.server_key)
        peer = await asyncio.start_server(drip, "127.0.0.1", 0, ssl=ctx)
        port = peer.sockets[0].getsockname()[1]
        remote = remote_for(servers, "tcp", port=port, io_timeout=1.0, connect_timeout=2.0)
        try:
            return await timed_out_asking(remote, call)
        finally:
            for writer in held:
                writer.transport.abort()
            peer.close()

    assert asyncio.run(scenario()) < 10


async def timed_out_asking(remote: Remote, call: str) -> float:
    """Ask ``remote`` (``call``: ping, get_record, pooled stripe or bulk stripe), which
    must time out; how long that took. The remote is closed after."""

    async def ask() -> None:
        if call == "ping":
            await remote.ping()
        elif call == "get_record":
            await remote.get_record(OID)
        else:
            length = STRIPE if call == "bulk stripe" else 10
            async with remote.get_stripe(OID, VID, expected_length=length):
                pass

    started = time.monotonic()
    try:
        with pytest.raises(ServerUnavailableError, match="timed out"):
            await ask()
    finally:
        await remote.close()
    return time.monotonic() - started
