"""Fuzzing, sized to run in well under a minute: the TCP frame decoder, then both live
servers fed random and mutated input while a well-behaved client keeps using them.

tests/test_protocol.py holds the decoder's main properties (garbage only ever raises
ProtocolViolation, every header is judged on its own 5 bytes, mutated streams); here the
decoder is driven the way the TCP server drives it, with a tighter bound on what it buffers.

Each live example uses its own connection. The servers must answer or hang up within a
bound, never answer ``internal`` (500), never log an error, and keep serving: a client
pings them all along, and stores and fetches a file at the end. The deeper fuzzing of the
TCP server runs it without TLS, so that a client can half-close its side and the server
answers all it was sent and then hangs up, instead of waiting for a time-out (asyncio's TLS
cannot half-close); a shorter run sends garbage through TLS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitstore._codec_stream import RECEIVE_BYTES
from splitstore._digest import stripe_digest
from splitstore._names import is_object_id, is_version_id
from splitstore._protocol import (
    ERROR_CODES,
    HEADER_SIZE,
    MAX_DATA_FRAME,
    MAX_JSON_FRAME,
    NEED_DATA,
    PREFACE_SIZE,
    Connection,
    ConnectionClosed,
    Data,
    End,
    Error,
    FrameType,
    Hello,
    Preface,
    PrefaceReply,
    ProtocolViolation,
    Ready,
    Request,
    Response,
    Role,
    State,
    choose_version,
)
from splitstore._serve import start_server

from .conftest import TEST_LIMITS, LiveServers, LoopThread
from .test_server_robustness import assert_still_serving, status

# Short time-outs bound the few examples that leave a server waiting for more input.
FUZZ_LIMITS = replace(TEST_LIMITS, header_timeout=1.0, idle_timeout=2.0)
# How long a server may take to answer and hang up: a generous bound, not a speed test.
HANG_BOUND = 15.0
OID, VID = "ab" * 32, "cd" * 16
OPS = ["put_stripe", "get_stripe", "commit", "get_record", "list", "delete", "ping"]
OPS += ["put_stripes", "get_stripes", "commit_records", "get_records"]
HELLO, READY, REQUEST, RESPONSE, DATA, END, ERROR = (int(t) for t in FrameType)
PREFACE = b"SPST\x02\x02\x00\x00"

# For the live tests: each runs its examples against servers started once for all of them.
fuzz_settings = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", kind, len(payload) if length is None else length) + payload


def json_frame(kind: int, doc: object) -> bytes:
    return frame(kind, json.dumps(doc).encode())


# --- strategies ---------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
ids = st.sampled_from([OID, VID, "ef" * 32, "01" * 16, "..", "/etc/passwd", "A" * 64, ""]) | (
    st.text(max_size=70)
)
lengths = st.sampled_from([0, 1, 10, 2**20, 2**53, 2**64, -1]) | st.integers(0, 5000) | json_values
record_fields = st.fixed_dictionaries(
    {},
    optional={
        "version_id": ids,
        "stripe_length": lengths,
        "stripe_digest": st.sampled_from(["blake3:" + "0" * 64, "0" * 64, "z"])
        | st.text(max_size=72),
        "stripe_sha256": st.sampled_from(["0" * 64, "z"]) | st.text(max_size=64),
        "manifest": st.sampled_from(["", "AAAA", "!!"]) | st.text(max_size=30),
    },
)
stripe_entries = st.fixed_dictionaries(
    {}, optional={"object_id": ids, "version_id": ids, "length": lengths}
)
# What the batch operations take: lists of stripes or ids, sometimes past their bounds.
batch_fields = st.fixed_dictionaries(
    {},
    optional={
        "stripes": st.lists(stripe_entries, max_size=4)
        | st.lists(st.just({"object_id": OID, "version_id": VID, "length": 1}), max_size=70)
        | json_values,
        "object_ids": st.lists(ids, max_size=4) | st.lists(st.just(OID), max_size=70) | json_values,
    },
)
request_docs = st.builds(
    lambda op, fields, batch, extra: {**extra, **fields, **batch, "op": op},
    st.sampled_from(OPS) | st.text(max_size=12),
    stripe_entries.flatmap(lambda d: record_fields.map(lambda r: {**r, **d})),
    batch_fields,
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One frame, mostly of a type and shape a client sends, with an honest length."""
    kind = draw(st.sampled_from([REQUEST, REQUEST, DATA, DATA, END, END, ERROR, HELLO]))
    if draw(st.integers(0, 9)) == 0:
        kind = draw(st.integers(0, 255))
    if kind == REQUEST:
        payload = json.dumps(draw(request_docs)).encode()
    elif kind == DATA:
        payload = draw(st.binary(min_size=1, max_size=3000))
    elif kind == END:
        payload = draw(st.just(b"") | json_values.map(lambda v: json.dumps(v).encode()))
    elif kind == ERROR:
        code = draw(st.sampled_from(sorted(ERROR_CODES)) | st.text(max_size=10))
        payload = json.dumps({"code": code, "message": draw(st.text(max_size=20))}).encode()
    else:
        payload = draw(st.binary(max_size=200))
    length = None
    if draw(st.integers(0, 19)) == 0:  # a lying header, sometimes over the limits
        length = draw(st.sampled_from([0, MAX_JSON_FRAME + 1, MAX_DATA_FRAME + 1, 2**32 - 1]))
    return frame(kind, payload, length)


