"""Connection limits, the HTTPS header time-out, the stripe size limit and id checks, on
live servers: what is over a limit is refused at once, and everyone else is still served."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from splitstore._limits import PeerCounter, peer_key

from .conftest import TEST_LIMITS, LiveServers, LoopThread
from .test_server_robustness import (
    DATA,
    END,
    ERROR,
    HELLO,
    REQUEST,
    assert_still_serving,
    frame,
    json_frame,
    recv_all,
    status,
)

OID, VID = "ab" * 32, "cd" * 16
# Other loopback addresses stand for other clients (Linux routes all of 127/8 to lo).
OTHER_CLIENT, THIRD_CLIENT = "127.0.0.2", "127.0.0.3"

StartServers = Callable[..., LiveServers]


@pytest.fixture
def start_servers(tmp_path: Path, loop_thread: LoopThread) -> Iterator[StartServers]:
    """Start both servers of a fresh setup with TEST_LIMITS changed as given."""
    started: list[LiveServers] = []

    def start(**changes: Any) -> LiveServers:
        live = LiveServers(
            tmp_path / f"setup{len(started)}", loop_thread, replace(TEST_LIMITS, **changes)
        )
        live.start()
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


# -- helpers -----------------------------------------------------------------------------


def connect(servers: LiveServers, kind: str, source: str = "127.0.0.1") -> socket.socket:
    port = servers.config.server(kind).port  # type: ignore[arg-type]
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    except OSError as exc:  # no 127.0.0.2 on this system (macOS has only 127.0.0.1)
        pytest.skip(f"cannot connect from {source}: {exc}")


def tls(servers: LiveServers, raw: socket.socket) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(servers.paths.ca_cert))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def tls_connect(servers: LiveServers, kind: str, source: str = "127.0.0.1") -> ssl.SSLSocket:
    return tls(servers, connect(servers, kind, source))


def refused(servers: LiveServers, kind: str, source: str = "127.0.0.1") -> bool:
    """Whether the server closes a new connection before its TLS handshake completes."""
    raw = connect(servers, kind, source)
    try:
        sock = tls(servers, raw)
    except OSError:  # reset, or EOF in the handshake (ssl.SSLError is an OSError)
        return True
    sock.close()
    return False


def eventually_admitted(servers: LiveServers, kind: str, source: str = "127.0.0.1") -> bool:
    """A freed slot is given back once the server has seen the close: poll for it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not refused(servers, kind, source):
            return True
        time.sleep(0.05)
    return False


