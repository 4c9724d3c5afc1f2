"""The sans-IO wire protocol: byte layouts, the state machine, limits, and property tests
that arbitrary legal traffic round-trips and arbitrary bad input only raises
ProtocolViolation with bounded buffering."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._digest import stripe_digest
from splitstore._protocol import (
    ERROR_CODES,
    HEADER_SIZE,
    MAGIC,
    MAX_DATA_FRAME,
    MAX_JSON_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Data,
    End,
    Error,
    Event,
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

OBJECT_ID = "ab" * 32
VERSION_ID = "cd" * 16


# --- helpers ------------------------------------------------------------------------------


def frame(frame_type: int, payload: bytes) -> bytes:
    return struct.pack(">BI", frame_type, len(payload)) + payload


def json_frame(frame_type: int, obj: object) -> bytes:
    return frame(frame_type, json.dumps(obj).encode())


def drain(conn: Connection) -> list[Event]:
    """Every event ``conn`` can produce now; checks the buffer bound on NEED_DATA."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            # At most one incomplete frame is buffered, and never past its type's limit.
            assert conn.buffered_bytes < HEADER_SIZE + MAX_DATA_FRAME
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def chop(data: bytes, sizes: Sequence[int]) -> Iterable[bytes]:
    """``data`` in pieces of the given sizes, used cyclically."""
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        yield data[pos : pos + size]
        pos += size
        i += 1


def deliver(data: bytes, conn: Connection, sizes: Sequence[int] = ()) -> list[Event]:
    events: list[Event] = []
    for piece in chop(data, sizes):
        conn.receive_data(piece)
        events.extend(drain(conn))
    return events


def handshake(*, partial_data: bool = False) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, partial_data=partial_data)
    server = Connection(Role.SERVER)
    assert deliver(client.send(Preface(2, 2)), server) == [Preface(2, 2)]
    assert deliver(server.send(PrefaceReply(2)), client) == [PrefaceReply(2)]
    assert deliver(client.send(Hello("secret")), server) == [Hello("secret")]
    assert deliver(server.send(Ready({"server": "splitstore/0.2.0"})), client) == [
        Ready({"server": "splitstore/0.2.0"})
    ]
    assert client.our_state is State.IDLE
    assert server.our_state is State.IDLE
    return client, server


def our_state(conn: Connection) -> State:
    """``conn.our_state``, read afresh (mypy would keep an earlier narrowing)."""
    return conn.our_state


def send_all(conn: Connection, events: Iterable[Event]) -> bytes:
    return b"".join(conn.send(event) for event in events)


def exchange(
    client: Connection,
    server: Connection,
    request: Sequence[Event],
    response: Sequence[Event],
    sizes: Sequence[int] = (),
) -> None:
    """Run one exchange and check both sides received exactly what the other sent."""
    assert deliver(send_all(client, request), server, sizes) == list(request)
    assert deliver(send_all(server, response), client, sizes) == list(response)


# --- byte layouts -------------------------------------------------------------------------


def test_preface_and_reply_bytes() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    preface = client.send(Preface(2, 2))
    assert preface == b"SPST\x02\x02\x00\x00"
    server.receive_data(preface)
    assert server.next_event() == Preface(2, 2)
    assert server.send(PrefaceReply(2)) == b"SPST\x02\x00\x00\x00"
    assert server.version == 2


def test_frame_layouts() -> None:
    client = Connection(Role.CLIENT)
    client.send(Preface(2, 2))
    client.receive_data(b"SPST\x02\x00\x00\x00")
    assert client.next_event() == PrefaceReply(2)
    assert client.version == 2
    assert client.send(Hello("t")) == b'\x01\x00\x00\x00\x0d{"token":"t"}'
    client.receive_data(b"\x02\x00\x00\x00\x02{}")
    assert client.next_event() == Ready({})
    assert client.send(Request("ping")) == b'\x10\x00\x00\x00\x0d{"op":"ping"}'
    assert client.send(Data(b"abc")) == b"\x20\x00\x00\x00\x03abc"
    assert client.send(End()) == b"\x21\x00\x00\x00\x00"


def test_error_frame_layout_and_trailer() -> None:
    client, server = handshake()
    exchange(client, server, [Request("ping"), End()], [Error("not_found", "no such object")])
    raw = server.send(Error("timeout", "too slow"))
    assert raw[:1] == b"\x30"
    assert json.loads(raw[HEADER_SIZE:]) == {"code": "timeout", "message": "too slow"}
    client2, server2 = handshake()
    exchange(client2, server2, [Request("ping"), End({"k": [1, 2]})], [Response(), End()])


def test_request_fields_round_trip_without_op() -> None:
    client, server = handshake()
    fields = {"object_id": OBJECT_ID, "version_id": VERSION_ID, "length": 3}
    server.receive_data(client.send(Request("put_stripe", fields)))
    event = server.next_event()
    assert event == Request("put_stripe", fields)


# --- version negotiation and handshake ----------------------------------------------------


def test_choose_version() -> None:
    assert choose_version(Preface(2, 2)) == 2
    assert choose_version(Preface(0, 9)) == 2
    assert choose_version(Preface(1, 1)) == 0  # version 1 answered uploads with SHA-256s
    assert choose_version(Preface(3, 4)) == 0
    assert choose_version(Preface(3, 1)) == 0