def mutate(data: st.DataObject, stream: bytes) -> bytes:
    out = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, max(len(out) - 1, 0)))
        mutation = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if mutation == "flip" and out:
            out[index] ^= data.draw(st.integers(1, 255))
        elif mutation == "truncate":
            del out[index:]
        elif mutation == "insert":
            out[index:index] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del out[index : index + data.draw(st.integers(1, 8))]
    return bytes(out)


def valid_session(token: str) -> bytes:
    """A whole well-formed session: store a stripe, commit it, read it back, delete it."""
    stripe = os.urandom(3000)
    record = {
        "version_id": VID,
        "stripe_length": len(stripe),
        "stripe_digest": stripe_digest(stripe),
        "manifest": "AAAA",
    }
    return (
        PREFACE
        + json_frame(HELLO, {"token": token})
        + json_frame(
            REQUEST, {"op": "put_stripe", "object_id": OID, "version_id": VID, "length": 3000}
        )
        + frame(DATA, stripe[:1000])
        + frame(DATA, stripe[1000:])
        + frame(END, b"")
        + json_frame(REQUEST, {"op": "commit", "object_id": OID, **record})
        + frame(END, b"")
        + json_frame(REQUEST, {"op": "get_stripe", "object_id": OID, "version_id": VID})
        + frame(END, b"")
        + json_frame(REQUEST, {"op": "list"})
        + frame(END, b"")
        + json_frame(REQUEST, {"op": "delete", "object_id": OID})
        + frame(END, b"")
    )


# --- (a) the decoder, fed like the server feeds it ------------------------------------------


def feed_like_the_server(stream: bytes, sizes: list[int]) -> None:
    """Feed ``stream`` in reads of the given sizes (at most RECEIVE_BYTES) to a server
    connection that answers like the TCP server, checking what it buffers after each read.

    Only ProtocolViolation may come out; after it the server can still send its one ERROR
    (once it has replied to the preface)."""
    server = Connection(Role.SERVER, partial_data=True)  # as the TCP server's
    fed = 0
    i = 0
    try:
        while fed < len(stream):
            size = min(sizes[i % len(sizes)], RECEIVE_BYTES)
            i += 1
            server.receive_data(stream[fed : fed + size])
            fed += len(stream[fed : fed + size])
            while (event := server.next_event()) is not NEED_DATA:
                assert not isinstance(event, ConnectionClosed)
                answer_like_the_server(server, event)
                if server.our_state is State.CLOSED:
                    return
            assert_one_frame_buffered(server, stream, fed)
        server.receive_data(b"")
        while not isinstance(event := server.next_event(), ConnectionClosed):
            answer_like_the_server(server, event)
    except ProtocolViolation as exc:
        violation = exc
    else:
        return
    assert violation.code in ERROR_CODES
    assert server.their_state is State.ERROR
    if server.our_state not in (State.AWAIT_PREFACE, State.SEND_REPLY, State.CLOSED):
        server.send(Error(violation.code, str(violation)))
        assert server.our_state is State.CLOSED  # type: ignore[comparison-overlap]