def tcp_session(servers: LiveServers, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TCP connection past preface and HELLO."""
    sock = tls_connect(servers, "tcp", source)
    sock.sendall(b"SPST\x02\x02\x00\x00" + json_frame(HELLO, {"token": servers.config.token()}))
    reply = read_exactly(sock, 8 + 5)
    assert reply[8] == 0x02  # READY
    read_exactly(sock, struct.unpack(">I", reply[9:13])[0])
    return sock


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed early")
        out += chunk
    return out


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    head = read_exactly(sock, 5)
    return head[0], read_exactly(sock, struct.unpack(">I", head[1:])[0])


def tcp_ping(sock: socket.socket) -> None:
    sock.sendall(json_frame(REQUEST, {"op": "ping"}) + frame(END, b""))
    kind, payload = read_frame(sock)
    assert (kind, json.loads(payload)) == (0x11, {"status": "ok"})  # RESPONSE
    assert read_frame(sock)[0] == END


def https_request(servers: LiveServers, head: str, body: bytes = b"") -> bytes:
    """One request on its own connection (closed after it); the raw reply."""
    sock = tls_connect(servers, "https")
    sock.sendall(http_head(servers, head) + b"Connection: close\r\n\r\n" + body)
    return recv_all(sock, limit=30)


def http_head(servers: LiveServers, request_line: str) -> bytes:
    token = servers.config.token()
    return f"{request_line}\r\nHost: x\r\nAuthorization: Bearer {token}\r\n".encode()


def https_ping(servers: LiveServers, sock: ssl.SSLSocket) -> None:
    """A ping on a kept-alive connection."""
    sock.sendall(http_head(servers, "GET /v1/ping HTTP/1.1") + b"\r\n")
    reply = read_http_reply(sock)
    assert status(reply) == 200, reply


def read_http_reply(sock: socket.socket) -> bytes:
    """One reply with a Content-Length body, leaving the connection usable."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + b"\r\n\r\n" + body + read_exactly(sock, length - len(body))


# -- the counting itself -------------------------------------------------------------------


def test_peer_key() -> None:
    assert peer_key(("192.0.2.7", 5000)) == "192.0.2.7"
    assert peer_key(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    # One IPv6 client per /64, whatever address of it connects.
    assert peer_key(("2001:db8:1:2::5", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:2:ffff::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:3::5", 1, 0, 0)) == "2001:db8:1:3::/64"
    for gone in (None, (), "", ("not an address", 1), (b"1.2.3.4", 1)):
        assert peer_key(gone) is None


def test_peer_counter() -> None:
    counter = PeerCounter(max_total=3, max_per_peer=2)
    assert counter.admit("a")
    assert counter.admit("a")
    assert not counter.admit("a")  # per client
    assert counter.admit("b")
    assert not counter.admit("c")  # in total
    counter.release("a")
    assert counter.admit("c")
    for peer in ("a", "b", "c"):
        counter.release(peer)
    assert (counter.total, counter.count("a"), counter._per_peer) == (0, 0, {})


# -- per client and total connection limits ------------------------------------------------


@pytest.mark.parametrize("kind", ["https", "tcp"])
def test_per_client_limit(start_servers: StartServers, kind: str, tmp_path: Path) -> None:
    servers = start_servers(max_connections_per_client=3, header_timeout=60.0, idle_timeout=60.0)
    if kind == "tcp":
        held = [tcp_session(servers) for _ in range(3)]
    else:
        held = [tls_connect(servers, "https") for _ in range(3)]
    try:
        assert refused(servers, kind)
        assert refused(servers, kind)
        # Another client is served meanwhile, and so are the held connections.
        other = tcp_session(servers, OTHER_CLIENT) if kind == "tcp" else None
        if other is not None:
            tcp_ping(other)
            tcp_ping(held[0])
            other.close()
        else:
            with tls_connect(servers, "https", OTHER_CLIENT) as sock:
                https_ping(servers, sock)
            https_ping(servers, held[0])
        # A closed connection gives its slot back.
        held.pop().close()
        assert eventually_admitted(servers, kind)
    finally:
        for sock in held:
            sock.close()
    with servers.client() as client:
        assert_still_serving(client, tmp_path)


@pytest.mark.parametrize("kind", ["https", "tcp"])
def test_total_limit(start_servers: StartServers, kind: str) -> None:
    servers = start_servers(max_connections=4, max_connections_per_client=3, idle_timeout=60.0)
    held = [tls_connect(servers, kind) for _ in range(3)]
    held.append(tls_connect(servers, kind, OTHER_CLIENT))
    try:
        assert refused(servers, kind, OTHER_CLIENT)
        assert refused(servers, kind, THIRD_CLIENT)
        held.pop(0).close()
        assert eventually_admitted(servers, kind, THIRD_CLIENT)
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("kind", ["https", "tcp"])
def test_connections_count_from_before_their_tls_handshake(
    start_servers: StartServers, kind: str
) -> None:
    # Plain TCP connections that never start TLS hold their slots until the handshake
    # time-out: a client cannot stack up handshakes beyond its limit.
    servers = start_servers(max_connections_per_client=3, handshake_timeout=30.0)
    silent = [connect(servers, kind) for _ in range(3)]
    try:
        assert refused(servers, kind)
        assert not refused(servers, kind, OTHER_CLIENT)
    finally:
        for sock in silent:
            sock.close()
    assert eventually_admitted(servers, kind)


def test_unfinished_handshakes_give_their_slots_back(start_servers: StartServers) -> None:
    servers = start_servers(max_connections_per_client=2, handshake_timeout=1.0)
    silent = [connect(servers, "https") for _ in range(2)]
    assert refused(servers, "https")
    for sock in silent:  # dropped by the server at its handshake time-out
        assert recv_all(sock, limit=20) == b""
        sock.close()
    assert eventually_admitted(servers, "https")


# -- the HTTPS header time-out (slowloris) -------------------------------------------------


def trickle(sock: socket.socket, data: bytes, pause: float) -> float | None:
    """Send ``data`` a byte at a time; the seconds after which the server hung up, or None
    if it took everything."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            sock.settimeout(pause)
            try:
                if not sock.recv(4096):
                    return time.monotonic() - started
            except TimeoutError:
                continue
        except OSError:  # reset
            return time.monotonic() - started
        pytest.fail("the server answered a request whose headers were not complete")
    return None


def test_slow_headers_are_dropped_while_others_are_served(
    start_servers: StartServers, tmp_path: Path
) -> None:
    servers = start_servers(header_timeout=2.0, idle_timeout=30.0)
    request = http_head(servers, "GET /v1/ping HTTP/1.1") + b"X-Slow: " + b"z" * 60
    slow = [tls_connect(servers, "https") for _ in range(3)]
    dropped_after: list[float | None] = [None] * len(slow)

    def slowloris(i: int) -> None:
        dropped_after[i] = trickle(slow[i], request, pause=0.5)

    threads = [threading.Thread(target=slowloris, args=(i,)) for i in range(len(slow))]
    for thread in threads:
        thread.start()
    try:
        with servers.client() as client:
            assert_still_serving(client, tmp_path)
        with tls_connect(servers, "https") as sock:
            for _ in range(3):
                https_ping(servers, sock)
                time.sleep(0.3)
    finally:
        for thread in threads:
            thread.join(60)
        for sock in slow:
            sock.close()
    for seconds in dropped_after:
        # Dropped at the header time-out (2 s), well before the 40 s the request needs.
        assert seconds is not None
        assert seconds < 2.0 + 10


def test_header_time_out_spares_slow_bodies_and_idle_keep_alive(
    start_servers: StartServers,
) -> None:
    servers = start_servers(header_timeout=1.5, idle_timeout=30.0)
    sock = tls_connect(servers, "https")
    # A body trickled for longer than the header time-out: it is the idle time-out's
    # business (each piece arrives well within it), not the header time-out's.
    body = b"0123456"
    sock.sendall(
        http_head(servers, f"PUT /v1/objects/{OID}/stripes/{VID} HTTP/1.1")
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    for byte in body:
        time.sleep(0.4)
        sock.sendall(bytes([byte]))
    reply = read_http_reply(sock)
    assert status(reply) == 201, reply
    # Idle between requests for longer than the header time-out: still usable.
    time.sleep(2.5)
    https_ping(servers, sock)
    # But a later request's headers are timed from their first byte.
    started = time.monotonic()
    assert trickle(sock, b"GET /v1/ping HTTP/1.1\r\nX-Slow: " + b"z" * 60, 0.3) is not None
    assert time.monotonic() - started < 1.5 + 10
    sock.close()


# -- the stripe size limit -----------------------------------------------------------------


def test_https_stripe_over_the_limit_is_refused_before_its_body(
    start_servers: StartServers,
) -> None:
    servers = start_servers(max_stripe_bytes=1000)
    sock = tls_connect(servers, "https")
    sock.sendall(
        http_head(servers, f"PUT /v1/objects/{OID}/stripes/{VID} HTTP/1.1")
        + b"Content-Length: 1001\r\n\r\n"
    )
    reply = read_http_reply(sock)  # sent no body at all: refused at once
    assert status(reply) == 413
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "too_large"
    sock.close()
    head = f"PUT /v1/objects/{OID}/stripes/{VID} HTTP/1.1"
    reply = https_request(servers, head + "\r\nContent-Length: 1000", b"x" * 1000)
    assert status(reply) == 201


def test_tcp_stripe_over_the_limit_is_refused_before_its_body(
    start_servers: StartServers,
) -> None:
    servers = start_servers(max_stripe_bytes=1000)
    put = {"op": "put_stripe", "object_id": OID, "version_id": VID}
    sock = tcp_session(servers)
    sock.sendall(json_frame(REQUEST, {**put, "length": 1001}))
    kind, payload = read_frame(sock)  # refused before any of its body was sent
    assert kind == ERROR
    assert json.loads(payload)["code"] == "too_large"
    sock.close()
    sock = tcp_session(servers)
    sock.sendall(json_frame(REQUEST, {**put, "length": 1000}) + frame(DATA, b"x" * 1000))
    sock.sendall(frame(END, b""))
    kind, payload = read_frame(sock)
    assert kind == 0x11
    assert json.loads(payload)["length"] == 1000
    sock.close()


# -- ids never reach outside the data folder -----------------------------------------------

BAD_IDS = [
    "..",
    "../" + "a" * 61,
    "/etc/passwd",
    "/" + "a" * 63,
    "a" * 63 + "\x00",
    "a" * 63 + "/",
    "a" * 64 + "\n",
    "\u0661" * 64,  # Arabic-Indic digit one: a digit to str.isdigit, not to the id check
    "\uff41" * 64,  # fullwidth "a"
    "é" * 32,
    "a" * 10_000,
    "A" * 64,
    "%2e%2e" + "a" * 58,
]


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_tcp_bad_ids_never_touch_the_disk(start_servers: StartServers, tmp_path: Path) -> None:
    servers = start_servers()
    before = files_under(tmp_path)
    sock = tcp_session(servers)
    for bad in BAD_IDS:
        simple: list[dict[str, object]] = [
            {"op": "get_record", "object_id": bad},
            {"op": "delete", "object_id": bad},
            {"op": "commit", "object_id": bad, "version_id": VID},
            {"op": "commit", "object_id": OID, "version_id": bad},
            {"op": "get_stripe", "object_id": OID, "version_id": bad},
        ]
        for fields in simple:
            sock.sendall(json_frame(REQUEST, fields) + frame(END, b""))
            kind, payload = read_frame(sock)
            assert kind == ERROR, (fields, payload)
            assert json.loads(payload)["code"] == "bad_request", fields
        puts: list[dict[str, object]] = [
            {"op": "put_stripe", "object_id": bad, "version_id": VID, "length": 1},
            {"op": "put_stripe", "object_id": OID, "version_id": bad, "length": 1},
        ]
        for fields in puts:
            # Refused before its body, which closes the connection.
            with tcp_session(servers) as put:
                put.sendall(json_frame(REQUEST, fields))
                kind, payload = read_frame(put)
                assert kind == ERROR, (fields, payload)
                assert json.loads(payload)["code"] == "bad_request", fields
    sock.close()
    assert files_under(tmp_path) == before


def test_https_bad_ids_never_touch_the_disk(start_servers: StartServers, tmp_path: Path) -> None:
    servers = start_servers()
    before = files_under(tmp_path)
    for bad in BAD_IDS:
        quoted = "".join(chr(b) if chr(b).isalnum() else f"%{b:02X}" for b in bad.encode())
        forms = [quoted] if any(c in bad for c in "\x00\n ") else [quoted, bad]
        for form in forms:
            for request in (
                f"GET /v1/objects/{form}/record HTTP/1.1",
                f"DELETE /v1/objects/{form} HTTP/1.1",
                f"GET /v1/objects/{OID}/stripes/{form} HTTP/1.1",
            ):
                reply = https_request(servers, request)
                assert status(reply) in (400, 404), (request, reply[:200])
            put = f"PUT /v1/objects/{form}/stripes/{VID} HTTP/1.1\r\nContent-Length: 1"
            reply = https_request(servers, put, b"x")
            assert status(reply) in (400, 404, 405), (put, reply[:200])
    assert files_under(tmp_path) == before