def test_refusal_path() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    client.send(Preface(2, 2))
    # A (future) client offering only versions 3..4, as the server sees it.
    events = deliver(b"SPST\x03\x04\x00\x00", server)
    assert events == [Preface(3, 4)]
    with pytest.raises(ProtocolViolation):
        server.send(PrefaceReply(2))  # 2 was not offered
    with pytest.raises(ProtocolViolation):
        server.send(Ready())
    reply = server.send(PrefaceReply(0))
    assert reply == b"SPST\x00\x00\x00\x00"
    assert server.our_state is State.SEND_REFUSAL
    error = server.send(Error("unsupported_version", "this server speaks version 2"))
    assert our_state(server) is State.CLOSED
    with pytest.raises(ProtocolViolation):
        server.send(Error("internal", "again"))

    got = deliver(reply + error, client)
    assert got == [PrefaceReply(0), Error("unsupported_version", "this server speaks version 2")]
    assert client.version == 0
    assert client.our_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        client.send(Hello("t"))
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


def test_client_rejects_a_version_it_did_not_offer() -> None:
    client = Connection(Role.CLIENT)
    client.send(Preface(2, 2))
    client.receive_data(b"SPST\x03\x00\x00\x00")
    with pytest.raises(ProtocolViolation) as info:
        client.next_event()
    assert info.value.code == "unsupported_version"


def test_client_only_offers_versions_it_speaks() -> None:
    client = Connection(Role.CLIENT)
    for bad in (Preface(0, 1), Preface(1, 1), Preface(1, 2), Preface(2, 3), Preface(2, 1)):
        with pytest.raises(ProtocolViolation):
            client.send(bad)
    assert client.our_state is State.SEND_PREFACE
    assert client.send(Preface(PROTOCOL_VERSION, PROTOCOL_VERSION))


def test_reserved_preface_bytes_are_ignored() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"SPST\x02\x02\xff\xff")
    assert server.next_event() == Preface(2, 2)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"SPSX", b"S\x00"])
def test_bad_magic_is_rejected_early(garbage: bytes) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(garbage)
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_partial_magic_waits() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(MAGIC[:3])
    assert server.next_event() is NEED_DATA


def test_unauthorized() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    deliver(client.send(Preface(2, 2)), server)
    deliver(server.send(PrefaceReply(2)), client)
    deliver(client.send(Hello("wrong")), server)
    assert server.our_state is State.SEND_READY
    error = server.send(Error("unauthorized", "bad token"))
    assert our_state(server) is State.CLOSED
    assert deliver(error, client) == [Error("unauthorized", "bad token")]
    assert client.our_state is State.CLOSED
    assert client.their_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        client.send(Request("ping"))
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


def test_client_must_wait_for_reply_and_ready() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolViolation):
        client.send(Hello("t"))
    client.send(Preface(2, 2))
    with pytest.raises(ProtocolViolation):
        client.send(Hello("t"))  # the reply has not come yet
    client.receive_data(b"SPST\x02\x00\x00\x00")
    client.next_event()
    client.send(Hello("t"))
    with pytest.raises(ProtocolViolation):
        client.send(Request("ping"))  # READY has not come yet
    with pytest.raises(ProtocolViolation):
        client.send(Hello("t"))  # HELLO twice


def test_server_rejects_pipelined_hello_and_early_request() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"SPST\x02\x02\x00\x00" + json_frame(FrameType.HELLO, {"token": "t"}))
    assert server.next_event() == Preface(2, 2)
    with pytest.raises(ProtocolViolation):
        server.next_event()  # HELLO before our reply

    server = Connection(Role.SERVER)
    deliver(b"SPST\x02\x02\x00\x00", server)
    server.send(PrefaceReply(2))
    hello = json_frame(FrameType.HELLO, {"token": "t"})
    request = json_frame(FrameType.REQUEST, {"op": "ping"})
    server.receive_data(hello + request)
    assert server.next_event() == Hello("t")
    with pytest.raises(ProtocolViolation):
        server.next_event()  # REQUEST before READY


def test_hello_twice_is_a_violation() -> None:
    _, server = handshake()
    server.receive_data(json_frame(FrameType.HELLO, {"token": "t"}))
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_server_speaking_first_is_a_violation() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(b"SPST\x02\x00\x00\x00")
    with pytest.raises(ProtocolViolation):
        client.next_event()


# --- exchanges ----------------------------------------------------------------------------


def test_put_and_get_exchanges() -> None:
    client, server = handshake()
    stripe = bytes(range(256)) * 10
    put = Request("put_stripe", {"object_id": OBJECT_ID, "version_id": VERSION_ID, "length": 2560})
    digest = stripe_digest(stripe)
    request_bytes = client.send(put) + b"".join(client.send_data(stripe)) + client.send(End())
    events = deliver(request_bytes, server)
    assert events[0] == put
    assert b"".join(e.payload for e in events if isinstance(e, Data)) == stripe
    assert events[-1] == End()
    assert server.our_state is State.SEND_RESPONSE
    reply: list[Event] = [Response({"status": "ok", "length": 2560, "digest": digest}), End()]
    assert deliver(send_all(server, reply), client) == reply
    assert client.our_state is State.IDLE

    get: list[Event] = [
        Request("get_stripe", {"object_id": OBJECT_ID, "version_id": VERSION_ID}),
        End(),
    ]
    answer: list[Event] = [Response({"status": "ok", "length": 2560}), Data(stripe[:1000])]
    exchange(client, server, get, [*answer, Data(stripe[1000:]), End()])


