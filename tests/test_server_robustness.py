"""Servers under hostile or broken clients: they refuse clearly and go on serving others."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from splitstore import Client, ProtocolError, _service
from splitstore._digest import stripe_digest
from splitstore._serve import start_server
from splitstore._tls import server_ssl_context

from .conftest import TEST_LIMITS, LiveServers, LoopThread

HELLO, REQUEST, DATA, END, ERROR = 0x01, 0x10, 0x20, 0x21, 0x30


def tls_socket(servers: LiveServers, kind: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(servers.paths.ca_cert))
    port = servers.config.server(kind).port  # type: ignore[arg-type]
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def recv_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Read until the server closes (or ``limit`` seconds pass)."""
    sock.settimeout(limit)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    return out


def status(reply: bytes) -> int:
    """The status code of an HTTP reply (aiohttp answers parse errors as HTTP/1.0)."""
    return int(reply.split(b" ", 2)[1]) if reply else 0


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BI", kind, len(payload)) + payload


def json_frame(kind: int, doc: dict[str, object]) -> bytes:
    return frame(kind, json.dumps(doc).encode())


def tcp_handshake(servers: LiveServers, token: str | None = None) -> ssl.SSLSocket:
    sock = tls_socket(servers, "tcp")
    sock.sendall(b"SPST\x02\x02\x00\x00")
    assert sock.recv(8) == b"SPST\x02\x00\x00\x00"
    sock.sendall(json_frame(HELLO, {"token": token or servers.config.token()}))
    head = sock.recv(5)
    assert head[0] == 0x02  # READY
    sock.recv(struct.unpack(">I", head[1:])[0])
    return sock


def error_codes(data: bytes) -> list[str]:
    """The codes of the ERROR frames in a byte stream from the server."""
    codes, i = [], 0
    while i + 5 <= len(data):
        kind, length = struct.unpack(">BI", data[i : i + 5])
        payload = data[i + 5 : i + 5 + length]
        if kind == ERROR:
            codes.append(json.loads(payload)["code"])
        i += 5 + length
    return codes