def answer_like_the_server(server: Connection, event: object) -> None:
    if isinstance(event, Preface):
        version = choose_version(event)
        server.send(PrefaceReply(version))
        if not version:
            server.send(Error("unsupported_version", "v1 only"))
    elif isinstance(event, Hello):
        server.send(Ready() if event.token == "t" else Error("unauthorized", "no"))
    elif isinstance(event, End | Error) and server.our_state is State.SEND_RESPONSE:
        server.send(Response({"status": "ok"}))
        server.send(End())
    else:
        assert isinstance(event, Request | Data | End | Error)


def assert_one_frame_buffered(server: Connection, stream: bytes, fed: int) -> None:
    """At NEED_DATA the buffer holds at most one incomplete frame, within its type's limit,
    and never a DATA frame's payload: that goes on as it arrives (partial_data)."""
    buffered = server.buffered_bytes
    start = fed - buffered
    if start < PREFACE_SIZE:
        assert start + buffered < PREFACE_SIZE
        return
    if buffered < HEADER_SIZE:
        return
    kind, length = struct.unpack_from(">BI", stream, start)
    assert kind != DATA
    assert length <= MAX_JSON_FRAME
    assert buffered < HEADER_SIZE + length


@settings(max_examples=300, deadline=None)
@given(
    st.lists(frames(), max_size=8),
    st.lists(st.integers(1, 5000) | st.just(RECEIVE_BYTES), min_size=1, max_size=6),
    st.sampled_from([PREFACE, b"SPST\x02\x05\x00\x00", b"SPST\x00\x01\x00\x00"]),
    st.sampled_from(["t", "wrong"]),
)
def test_decoder_buffers_at_most_one_frame(
    body: list[bytes], sizes: list[int], preface: bytes, token: str
) -> None:
    feed_like_the_server(preface + json_frame(HELLO, {"token": token}) + b"".join(body), sizes)


@settings(max_examples=200, deadline=None)
@given(st.data(), st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_decoder_on_mutated_sessions(data: st.DataObject, sizes: list[int]) -> None:
    feed_like_the_server(mutate(data, valid_session("t")), sizes)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="0123456789abcdefABCDEF./\\\x00\u0661\uff10\n", min_size=30, max_size=66),
        st.from_regex(r"[0-9a-f]{64}\n?", fullmatch=True),
    )
)
def test_ids_the_servers_accept_cannot_leave_the_data_folder(text: str) -> None:
    for accepted, size in ((is_object_id(text), 64), (is_version_id(text), 32)):
        if accepted:
            assert len(text) == size
            assert set(text) <= set("0123456789abcdef")
            joined = os.path.normpath(os.path.join("/data/objects", text[:2], text))
            assert joined == f"/data/objects/{text[:2]}/{text}"


# --- the live servers -----------------------------------------------------------------------


@pytest.fixture
def fuzz_servers(tmp_path: Path, loop_thread: LoopThread) -> Iterator[LiveServers]:
    live = LiveServers(tmp_path / "setup", loop_thread, FUZZ_LIMITS)
    live.start()
    yield live
    live.stop()


def serious_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors any server logged (crashes, unexpected exceptions, unretrieved tasks)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@contextmanager
def pinging(ping: Callable[[], None]) -> Iterator[list[float]]:
    """Run ``ping`` in a loop in a thread; yields the list of successful ping times, and
    re-raises the first failure at the end."""
    done: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                ping()
            except BaseException as exc:
                failures.append(exc)
                return
            done.append(time.monotonic())
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(HANG_BOUND)
    if failures:
        raise failures[0]
    assert done, "the well-behaved client was never served"