def test_no_pipelining() -> None:
    client, server = handshake()
    raw = send_all(client, [Request("ping"), End()])
    with pytest.raises(ProtocolViolation):
        client.send(Request("ping"))
    deliver(raw, server)
    server.receive_data(json_frame(FrameType.REQUEST, {"op": "ping"}))
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_data_without_open_message() -> None:
    client, server = handshake()
    with pytest.raises(ProtocolViolation):
        client.send(Data(b"x"))
    with pytest.raises(ProtocolViolation):
        client.send_data(b"x")
    with pytest.raises(ProtocolViolation):
        server.send(Data(b"x"))
    server.receive_data(frame(FrameType.DATA, b"x"))
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_role_checks_on_send_and_receive() -> None:
    client, server = handshake()
    with pytest.raises(ProtocolViolation):
        server.send(Request("ping"))
    with pytest.raises(ProtocolViolation):
        client.send(Response({"status": "ok"}))
    with pytest.raises(ProtocolViolation):
        client.send(Ready())
    client.receive_data(json_frame(FrameType.REQUEST, {"op": "ping"}))
    with pytest.raises(ProtocolViolation):
        client.next_event()


def test_response_only_after_the_whole_request() -> None:
    client, server = handshake()
    deliver(client.send(Request("put_stripe")) + client.send(Data(b"x")), server)
    assert server.our_state is State.AWAIT_BODY
    with pytest.raises(ProtocolViolation):
        server.send(Response({"status": "ok"}))


def test_error_instead_of_response_returns_to_idle() -> None:
    client, server = handshake()
    exchange(
        client,
        server,
        [Request("get_record", {"object_id": OBJECT_ID}), End()],
        [Error("not_found", "no such object")],
    )
    assert client.our_state is State.IDLE
    assert server.our_state is State.IDLE
    exchange(client, server, [Request("ping"), End()], [Response({"status": "ok"}), End()])


def test_error_mid_response_returns_to_idle() -> None:
    client, server = handshake()
    reply: list[Event] = [Response({"status": "ok"}), Data(b"part"), Error("internal", "eio")]
    exchange(client, server, [Request("list"), End()], reply)
    assert client.our_state is State.IDLE
    exchange(client, server, [Request("ping"), End()], [Response({"status": "ok"}), End()])


def test_client_abort_returns_to_idle() -> None:
    client, server = handshake()
    aborted: list[Event] = [Request("put_stripe"), Data(b"abc"), Error("internal", "eio")]
    assert deliver(send_all(client, aborted), server) == aborted
    assert server.our_state is State.IDLE
    assert client.our_state is State.IDLE
    with pytest.raises(ProtocolViolation):
        server.send(Response({"status": "ok"}))
    exchange(client, server, [Request("ping"), End()], [Response({"status": "ok"}), End()])


def test_client_error_only_inside_its_body() -> None:
    client, _ = handshake()
    with pytest.raises(ProtocolViolation):
        client.send(Error("internal", "nothing to abort"))


def test_early_error_while_client_uploads() -> None:
    client, server = handshake()
    head = client.send(Request("put_stripe", {"length": 10**12})) + client.send(Data(b"a"))
    deliver(head, server)
    early = server.send(Error("too_large", "over quota"))
    assert server.our_state is State.CLOSED
    # The client keeps uploading until it reads the error; the server parses that fine.
    in_flight = client.send(Data(b"b"))
    assert deliver(early, client) == [Error("too_large", "over quota")]
    assert client.our_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        client.send(Data(b"c"))
    assert deliver(in_flight, server) == [Data(b"b")]
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()


def test_early_error_racing_the_end_of_the_request() -> None:
    client, server = handshake()
    deliver(client.send(Request("put_stripe")), server)
    early = server.send(Error("insufficient_storage", "disk full"))
    in_flight = client.send(Data(b"x")) + client.send(End())
    # The client finished first, so it reads the error as the answer and may go on.
    assert deliver(early, client) == [Error("insufficient_storage", "disk full")]
    assert client.our_state is State.IDLE
    in_flight += client.send(Request("ping")) + client.send(End())
    events = deliver(in_flight, server)  # no violation: the client followed the rules
    assert events == [Data(b"x"), End(), Request("ping"), End()]
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


def test_idle_timeout_error_from_server() -> None:
    client, server = handshake()
    error = server.send(Error("timeout", "idle too long"))
    assert deliver(error, client) == [Error("timeout", "idle too long")]
    assert client.our_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        client.send(Request("ping"))


def test_frames_after_a_closing_error_are_a_violation() -> None:
    client, _ = handshake()
    client.receive_data(json_frame(FrameType.ERROR, {"code": "timeout", "message": "bye"}))
    assert isinstance(client.next_event(), Error)
    client.receive_data(json_frame(FrameType.RESPONSE, {"status": "ok"}))
    with pytest.raises(ProtocolViolation):
        client.next_event()


def test_unknown_error_codes_are_received_but_not_sent() -> None:
    client, server = handshake()
    deliver(send_all(client, [Request("ping"), End()]), server)
    with pytest.raises(ProtocolViolation):
        server.send(Error("teapot", "short and stout"))
    client.receive_data(json_frame(FrameType.ERROR, {"code": "teapot", "message": "m", "x": 1}))
    assert client.next_event() == Error("teapot", "m")
    assert {"bad_request", "too_large", "unauthorized", "internal"} <= ERROR_CODES


# --- closing ------------------------------------------------------------------------------


def test_close_between_messages() -> None:
    client, server = handshake()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    assert server.their_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        server.send(Error("internal", "too late"))
    with pytest.raises(ProtocolViolation):
        server.receive_data(b"more")
    del client