def assert_still_serving(client: Client, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    (tmp_path / "probe").write_bytes(data)
    client.store(tmp_path / "probe", "probe")
    assert client.fetch("probe", tmp_path / "probe.out", force=True).read_bytes() == data


# -- TCP ---------------------------------------------------------------------------------


def test_tcp_garbage_bytes(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    sock = tls_socket(servers, "tcp")
    sock.sendall(os.urandom(4096))
    assert recv_all(sock) is not None  # the server answers or closes; it must not hang
    sock.close()
    assert_still_serving(client, tmp_path)


# 7..9: versions from the future; 1..1: a client from before stripe digests (version 1
# answered uploads with SHA-256s, which this server no longer makes).
@pytest.mark.parametrize("offer", [b"\x07\x09", b"\x01\x01"], ids=["newer", "version-1"])
def test_tcp_wrong_version_is_refused(servers: LiveServers, offer: bytes) -> None:
    sock = tls_socket(servers, "tcp")
    sock.sendall(b"SPST" + offer + b"\x00\x00")
    reply = recv_all(sock)
    assert reply[:8] == b"SPST\x00\x00\x00\x00"
    assert error_codes(reply[8:]) == ["unsupported_version"]
    assert b"speaks protocol version 2 only" in reply
    assert b"use a client of the same version" in reply


def test_tcp_wrong_token_is_refused(servers: LiveServers) -> None:
    sock = tls_socket(servers, "tcp")
    sock.sendall(b"SPST\x02\x02\x00\x00" + json_frame(HELLO, {"token": "not-the-token"}))
    reply = recv_all(sock)
    assert error_codes(reply[8:]) == ["unauthorized"]


def test_tcp_request_before_hello_is_refused(servers: LiveServers) -> None:
    sock = tls_socket(servers, "tcp")
    sock.sendall(b"SPST\x02\x02\x00\x00" + json_frame(REQUEST, {"op": "list"}) + frame(END, b""))
    reply = recv_all(sock)
    assert error_codes(reply[8:]) == ["bad_request"]


def test_tcp_oversized_frame_refused_before_payload(
    servers: LiveServers, client: Client, tmp_path: Path
) -> None:
    sock = tcp_handshake(servers)
    started = time.monotonic()
    sock.sendall(struct.pack(">BI", REQUEST, 2**31))  # claims 2 GiB, sends nothing more
    reply = recv_all(sock)
    assert error_codes(reply) == ["too_large"]
    assert time.monotonic() - started < TEST_LIMITS.idle_timeout  # refused at once
    assert_still_serving(client, tmp_path)


def test_tcp_upload_longer_than_declared(servers: LiveServers) -> None:
    sock = tcp_handshake(servers)
    oid, vid = "a" * 64, "b" * 32
    sock.sendall(
        json_frame(REQUEST, {"op": "put_stripe", "object_id": oid, "version_id": vid, "length": 10})
        + frame(DATA, b"x" * 20)
        + frame(END, b"")
    )
    # Refused once the whole request is in, the connection stays usable (until idle).
    assert error_codes(recv_all(sock))[0] == "bad_request"
    assert not list((servers.data_dir("tcp") / "tenants").glob("*/objects/*/*/*.stripe"))
    assert not list((servers.data_dir("tcp") / "tmp").iterdir())


def test_tcp_upload_longer_than_declared_is_refused_as_it_arrives(servers: LiveServers) -> None:
    """Not held until a batch is full or the body ends: refused at the first byte too many."""
    sock = tcp_handshake(servers)
    oid, vid = "a" * 64, "b" * 32
    started = time.monotonic()
    sock.sendall(
        json_frame(REQUEST, {"op": "put_stripe", "object_id": oid, "version_id": vid, "length": 10})
        + frame(DATA, b"x" * 20)  # and then nothing: no END
    )
    assert error_codes(recv_all(sock))[0] == "bad_request"
    assert time.monotonic() - started < TEST_LIMITS.idle_timeout
    assert not list((servers.data_dir("tcp") / "tmp").iterdir())


def read_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """The next ``count`` frames the server sends."""
    buf, frames = b"", list[tuple[int, bytes]]()
    while len(frames) < count:
        while len(buf) < 5 or len(buf) < 5 + struct.unpack(">I", buf[1:5])[0]:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed after {frames}"
            buf += chunk
        length = struct.unpack(">I", buf[1:5])[0]
        frames.append((buf[0], buf[5 : 5 + length]))
        buf = buf[5 + length :]
    return frames


def test_tcp_upload_in_tiny_frames_is_stored_whole(servers: LiveServers) -> None:
    """DATA frames of two bytes each: stored byte for byte (the server joins small pieces
    into one buffer per write batch rather than holding an object per frame)."""
    sock = tcp_handshake(servers)
    data = os.urandom(40_000)
    fields = {"op": "put_stripe", "object_id": "a" * 64, "version_id": "b" * 32}
    sock.sendall(
        json_frame(REQUEST, {**fields, "length": len(data)})
        + b"".join(frame(DATA, data[i : i + 2]) for i in range(0, len(data), 2))
        + frame(END, b"")
    )
    (kind, reply), _ = read_frames(sock, 2)
    assert kind == 0x11  # RESPONSE
    assert json.loads(reply)["digest"] == stripe_digest(data)


def test_tcp_batch_in_tiny_frames_costs_its_bytes(servers: LiveServers) -> None:
    """A batch's body (put_stripes, commit_records) is read whole before it is used: sent
    as two-byte DATA frames, it is held as its bytes, not as an object per frame (about
    35 bytes each, and a list slot)."""
    import tracemalloc

    sock = tcp_handshake(servers)
    data = os.urandom(400_000)
    stripe = {"object_id": "a" * 64, "version_id": "b" * 32, "length": len(data)}
    request = (
        json_frame(REQUEST, {"op": "put_stripes", "stripes": [stripe]})
        + b"".join(frame(DATA, data[i : i + 2]) for i in range(0, len(data), 2))
        + frame(END, b"")
    )
    tracemalloc.start()
    try:
        sock.sendall(request)
        (kind, reply), _ = read_frames(sock, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kind == 0x11  # RESPONSE
    assert json.loads(reply)["stripes"][0]["digest"] == stripe_digest(data)
    assert peak < 16 * len(data), f"{peak:,} bytes at the peak for {len(data):,}"


def test_small_upload_pieces_share_one_buffer_per_batch() -> None:
    batch: list[bytes | bytearray] = []
    large = os.urandom(_service.SMALL_PIECE_BYTES)
    pieces = [b"ab"] * 100_000 + [large] + [b"cd"] * 3
    for piece in pieces:
        _service._add_to_batch(batch, piece)
    assert len(batch) == 3
    assert b"".join(batch) == b"".join(pieces)


@pytest.mark.filterwarnings("ignore:the tcp server runs without TLS")
def test_tcp_answers_a_plain_clients_half_close(
    servers: LiveServers, loop_thread: LoopThread
) -> None:
    """Without TLS, a client that shuts down its sending side after its request still
    gets the answer (as it did through asyncio's streams): an upload, whose fsync lets
    the server see the end of the input before it answers."""
    servers.stop("tcp")
    spec = replace(servers.spec("tcp"), tls=False)
    plain = loop_thread.run(start_server(spec, TEST_LIMITS))
    data = os.urandom(1000)
    fields = {"op": "put_stripe", "object_id": "a" * 64, "version_id": "b" * 32}
    try:
        with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as sock:
            sock.sendall(
                b"SPST\x02\x02\x00\x00"
                + json_frame(HELLO, {"token": servers.config.token()})
                + json_frame(REQUEST, {**fields, "length": len(data)})
                + frame(DATA, data)
                + frame(END, b"")
            )
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(8) == b"SPST\x02\x00\x00\x00"
            ready, response, end = read_frames(sock, 3)
            assert ready[0] == 0x02
            assert response[0] == 0x11
            assert json.loads(response[1])["digest"] == stripe_digest(data)
            assert end == (END, b"")
    finally:
        loop_thread.run(plain.close())


@pytest.mark.parametrize("bad_id", ["../../../etc/passwd", "A" * 64, "a" * 63, "", 5])
def test_tcp_bad_ids_are_refused(servers: LiveServers, bad_id: object) -> None:
    sock = tcp_handshake(servers)
    sock.sendall(json_frame(REQUEST, {"op": "get_record", "object_id": bad_id}) + frame(END, b""))
    sock.settimeout(10)
    head = sock.recv(5)
    payload = sock.recv(struct.unpack(">I", head[1:])[0])
    assert head[0] == ERROR
    assert json.loads(payload)["code"] == "bad_request"


def test_tcp_silent_clients_are_dropped(
    servers: LiveServers, client: Client, tmp_path: Path
) -> None:
    silent = [tls_socket(servers, "tcp") for _ in range(5)]
    raw = socket.create_connection(("127.0.0.1", servers.config.server("tcp").port))
    assert_still_serving(client, tmp_path)  # others are served meanwhile
    started = time.monotonic()
    for sock in [*silent, raw]:
        recv_all(sock, limit=TEST_LIMITS.handshake_timeout + 10)
    # every silent connection was closed by the server, not by our read limit
    assert time.monotonic() - started < TEST_LIMITS.handshake_timeout + 8


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the tcp server runs without TLS")
def test_a_client_that_stops_reading_a_stripe_is_dropped(
    servers: LiveServers, loop_thread: LoopThread, tmp_path: Path
) -> None:
    """A client that asks for a large stripe and then reads nothing is dropped after the
    idle time-out, over HTTPS, TCP with TLS and TCP without: it must not hold the open
    stripe and its connection slot for ever (a graceful close would wait on it too)."""
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    with servers.client() as client:
        client.store(big, "big")
    # Beside the TLS one, on a copy of its data folder (a folder serves one server).
    shutil.copytree(servers.data_dir("tcp"), tmp_path / "plain")
    plain_spec = replace(servers.spec("tcp"), tls=False, port=0, data_dir=tmp_path / "plain")
    plain = loop_thread.run(start_server(plain_spec, TEST_LIMITS))
    token = servers.config.token()
    stalled: dict[str, tuple[socket.socket, int]] = {}
    try:
        for kind in ("https", "tcp", "plain tcp"):
            stripe = servers.stripe_path("https" if kind == "https" else "tcp", "big")  # ids
            oid, vid = stripe.parent.name, stripe.stem
            if kind == "https":
                sock: socket.socket = tls_socket(servers, "https")
                sock.sendall(
                    f"GET /v1/objects/{oid}/stripes/{vid} HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {token}\r\n\r\n".encode()
                )
            else:
                if kind == "tcp":
                    sock = tcp_handshake(servers)
                else:
                    sock = socket.create_connection(("127.0.0.1", plain.port), timeout=10)
                    sock.sendall(b"SPST\x02\x02\x00\x00" + json_frame(HELLO, {"token": token}))
                    assert sock.recv(8) == b"SPST\x02\x00\x00\x00"
                    read_frames(sock, 1)  # READY
                request: dict[str, object] = {
                    "op": "get_stripe",
                    "object_id": oid,
                    "version_id": vid,
                }
                sock.sendall(json_frame(REQUEST, request) + frame(END, b""))
            stalled[kind] = (sock, stripe.stat().st_size)
            assert sock.recv(100)  # the answer has begun; now nothing more is read
        # Still reading nothing: each server lets its connection go on its own.
        running = {"https": servers.running["https"], "tcp": servers.running["tcp"]}
        gates = {kind: cast(Any, server)._gate.counter for kind, server in running.items()}
        gates["plain tcp"] = cast(Any, plain)._gate.counter
        deadline = time.monotonic() + TEST_LIMITS.idle_timeout + 6
        while any(g.total for g in gates.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {kind: g.total for kind, g in gates.items()} == dict.fromkeys(gates, 0)
        for kind, (sock, length) in stalled.items():
            assert len(recv_all(sock, limit=10.0)) < length, f"{kind}: the whole stripe was sent"
    finally:
        for sock, _ in stalled.values():
            sock.close()
        loop_thread.run(plain.close())


def test_a_data_folder_serves_one_server_at_a_time(
    servers: LiveServers, loop_thread: LoopThread
) -> None:
    """A server started again on a folder in use (by mistake, twice) is refused before it
    touches anything: opening a folder empties its tmp/, where uploads are under way."""
    from splitstore import ConfigError

    upload = servers.data_dir("tcp") / "tmp" / "under-way.part"
    upload.write_bytes(b"half a stripe")
    again = replace(servers.spec("tcp"), port=0)
    with pytest.raises(ConfigError, match="another splitstore server is using it"):
        loop_thread.run(start_server(again, TEST_LIMITS))
    assert upload.read_bytes() == b"half a stripe"
    servers.stop("tcp")  # stopping gives the folder back
    loop_thread.run(loop_thread.run(start_server(again, TEST_LIMITS)).close())


def test_tcp_stalled_upload_times_out(servers: LiveServers) -> None:
    sock = tcp_handshake(servers)
    oid, vid = "c" * 64, "d" * 32
    sock.sendall(
        json_frame(REQUEST, {"op": "put_stripe", "object_id": oid, "version_id": vid, "length": 10})
        + frame(DATA, b"x" * 5)
    )
    assert error_codes(recv_all(sock, limit=TEST_LIMITS.idle_timeout + 10)) == ["timeout"]
    assert not list((servers.data_dir("tcp") / "tmp").iterdir())


def test_a_shutdown_during_an_upload_clean_up_still_removes_the_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client drops its upload while a batch is being written; the server then shuts
    down, which cancels every task, the clean-up waiting for that write included. The
    clean-up still waits for the write and removes the part-written stripe."""
    real_write, writing, release = _service._write_all, threading.Event(), threading.Event()

    def slow_write(upload: Any, pieces: list[bytes | bytearray]) -> None:
        writing.set()
        release.wait(10)  # held until the shutdown has begun, however slow the machine
        real_write(upload, pieces)

    monkeypatch.setattr(_service, "_write_all", slow_write)
    loop = LoopThread()
    live = LiveServers(tmp_path / "setup", loop)
    live.start()
    tmp = live.data_dir("tcp") / "tmp"
    try:
        sock = tcp_handshake(live)
        request = {"op": "put_stripe", "object_id": "c" * 64, "version_id": "d" * 32}
        sock.sendall(json_frame(REQUEST, {**request, "length": 8 << 20}))
        for _ in range(5):  # over one write batch: a write starts in its thread
            sock.sendall(frame(DATA, os.urandom(1 << 20)))
        assert writing.wait(10)
        sock.close()  # the upload fails; its clean-up waits for the write
        time.sleep(0.1)
        assert any(tmp.rglob("*")), "the part-written stripe is there"
    finally:
        threading.Timer(0.3, release.set).start()  # the write ends during the shutdown
        loop.close()  # cancels every task, as asyncio.run does on its way out
    assert not [f for f in tmp.rglob("*") if f.is_file()]


# -- HTTPS -------------------------------------------------------------------------------


def http_exchange(servers: LiveServers, request: bytes) -> bytes:
    sock = tls_socket(servers, "https")
    sock.sendall(request)
    return recv_all(sock, limit=TEST_LIMITS.idle_timeout + 5)


def test_https_healthz_needs_no_token(servers: LiveServers) -> None:
    reply = http_exchange(servers, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status(reply) == 200


def test_https_refuses_before_reading_the_body(servers: LiveServers) -> None:
    # Declares 1 GiB and sends none of it: the refusal must come at once.
    request = (
        b"PUT /v1/objects/" + b"a" * 64 + b"/stripes/" + b"b" * 32 + b" HTTP/1.1\r\n"
        b"Host: x\r\nContent-Length: 1073741824\r\n\r\n"
    )
    sock = tls_socket(servers, "https")
    sock.sendall(request)
    sock.settimeout(5)
    assert status(sock.recv(100)) == 401


def test_https_garbage_bytes(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    reply = http_exchange(servers, os.urandom(2000).replace(b"\n", b"") + b"\r\n\r\n")
    assert reply == b"" or status(reply) == 400
    assert_still_serving(client, tmp_path)


def test_https_oversized_header(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    # Over the 8,190-byte field limit but inside one TLS record, so the server has read
    # the whole request when it refuses it, and its reply is not lost to a reset.
    reply = http_exchange(servers, oversized_header_request(servers, 9_000))
    assert status(reply) in (400, 431)
    assert_still_serving(client, tmp_path)


def test_https_huge_header_is_cut_off(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    # A megabyte of header: the server refuses at its limit and closes, typically while
    # the rest is still being sent, so the send may fail or the reply be reset away.
    sock = tls_socket(servers, "https")
    try:
        sock.sendall(oversized_header_request(servers, 1_000_000))
    except (ConnectionError, ssl.SSLError):
        reply = b""
    else:
        reply = recv_all(sock, limit=TEST_LIMITS.idle_timeout + 5)
    assert reply == b"" or status(reply) in (400, 431)
    assert_still_serving(client, tmp_path)


def oversized_header_request(servers: LiveServers, size: int) -> bytes:
    token = servers.config.token()
    return (
        f"GET /v1/objects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"X-Big: {'y' * size}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    "path", ["/v1/objects/..%2F..%2Fetc/record", "/v1/objects/" + "Z" * 64 + "/record"]
)
def test_https_bad_ids_are_refused(servers: LiveServers, path: str) -> None:
    token = servers.config.token()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reply = http_exchange(servers, request)
    assert status(reply) in (400, 404)


def test_https_silent_clients_are_dropped(
    servers: LiveServers, client: Client, tmp_path: Path
) -> None:
    silent = [tls_socket(servers, "https") for _ in range(5)]
    assert_still_serving(client, tmp_path)
    started = time.monotonic()
    for sock in silent:
        assert recv_all(sock, limit=TEST_LIMITS.idle_timeout + 10) == b""
    assert time.monotonic() - started < TEST_LIMITS.idle_timeout + 8


def test_https_stalled_upload_times_out(servers: LiveServers) -> None:
    token = servers.config.token()
    request = (
        b"PUT /v1/objects/" + b"e" * 64 + b"/stripes/" + b"f" * 32 + b" HTTP/1.1\r\n"
        b"Host: x\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Length: 100\r\n\r\n" + b"x" * 10
    )
    reply = http_exchange(servers, request)
    assert status(reply) == 408
    assert not list((servers.data_dir("https") / "tmp").iterdir())


def test_a_client_told_of_an_older_tcp_server_says_to_match_versions(
    servers: LiveServers, tmp_path: Path
) -> None:
    """A TCP server of version 1 (before stripe digests) refuses this client's preface:
    the one line the user sees says which versions met and what to do."""
    context = server_ssl_context(servers.paths.server_cert, servers.paths.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def old_server() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            assert tls.recv(8) == b"SPST\x02\x02\x00\x00"
            tls.sendall(
                b"SPST\x00\x00\x00\x00"
                + json_frame(ERROR, {"code": "unsupported_version", "message": "v1 only"})
            )

    thread = threading.Thread(target=old_server, daemon=True)
    thread.start()
    config = tmp_path / "old-tcp.toml"
    text = servers.paths.config.read_text()
    tcp_port = servers.config.server("tcp").port
    config.write_text(text.replace(f"port = {tcp_port}\n", f"port = {port}\n"))
    for name in ("token", "key", "tls"):
        source = servers.paths.config.parent / name
        if source.exists() and not (tmp_path / name).exists():
            (tmp_path / name).symlink_to(source)
    (tmp_path / "in").write_bytes(b"x" * 5000)
    try:
        with Client(config) as client, pytest.raises(ProtocolError) as info:
            client.store(tmp_path / "in", "doc")
    finally:
        thread.join(10)
        listener.close()
    message = str(info.value)
    assert "speaks another protocol version (v1 only)" in message
    assert "this client, splitstore 0.2.0, speaks protocol version 2" in message
    assert "run the same splitstore version on the client and the servers" in message