def read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """What the server sends until ``done(received)`` or it hangs up; fails if neither
    happens within HANG_BOUND."""
    deadline = time.monotonic() + HANG_BOUND
    out = b""
    while not done(out):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server neither answered nor hung up within {HANG_BOUND} s")
        except (ConnectionResetError, ssl.SSLError):
            return out
        if not chunk:
            return out
        out += chunk
    return out


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it hangs up."""
    return read_until(sock, lambda _: False)


def read_http_head(sock: socket.socket) -> bytes:
    """An HTTP reply up to the end of its head, or what came before the server hung up."""
    return read_until(sock, lambda out: b"\r\n\r\n" in out)


def server_errors(reply: bytes) -> list[str]:
    """The codes of the ERROR frames in what the TCP server sent (after its preface reply)."""
    codes = []
    i = PREFACE_SIZE if reply.startswith(b"SPST") else 0
    while i + HEADER_SIZE <= len(reply):
        kind, length = struct.unpack_from(">BI", reply, i)
        assert kind in {int(t) for t in FrameType}, reply[i : i + 20]
        if kind == ERROR:
            codes.append(json.loads(reply[i + HEADER_SIZE : i + HEADER_SIZE + length])["code"])
        i += HEADER_SIZE + length
    assert i == len(reply), "the server sent a partial frame"
    return codes


# --- (b) the TCP server ---------------------------------------------------------------------


class TcpPinger:
    """A well-behaved client: one connection, kept open, a ping at each call."""

    def __init__(self, port: int, token: str, wrap: Callable[[socket.socket], socket.socket]):
        self.sock = wrap(socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND))
        self.sock.sendall(PREFACE + json_frame(HELLO, {"token": token}))
        reply = recv_exactly(self.sock, PREFACE_SIZE + HEADER_SIZE)
        assert reply[PREFACE_SIZE] == READY
        recv_exactly(self.sock, struct.unpack(">I", reply[-4:])[0])

    def __call__(self) -> None:
        self.sock.sendall(json_frame(REQUEST, {"op": "ping"}) + frame(END, b""))
        head = recv_exactly(self.sock, HEADER_SIZE)
        assert head[0] == RESPONSE
        recv_exactly(self.sock, struct.unpack(">I", head[1:])[0])
        assert recv_exactly(self.sock, HEADER_SIZE)[0] == END


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the server hung up on a well-behaved client")
        out += chunk
    return out


@pytest.mark.filterwarnings("ignore:the tcp server runs without TLS")
def test_tcp_server_under_fuzzing(
    fuzz_servers: LiveServers,
    loop_thread: LoopThread,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING)
    token = fuzz_servers.config.token()
    # The configured TCP server, on the same port and data, but without TLS (see top).
    fuzz_servers.stop("tcp")
    spec = replace(fuzz_servers.spec("tcp"), tls=False)
    plain = loop_thread.run(start_server(spec, FUZZ_LIMITS))
    port = plain.port

    def exchange(stream: bytes) -> list[str]:
        with socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND) as sock:
            try:
                sock.sendall(stream)
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server may hang up before it has read everything
                return []
            return server_errors(read_until_closed(sock))

    @settings(fuzz_settings, max_examples=250)
    @given(
        st.one_of(
            st.binary(max_size=300),
            st.binary(max_size=300).map(lambda b: b"SPST" + b),
            st.lists(frames(), max_size=10).map(
                lambda fs: PREFACE + json_frame(HELLO, {"token": token}) + b"".join(fs)
            ),
            st.lists(frames(), max_size=4).map(
                lambda fs: PREFACE + json_frame(HELLO, {"token": "wrong"}) + b"".join(fs)
            ),
        )
    )
    def random_input(stream: bytes) -> None:
        assert "internal" not in exchange(stream)

    @settings(fuzz_settings, max_examples=150)
    @given(st.data())
    def mutated_sessions(data: st.DataObject) -> None:
        assert "internal" not in exchange(mutate(data, valid_session(token)))

    try:
        pinger = TcpPinger(port, token, lambda s: s)
        with pinger.sock, pinging(pinger):
            random_input()
            mutated_sessions()
        assert exchange(valid_session(token)) == []  # still does the whole job
    finally:
        loop_thread.run(plain.close())
    assert serious_records(caplog) == []
    fuzz_servers.start("tcp")
    with fuzz_servers.client() as client:
        assert_still_serving(client, tmp_path)


def test_tcp_server_under_fuzzing_through_tls(
    fuzz_servers: LiveServers, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING)
    token = fuzz_servers.config.token()
    port = fuzz_servers.config.server("tcp").port
    context = ssl.create_default_context(cafile=str(fuzz_servers.paths.ca_cert))

    def wrap(sock: socket.socket) -> socket.socket:
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    @settings(fuzz_settings, max_examples=40)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.lists(frames(), max_size=6).map(
                lambda fs: PREFACE + json_frame(HELLO, {"token": token}) + b"".join(fs)
            ),
        )
    )
    def garbage(stream: bytes) -> None:
        with wrap(socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND)) as sock:
            sock.sendall(stream)
            # A close_notify: the server reads to the end of what was sent, then hangs up.
            if isinstance(sock, ssl.SSLSocket):
                with suppress(OSError):
                    sock.unwrap()

    pinger = TcpPinger(port, token, wrap)
    with pinger.sock, pinging(pinger):
        garbage()
    assert serious_records(caplog) == []
    with fuzz_servers.client() as client:
        assert_still_serving(client, tmp_path)


# --- (c) the HTTPS server -------------------------------------------------------------------

METHODS = ["GET", "PUT", "DELETE", "POST", "HEAD", "OPTIONS", "PATCH"]
SEGMENTS = [
    "v1", "objects", "stripes", "record", "healthz", "ping", OID, VID, "..", ".", "%2e%2e",
    "%2F", "%00", "%C3%A9", "A" * 64, "\\", "", "~",
    "batch", "put-stripes", "get-stripes", "commit", "get-records",
]  # fmt: skip
PATH_CHARS = "abcdefABCDEF0123456789-._~%/!$&'()*+,;=:@?#[]"
HEADER_NAMES = ["Accept", "Content-Type", "Expect", "Range", "X-Any", "Cookie", "User-Agent"]


@st.composite
def http_requests(draw: st.DrawFn, token: str) -> bytes:
    """A complete HTTP/1.1 request that asks the server to close after its answer."""
    method = draw(st.sampled_from(METHODS) | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1))
    segments = draw(st.lists(st.sampled_from(SEGMENTS) | st.text(PATH_CHARS, max_size=12)))
    path = "/" + "/".join(segments)
    if draw(st.integers(0, 9)) == 0:
        path = "/v1/objects/" + "a" * draw(st.integers(60, 9000))  # past the line limit too
    auth = draw(
        st.sampled_from([f"Bearer {token}", f"Bearer {token}", "Bearer wrong", "Basic eA==", ""])
    )
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(HEADER_NAMES) | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1),
                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
            ),
            max_size=4,
        )
    )
    body = draw(
        st.just(b"")
        | st.binary(max_size=2000)
        | record_fields.map(lambda r: json.dumps(r).encode())
        | json_values.map(lambda v: json.dumps(v).encode())
        # The batch routes' bodies: an index line then bytes, or NDJSON records.
        | st.tuples(batch_fields, st.binary(max_size=300)).map(
            lambda t: json.dumps(t[0]).encode() + b"\n" + t[1]
        )
        | st.lists(record_fields.map(lambda r: {**r, "object_id": OID}), max_size=3).map(
            lambda rs: b"".join(json.dumps(r).encode() + b"\n" for r in rs)
        )
    )
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close"]
    if auth:
        lines.append(f"Authorization: {auth}")
    lines += [f"{name}: {value}" for name, value in headers]
    if body or draw(st.booleans()):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def https_pinger(servers: LiveServers) -> Callable[[], None]:
    context = ssl.create_default_context(cafile=str(servers.paths.ca_cert))
    port = servers.config.server("https").port
    request = (
        f"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {servers.config.token()}\r\n\r\n"
    ).encode()

    def ping() -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(request)
            reply = read_until_closed(sock)
        assert status(reply) == 200, reply[:200]

    return ping


def test_https_server_under_fuzzing(
    fuzz_servers: LiveServers, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING)
    token = fuzz_servers.config.token()
    context = ssl.create_default_context(cafile=str(fuzz_servers.paths.ca_cert))
    port = fuzz_servers.config.server("https").port

    def exchange(request: bytes, read: Callable[[socket.socket], bytes]) -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=HANG_BOUND)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            with suppress(OSError):  # the server may refuse before it has read everything
                sock.sendall(request)
            return read(sock)

    @settings(fuzz_settings, max_examples=250)
    @given(http_requests(token))
    def requests(request: bytes) -> None:
        reply = exchange(request, read_until_closed)  # it asked the server to hang up
        assert reply.startswith(b"HTTP/1."), reply[:200]  # a complete request is answered
        assert status(reply) < 500 or status(reply) == 507, reply[:300]

    @settings(fuzz_settings, max_examples=40)
    @given(st.data(), http_requests(token))
    def mutated(data: st.DataObject, request: bytes) -> None:
        # Cut, flipped or garbled bytes: answered (never with a 5xx) or hung up on, in time.
        reply = exchange(mutate(data, request), read_http_head)
        assert not reply or status(reply) < 500 or status(reply) == 507, reply[:300]

    with pinging(https_pinger(fuzz_servers)):
        requests()
        mutated()
    assert serious_records(caplog) == []
    with fuzz_servers.client() as client:
        assert_still_serving(client, tmp_path)