def test_close_before_anything() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()


def test_close_mid_frame_is_a_violation() -> None:
    client, server = handshake()
    raw = client.send(Request("ping"))
    server.receive_data(raw[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_close_mid_message_is_a_violation() -> None:
    client, server = handshake()
    deliver(send_all(client, [Request("list"), End()]), server)
    deliver(server.send(Response({"status": "ok"})), client)
    client.receive_data(b"")
    with pytest.raises(ProtocolViolation):
        client.next_event()


def test_close_while_awaiting_the_response_is_not_a_violation() -> None:
    client, server = handshake()
    deliver(send_all(client, [Request("ping"), End()]), server)
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


def test_sending_connection_closed() -> None:
    client, _ = handshake()
    assert client.send(ConnectionClosed()) == b""
    assert client.our_state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        client.send(Request("ping"))


# --- violations ---------------------------------------------------------------------------


def test_violation_is_sticky_and_allows_one_last_error() -> None:
    client, server = handshake()
    server.receive_data(b"\x7f\x00\x00\x00\x00")
    with pytest.raises(ProtocolViolation, match="unknown frame type"):
        server.next_event()
    assert server.their_state is State.ERROR
    with pytest.raises(ProtocolViolation, match="unknown frame type") as info:
        server.next_event()
    assert info.value.code == "bad_request"
    with pytest.raises(ProtocolViolation):
        server.send(Response({"status": "ok"}))
    out = server.send(Error(info.value.code, str(info.value)))
    assert out[:1] == bytes([FrameType.ERROR])
    assert server.our_state is State.CLOSED
    server.receive_data(b"x" * 1000)  # ignored once broken: nothing is kept
    assert server.buffered_bytes == 0
    del client


def test_failed_send_changes_nothing() -> None:
    client, _ = handshake()
    with pytest.raises(ProtocolViolation):
        client.send(Request("put", {"blob": "x" * MAX_JSON_FRAME}))
    assert client.our_state is State.IDLE
    assert client.send(Request("ping"))


@pytest.mark.parametrize(
    ("frame_type", "payload"),
    [
        (FrameType.REQUEST, b"[1, 2]"),
        (FrameType.REQUEST, b'{"op": 5}'),
        (FrameType.REQUEST, b'{"no_op": "x"}'),
        (FrameType.REQUEST, b'{"op": "a", "op": "b"}'),
        (FrameType.REQUEST, b'{"op": "a", "x": NaN}'),
        (FrameType.REQUEST, b'{"op": "a", "x": 1e400}'),
        (FrameType.REQUEST, b'{"op": "a"'),
        (FrameType.REQUEST, b'{"op": "\xff"}'),
        (FrameType.REQUEST, '{"op": "a"}'.encode("utf-16")),
        (FrameType.REQUEST, b"\xef\xbb\xbf" + b'{"op": "a"}'),
        (FrameType.REQUEST, b'{"op": "a", "x": ' + b"9" * 5000 + b"}"),
        (FrameType.REQUEST, b'{"op": "a", "x": ' + b"[" * 60000 + b"]" * 60 + b"}"),
        (FrameType.REQUEST, b""),
    ],
)
def test_bad_json_payloads(frame_type: int, payload: bytes) -> None:
    _, server = handshake()
    server.receive_data(frame(frame_type, payload[:MAX_JSON_FRAME]))
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code == "bad_request"


def test_bad_error_and_hello_payloads() -> None:
    client, _ = handshake()
    client.receive_data(json_frame(FrameType.ERROR, {"code": "x"}))
    with pytest.raises(ProtocolViolation):
        client.next_event()
    server = Connection(Role.SERVER)
    deliver(b"SPST\x02\x02\x00\x00", server)
    server.send(PrefaceReply(2))
    server.receive_data(json_frame(FrameType.HELLO, {"token": None}))
    with pytest.raises(ProtocolViolation):
        server.next_event()


def test_empty_data_frame_is_a_violation() -> None:
    client, server = handshake()
    deliver(client.send(Request("put_stripe")), server)
    server.receive_data(frame(FrameType.DATA, b""))
    with pytest.raises(ProtocolViolation):
        server.next_event()


@pytest.mark.parametrize(
    ("frame_type", "limit"),
    [(FrameType.DATA, MAX_DATA_FRAME), (FrameType.END, MAX_JSON_FRAME)],
)
def test_oversized_header_is_rejected_before_its_payload(frame_type: int, limit: int) -> None:
    client, server = handshake()
    deliver(client.send(Request("put_stripe")), server)
    server.receive_data(struct.pack(">BI", frame_type, limit + 1))
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code == "too_large"


def test_oversized_json_header_is_rejected_before_its_payload() -> None:
    _, server = handshake()
    server.receive_data(struct.pack(">BI", FrameType.REQUEST, 2**32 - 1))
    with pytest.raises(ProtocolViolation) as info:
        server.next_event()
    assert info.value.code == "too_large"


def test_frames_at_the_limits_are_accepted() -> None:
    client, server = handshake()
    blob = "x" * (MAX_JSON_FRAME - len('{"op":"put","b":""}'))
    big_request = client.send(Request("put", {"b": blob}))
    assert len(big_request) == HEADER_SIZE + MAX_JSON_FRAME
    payload = bytes(MAX_DATA_FRAME)
    raw = big_request + client.send(Data(payload)) + client.send(End())
    events = deliver(raw, server, [65536])
    assert events == [Request("put", {"b": blob}), Data(payload), End()]


def test_wrong_frame_type_is_rejected_at_the_header() -> None:
    _, server = handshake()
    # A 60 KiB HELLO is refused after 5 bytes: HELLO is never legal now.
    server.receive_data(struct.pack(">BI", FrameType.HELLO, 60_000))
    with pytest.raises(ProtocolViolation):
        server.next_event()


# --- events -------------------------------------------------------------------------------


def test_event_validation() -> None:
    bad: list[tuple[type, tuple[object, ...]]] = [
        (Preface, (256, 1)),
        (Preface, (-1, 1)),
        (Preface, (True, 1)),
        (PrefaceReply, ("1",)),
        (Hello, (None,)),
        (Ready, ([],)),
        (Request, (1, {})),
        (Request, ("x", {"op": "y"})),
        (Request, ("x", {1: 2})),
        (Response, (None,)),
        (Data, (b"",)),
        (Data, (bytearray(b"x"),)),
        (Data, (bytes(MAX_DATA_FRAME + 1),)),
        (End, ("x",)),
        (Error, (1, "m")),
        (Error, ("", "m")),
        (Error, ("internal", None)),
    ]
    for cls, args in bad:
        with pytest.raises(ProtocolViolation):
            cls(*args)


def test_unserializable_json_is_a_local_violation() -> None:
    client, _ = handshake()
    for fields in ({"x": object()}, {"x": float("nan")}, {"x": "\ud800"}):
        with pytest.raises(ProtocolViolation):
            client.send(Request("op", fields))
    assert client.our_state is State.IDLE


def test_need_data_repr() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"


# --- send_data ----------------------------------------------------------------------------


def test_send_data_splits_without_copying() -> None:
    client, server = handshake()
    deliver(client.send(Request("put_stripe")), server)
    payload = bytes(range(256)) * (MAX_DATA_FRAME * 5 // 2 // 256)
    pieces = client.send_data(payload)
    assert len(pieces) == 6
    sizes = [MAX_DATA_FRAME, MAX_DATA_FRAME, len(payload) - 2 * MAX_DATA_FRAME]
    for header, chunk, size in zip(pieces[::2], pieces[1::2], sizes, strict=True):
        assert header == struct.pack(">BI", FrameType.DATA, size)
        assert isinstance(chunk, memoryview)
        assert chunk.obj is payload
    events = deliver(b"".join(pieces), server)
    assert b"".join(e.payload for e in events if isinstance(e, Data)) == payload


def test_send_data_small_and_empty() -> None:
    client, _ = handshake()
    client.send(Request("put_stripe"))
    payload = b"hello"
    assert client.send_data(payload) == [b"\x20\x00\x00\x00\x05", payload]
    assert client.send_data(payload)[1] is payload
    assert client.send_data(b"") == []
    array = bytearray(b"xyz")
    pieces = client.send_data(array)
    assert b"".join(pieces) == b"\x20\x00\x00\x00\x03xyz"
    wide = memoryview(b"\x01\x00\x02\x00").cast("H")
    assert b"".join(client.send_data(wide)) == b"\x20\x00\x00\x00\x04\x01\x00\x02\x00"


def test_64_mib_round_trip() -> None:
    client, server = handshake()
    payload = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    stream = b"".join(
        [client.send(Request("put_stripe")), *client.send_data(payload), client.send(End())]
    )
    received = 0
    digest = hashlib.sha256()
    view = memoryview(stream)
    for start in range(0, len(stream), 256 * 1024):  # socket-sized reads
        server.receive_data(view[start : start + 256 * 1024])
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, Data):
                received += len(event.payload)
                digest.update(event.payload)
    assert received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert server.our_state is State.SEND_RESPONSE


def test_one_byte_at_a_time() -> None:
    client, server = handshake()
    request: list[Event] = [Request("put_stripe", {"length": 3}), Data(b"abc"), End()]
    assert deliver(send_all(client, request), server, [1]) == request


# --- property tests -----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)
request_fields = json_objects.map(lambda d: {k: v for k, v in d.items() if k != "op"})
payloads = st.binary(min_size=1, max_size=300)
error_codes = st.sampled_from(sorted(ERROR_CODES))
errors = st.builds(Error, error_codes, st.text(max_size=30))
piece_sizes = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8)


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    """A legal exchange: the client's message, then the server's (none if the client aborts)."""
    request: list[Event] = [Request(draw(st.text(max_size=12)), draw(request_fields))]
    request += [Data(p) for p in draw(st.lists(payloads, max_size=4))]
    if draw(st.booleans()):
        request.append(End(draw(st.just({}) | json_objects)))
    else:
        request.append(draw(errors))
        return request, []
    kind = draw(st.sampled_from(["error", "ok", "abort"]))
    if kind == "error":
        return request, [draw(errors)]
    response: list[Event] = [Response(draw(json_objects))]
    response += [Data(p) for p in draw(st.lists(payloads, max_size=4))]
    response.append(End(draw(json_objects)) if kind == "ok" else draw(errors))
    return request, response


@settings(max_examples=150, deadline=None)
@given(st.lists(exchanges(), max_size=5), piece_sizes)
def test_round_trip_arbitrary_exchanges(
    script: list[tuple[list[Event], list[Event]]], sizes: list[int]
) -> None:
    client, server = handshake()
    for request, response in script:
        exchange(client, server, request, response, sizes)
        assert client.our_state is State.IDLE
        assert server.our_state is State.IDLE
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed()]


def client_stream(script: list[tuple[list[Event], list[Event]]]) -> tuple[bytes, list[Event]]:
    """Everything a client sends in a session running ``script``, and the events it sent."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sent: list[Event] = [Preface(2, 2), Hello("t")]
    stream = client.send(Preface(2, 2))
    deliver(stream, server)
    deliver(server.send(PrefaceReply(2)), client)
    hello = client.send(Hello("t"))
    deliver(hello, server)
    deliver(server.send(Ready()), client)
    stream += hello
    for request, _ in script:
        raw = send_all(client, request)
        stream += raw
        sent += request
        deliver(raw, server)
        if server.our_state is State.SEND_RESPONSE:
            deliver(send_all(server, [Response(), End()]), client)
    return stream, sent


def auto_server_events(stream: bytes, sizes: Sequence[int]) -> list[Event]:
    """Feed ``stream`` to a server that answers each event as it comes, like a real one."""
    server = Connection(Role.SERVER)
    events: list[Event] = []
    for piece in chop(stream, sizes):
        server.receive_data(piece)
        while (event := server.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, Preface):
                server.send(PrefaceReply(choose_version(event)))
            elif isinstance(event, Hello):
                server.send(Ready())
            elif server.our_state is State.SEND_RESPONSE:
                server.send(Response())
                server.send(End())
    server.receive_data(b"")
    events += drain(server)
    return events


@settings(max_examples=100, deadline=None)
@given(st.lists(exchanges(), max_size=4), piece_sizes, piece_sizes)
def test_whole_stream_split_anywhere(
    script: list[tuple[list[Event], list[Event]]], first: list[int], second: list[int]
) -> None:
    """Any split of a client's whole stream, preface included, gives the same events."""
    stream, sent = client_stream(script)
    expected = [*sent, ConnectionClosed()]
    assert auto_server_events(stream, first) == expected
    assert auto_server_events(stream, second) == expected


def test_no_event_lost_in_big_splits() -> None:
    client, server = handshake()
    request: list[Event] = [Request("x"), *(Data(bytes([i]) * 1000) for i in range(50)), End()]
    assert deliver(send_all(client, request), server, [4099, 7, 65536]) == request


# Kinds that end a session or an exchange are tried rarely, so that sessions get far.
COMMON_KINDS = ["preface", "reply", "hello", "ready", "request", "response", "data", "end"]
RARE_KINDS = ["refuse", "error"]


def make_event(kind: str, rnd: random.Random) -> Event:
    if kind == "preface":
        return Preface(2, 2)
    if kind == "reply":
        return PrefaceReply(2)
    if kind == "refuse":
        return PrefaceReply(0)
    if kind == "hello":
        return Hello("t")
    if kind == "ready":
        return Ready({"max_data_frame": MAX_DATA_FRAME})
    if kind == "request":
        return Request("op", {"n": rnd.randrange(10)})
    if kind == "response":
        return Response({"status": "ok"})
    if kind == "data":
        return Data(rnd.randbytes(rnd.randint(1, 20)))
    if kind == "end":
        return End()
    return Error(rnd.choice(sorted(ERROR_CODES)), "m")


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0, max_value=2**64))
def test_anything_sent_is_accepted_whatever_the_timing(seed: int) -> None:
    """Each side sends whatever its state allows while bytes are in flight both ways and
    are delivered at arbitrary moments: the receiver must never see a violation."""
    # A plain seeded generator: hypothesis' own draws favour small values, which would
    # make sessions end early (an ERROR or a refusal) instead of getting deep.
    rnd = random.Random(seed)
    conns = {Role.CLIENT: Connection(Role.CLIENT), Role.SERVER: Connection(Role.SERVER)}
    wires = {Role.CLIENT: bytearray(), Role.SERVER: bytearray()}  # bytes in flight *to* role
    received: dict[Role, list[Event]] = {Role.CLIENT: [], Role.SERVER: []}
    sent: dict[Role, list[Event]] = {Role.CLIENT: [], Role.SERVER: []}
    for _ in range(rnd.randint(0, 300)):
        role = rnd.choice(list(Role))
        peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        if rnd.random() < 0.5:
            kinds = list(RARE_KINDS if rnd.random() < 0.02 else COMMON_KINDS)
            rnd.shuffle(kinds)
            for kind in kinds:
                event = make_event(kind, rnd)
                try:
                    wires[peer] += conns[role].send(event)
                except ProtocolViolation:
                    continue
                sent[role].append(event)
                break
        elif wires[role]:  # receive_data(b"") would mean the peer closed
            wire = wires[role]
            count = len(wire) if rnd.random() < 0.5 else rnd.randint(1, len(wire))
            conns[role].receive_data(bytes(wire[:count]))
            del wire[:count]
            received[role] += drain(conns[role])
    for role in Role:
        if wires[role]:
            conns[role].receive_data(bytes(wires[role]))
            received[role] += drain(conns[role])
    assert received[Role.SERVER] == sent[Role.CLIENT]
    assert received[Role.CLIENT] == sent[Role.SERVER]
    client, server = conns[Role.CLIENT], conns[Role.SERVER]
    states = {client.our_state, client.their_state, server.our_state, server.their_state}
    if State.CLOSED not in states:
        # With nothing in flight and nobody closing, both ends agree on where they are.
        assert client.our_state is server.their_state
        assert server.our_state is client.their_state


def handshaken_for(role: Role) -> Connection:
    """A connection of ``role`` whose peer is mid-request (the server) or mid-response."""
    client, server = handshake()
    deliver(client.send(Request("put_stripe")), server)
    if role is Role.SERVER:
        return server
    deliver(client.send(End()), server)
    deliver(server.send(Response({"status": "ok"})), client)
    return client


def feed_garbage(conn: Connection, garbage: bytes, sizes: Sequence[int]) -> None:
    """Feed ``garbage`` then EOF; only ProtocolViolation may come out."""
    try:
        deliver(garbage, conn, sizes)
        conn.receive_data(b"")
        drain(conn)
    except ProtocolViolation as exc:
        violation = exc
    else:
        return
    assert violation.code in ERROR_CODES
    assert conn.their_state is State.ERROR


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["server", "client", "server-open", "client-open"]), st.binary(), piece_sizes
)
def test_garbage_only_raises_protocol_violation(
    stage: str, garbage: bytes, sizes: list[int]
) -> None:
    if stage == "server":
        conn = Connection(Role.SERVER)
    elif stage == "client":
        conn = Connection(Role.CLIENT)
        conn.send(Preface(2, 2))
    else:
        conn = handshaken_for(Role.SERVER if stage == "server-open" else Role.CLIENT)
    feed_garbage(conn, garbage, sizes)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """Plausible frames: real types (mostly), random lengths and payloads."""
    out = b""
    for _ in range(draw(st.integers(1, 5))):
        frame_type = draw(st.sampled_from(list(FrameType)) | st.integers(0, 255))
        payload = draw(
            st.binary(max_size=64)
            | json_objects.map(lambda o: json.dumps(o).encode())
            | st.builds(
                lambda c, m: json.dumps({"code": c, "message": m}).encode(), error_codes, st.text()
            )
        )
        length = draw(st.just(len(payload)) | st.integers(0, 2**32 - 1))
        out += struct.pack(">BI", frame_type, length) + payload
    return out


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([Role.SERVER, Role.CLIENT]), framed_garbage(), piece_sizes)
def test_framed_garbage_only_raises_protocol_violation(
    role: Role, garbage: bytes, sizes: list[int]
) -> None:
    feed_garbage(handshaken_for(role), garbage, sizes)


@settings(max_examples=200, deadline=None)
@given(st.lists(exchanges(), max_size=3), st.data(), piece_sizes)
def test_mutated_streams_only_raise_protocol_violation(
    script: list[tuple[list[Event], list[Event]]], data: st.DataObject, sizes: list[int]
) -> None:
    stream = bytearray(client_stream(script)[0])
    for _ in range(data.draw(st.integers(1, 3))):
        mutation = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        index = data.draw(st.integers(0, max(len(stream) - 1, 0)))
        if mutation == "flip" and stream:
            stream[index] ^= data.draw(st.integers(1, 255))
        elif mutation == "truncate":
            del stream[index:]
        elif mutation == "insert":
            stream[index:index] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del stream[index : index + data.draw(st.integers(1, 8))]
    try:
        auto_server_events(bytes(stream), sizes)
    except ProtocolViolation as exc:
        violation = exc
    else:
        return
    assert violation.code in ERROR_CODES


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.sampled_from([Role.SERVER, Role.CLIENT]))
def test_any_header_is_judged_on_its_own_five_bytes(
    frame_type: int, length: int, role: Role
) -> None:
    conn = handshaken_for(role)
    conn.receive_data(struct.pack(">BI", frame_type, length))
    try:
        event = conn.next_event()
    except ProtocolViolation:
        assert conn.buffered_bytes <= HEADER_SIZE
        return
    if event is NEED_DATA:
        # Accepted headers promise a payload within the limit for their type.
        limit = MAX_DATA_FRAME if frame_type == FrameType.DATA else MAX_JSON_FRAME
        assert 0 < length <= limit or (frame_type == FrameType.END and length == 0)
        assert frame_type in {FrameType.DATA, FrameType.END, FrameType.ERROR}
    else:
        assert frame_type == FrameType.END
        assert length == 0
        assert event == End()


# --- partial DATA: payloads as they arrive, or straight into the reader's buffer ------------


def merged(events: Iterable[Event]) -> list[Event]:
    """``events`` with each run of Data events joined into one: a body's bytes, however
    framed."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].payload + event.payload)
        else:
            out.append(event)
    return out


def response_wire(payloads: Sequence[bytes]) -> tuple[Connection, bytes]:
    """A partial_data client that has sent a request, and the server's whole answer:
    RESPONSE, a DATA frame per payload, END."""
    client, server = handshake(partial_data=True)
    deliver(send_all(client, [Request("get_stripe", {}), End()]), server)
    return client, send_all(server, [Response({}), *(Data(d) for d in payloads), End()])


big_payloads = st.lists(st.binary(min_size=1, max_size=3000), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.lists(exchanges(), max_size=4), piece_sizes)
def test_partial_data_gives_the_same_bodies_without_holding_a_data_frame(
    script: list[tuple[list[Event], list[Event]]], sizes: list[int]
) -> None:
    """With partial_data, the client's events are those of a whole-frame codec but for how
    a body's bytes are cut into Data events, none of them empty; and a DATA frame is
    never buffered whole: only a JSON frame or a header may wait for its rest."""
    client, server = handshake(partial_data=True)
    for request, response in script:
        assert deliver(send_all(client, request), server, sizes) == list(request)
        events: list[Event] = []
        for piece in chop(send_all(server, response), sizes):
            client.receive_data(piece)
            while (event := client.next_event()) is not NEED_DATA:
                events.append(event)
            assert client.buffered_bytes < HEADER_SIZE + MAX_JSON_FRAME
        assert all(e.payload for e in events if isinstance(e, Data))
        assert merged(events) == merged(response)
        assert client.our_state is State.IDLE


@settings(max_examples=150, deadline=None)
@given(big_payloads, piece_sizes, st.data())
def test_payload_bytes_received_straight_into_a_buffer_count_as_delivered(
    payloads: list[bytes], sizes: list[int], data: st.DataObject
) -> None:
    """Whenever a payload is under way and nothing is buffered, a reader may take any
    number of its bytes (up to payload_left) itself, as CodecStream.receive_into does:
    the body is whole and in order whichever bytes took which way."""
    client, wire = response_wire(payloads)
    body, pos, events = bytearray(), 0, list[Event]()
    while True:
        event = client.next_event()
        if event is not NEED_DATA:
            events.append(event)
            if isinstance(event, Data):
                body += event.payload
            if isinstance(event, End):
                break
            continue
        left = client.payload_left
        if left and not client.buffered_bytes and data.draw(st.booleans()):
            n = min(left, data.draw(st.integers(1, 2 * left)))
            body += wire[pos : pos + n]
            client.receive_payload(n)
        else:
            n = len(piece := wire[pos : pos + sizes[len(events) % len(sizes)]])
            client.receive_data(piece)
        pos += n
    assert pos == len(wire)
    assert bytes(body) == b"".join(payloads)
    assert isinstance(events[0], Response)
    assert client.our_state is State.IDLE
    assert client.payload_left == 0


def test_payload_left_counts_down_a_frame_and_its_end_is_parsed_after() -> None:
    client, wire = response_wire([b"x" * 1000])
    header_end = wire.index(b"x")  # RESPONSE, then the DATA frame's header
    client.receive_data(wire[:header_end])
    assert isinstance(client.next_event(), Response)
    assert client.next_event() is NEED_DATA
    assert client.payload_left == 1000
    client.receive_payload(600)
    assert client.payload_left == 400
    client.receive_data(wire[header_end + 600 : header_end + 700])
    assert client.next_event() == Data(b"x" * 100)
    client.receive_payload(300)
    assert client.payload_left == 0
    client.receive_data(wire[header_end + 1000 :])
    assert client.next_event() == End()


def test_receive_payload_refuses_what_the_codec_does_not_expect() -> None:
    client, wire = response_wire([b"x" * 1000])
    with pytest.raises(RuntimeError):
        client.receive_payload(1)  # no payload under way
    header_end = wire.index(b"x")
    client.receive_data(wire[: header_end + 10])
    assert isinstance(client.next_event(), Response)
    with pytest.raises(RuntimeError):
        client.receive_payload(1)  # ten bytes are buffered: they come first
    assert client.next_event() == Data(b"x" * 10)
    with pytest.raises(RuntimeError):
        client.receive_payload(991)  # past the payload's end
    with pytest.raises(RuntimeError):
        client.receive_payload(0)
    assert client.payload_left == 990
    whole = Connection(Role.CLIENT)
    with pytest.raises(RuntimeError):
        whole.receive_payload(1)


def test_partial_data_checks_a_data_header_before_taking_its_payload() -> None:
    client, wire = response_wire([])
    response_end = len(wire) - HEADER_SIZE  # before the END frame
    client.receive_data(wire[:response_end])
    assert isinstance(client.next_event(), Response)
    client.receive_data(struct.pack(">BI", FrameType.DATA, MAX_DATA_FRAME + 1))
    with pytest.raises(ProtocolViolation, match="over the limit") as info:
        client.next_event()
    assert info.value.code == "too_large"
    assert client.payload_left == 0


def test_a_connection_closed_mid_payload_is_a_violation_with_partial_data() -> None:
    client, wire = response_wire([b"x" * 1000])
    header_end = wire.index(b"x")
    client.receive_data(wire[: header_end + 10])
    assert isinstance(client.next_event(), Response)
    assert client.next_event() == Data(b"x" * 10)
    client.receive_data(b"")
    with pytest.raises(ProtocolViolation, match="middle of a frame"):
        client.next_event()


def test_a_servers_words_reach_the_user_as_one_safe_line() -> None:
    """A server's error message could carry line breaks, terminal escape sequences,
    bidirectional overrides, and kilobytes of them: escaped, and cut short."""
    from splitstore._remote import SERVER_TEXT_CHARS, error_for_code

    forged = "x\n\x1b[2K\rsplitstore: all files verified OK \u202e\u200f\ud800" + "A" * 60_000
    message = str(error_for_code("conflict", forged, "tcp server at 127.0.0.1:1"))
    assert message.isprintable()
    assert "\\u001b" in message
    assert "\\u202e" in message
    assert len(message) < SERVER_TEXT_CHARS + 200


def test_not_found_in_the_middle_of_a_body_is_not_no_such_object() -> None:
    """Before the body, 'not_found' means the object is not stored (exit 3); once its
    data has begun, it is the server failing mid-transfer, and named."""
    from splitstore import NotFoundError, ServerError
    from splitstore import _protocol as p
    from splitstore._tcp_steps import body_piece, response_fields

    with pytest.raises(NotFoundError):
        response_fields(p.Error("not_found", "no such stripe"), "tcp server at h:1")
    with pytest.raises(ServerError, match="in the middle of the data") as raised:
        body_piece(p.Error("not_found", "gone"), "tcp server at h:1")
    assert not isinstance(raised.value, NotFoundError)
    assert raised.value.server == "tcp server at h:1"
