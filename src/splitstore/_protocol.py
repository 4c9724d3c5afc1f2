"""Sans-IO implementation of the splitstore TCP wire protocol, version 2.

No sockets and no asyncio here: a :class:`Connection` turns received bytes into events
(:meth:`Connection.receive_data`, :meth:`Connection.next_event`) and events into bytes
(:meth:`Connection.send`, :meth:`Connection.send_data`), and checks on both paths that the
sequence is legal for each side. The I/O code around it decides when to read, write and close.

The protocol in brief (the full spec, with byte layouts, is ``docs/protocol.md``):

* The client opens with an 8-byte preface (``SPST``, its min and max version, 2 zero bytes);
  the server answers with 8 bytes (``SPST``, the chosen version or 0 to refuse, 3 zero bytes).
* Everything after that is a frame: u8 type, u32 big-endian payload length, payload.
* The client sends HELLO (token), the server READY, or ERROR and closes.
* An exchange: the client sends REQUEST, DATA*, END; the server RESPONSE, DATA*, END.
  An ERROR may replace the next frame of the sender's own message. One exchange at a time.

Memory stays bounded: a frame header announcing more than the limit for its type is rejected
as soon as its 5 bytes are in, so at most one frame (at most 1 MiB + 5 bytes) is ever buffered
by a caller that drains :meth:`Connection.next_event` before feeding more data.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "ERROR_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DATA_FRAME",
    "MAX_JSON_FRAME",
    "NEED_DATA",
    "PREFACE_SIZE",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionClosed",
    "Data",
    "End",
    "Error",
    "Event",
    "FrameType",
    "Hello",
    "NeedData",
    "Preface",
    "PrefaceReply",
    "ProtocolViolation",
    "Ready",
    "Request",
    "Response",
    "Role",
    "State",
    "choose_version",
]

# Lets either side tell at once that the peer is not a splitstore peer (e.g. an HTTP client).
MAGIC: Final = b"SPST"
# The only version this module speaks; the preface lets a later one be negotiated.
# Version 2 (splitstore 0.2) answers uploads with a named stripe digest in place of
# version 1's SHA-256 (docs/protocol.md §12); the framing is the same.
PROTOCOL_VERSION: Final = 2
# JSON frames carry a few ids and a base64 manifest; 64 KiB is ample and bounds parse cost.
MAX_JSON_FRAME: Final = 64 * 1024
# Large enough to make per-frame overhead negligible, small enough to bound the read buffer.
MAX_DATA_FRAME: Final = 1024 * 1024
# The preface and its reply have the same size so both are read with one fixed-size read.
PREFACE_SIZE: Final = 8
# u8 frame type + u32 big-endian payload length.
HEADER_SIZE: Final = 5

ERROR_CODES: Final = frozenset(
    {
        "bad_request",
        "unauthorized",
        "not_found",
        "conflict",
        "too_large",
        "insufficient_storage",
        "quota_exceeded",
        "unsupported_version",
        "timeout",
        "internal",
    }
)

_HEADER: Final = struct.Struct(">BI")
_PREFACE: Final = struct.Struct(">4sBB2x")
_PREFACE_REPLY: Final = struct.Struct(">4sB3x")
# Below this many consumed bytes, compacting the buffer costs more than it frees.
_COMPACT_MIN: Final = 64 * 1024


class ProtocolViolation(Exception):
    """A side broke the protocol: the peer (raised by ``next_event``) or we (by ``send``).

    ``code`` is the error code to put in an ERROR frame if one is sent back, usually
    ``"bad_request"``, or ``"too_large"`` for a frame over the limits.
    """

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """What one side may send next. Each role uses a subset; see ``_TRANSITIONS``."""

    # client only
    SEND_PREFACE = "SEND_PREFACE"
    AWAIT_REPLY = "AWAIT_REPLY"  # preface sent, waiting for the server's reply
    SEND_HELLO = "SEND_HELLO"
    AWAIT_READY = "AWAIT_READY"
    AWAIT_RESPONSE = "AWAIT_RESPONSE"  # request complete, waiting for the server's END/ERROR
    # server only
    AWAIT_PREFACE = "AWAIT_PREFACE"
    SEND_REPLY = "SEND_REPLY"
    SEND_REFUSAL = "SEND_REFUSAL"  # replied version 0; the ERROR saying why must follow
    AWAIT_HELLO = "AWAIT_HELLO"
    SEND_READY = "SEND_READY"
    AWAIT_BODY = "AWAIT_BODY"  # the client is still sending its request
    SEND_RESPONSE = "SEND_RESPONSE"
    # both
    IDLE = "IDLE"  # between exchanges
    SEND_BODY = "SEND_BODY"  # inside our message: DATA, END or ERROR next
    CLOSED = "CLOSED"  # will send nothing more
    ERROR = "ERROR"  # broke the protocol (only ever the peer's state)


class FrameType(enum.IntEnum):
    HELLO = 0x01
    READY = 0x02
    REQUEST = 0x10
    RESPONSE = 0x11
    DATA = 0x20
    END = 0x21
    ERROR = 0x30


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event`` when more bytes are needed to complete the next event.
NEED_DATA: Final = _NeedData.NEED_DATA
NeedData: TypeAlias = Literal[_NeedData.NEED_DATA]


# --- events -------------------------------------------------------------------------------
# Events check their own invariants so that an invalid one can be neither sent nor received.


def _check_u8(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= 255:
        raise ProtocolViolation(f"{name} must be an integer from 0 to 255, not {value!r}")


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ProtocolViolation(f"{name} must be a string, not {type(value).__name__}")


def _check_object(name: str, value: object) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolViolation(f"{name} must be a dict with string keys")


@dataclass(frozen=True, slots=True)
class Preface:
    """The client's opening: the range of protocol versions it speaks."""

    min_version: int
    max_version: int

    def __post_init__(self) -> None:
        _check_u8("min_version", self.min_version)
        _check_u8("max_version", self.max_version)


@dataclass(frozen=True, slots=True)
class PrefaceReply:
    """The server's answer to the preface: the chosen version, or 0 for no common version."""

    version: int

    def __post_init__(self) -> None:
        _check_u8("version", self.version)


@dataclass(frozen=True, slots=True)
class Hello:
    token: str

    def __post_init__(self) -> None:
        _check_str("token", self.token)


@dataclass(frozen=True, slots=True)
class Ready:
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_object("READY payload", self.info)


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    fields: dict[str, Any] = field(default_factory=dict)  # the op's arguments, without "op"

    def __post_init__(self) -> None:
        _check_str("op", self.op)
        _check_object("request fields", self.fields)
        if "op" in self.fields:
            raise ProtocolViolation("request fields must not repeat 'op'")


@dataclass(frozen=True, slots=True)
class Response:
    fields: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_object("response fields", self.fields)


@dataclass(frozen=True, slots=True)
class Data:
    payload: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.payload, bytes):
            raise ProtocolViolation("DATA payload must be bytes")
        if not self.payload:
            # An empty DATA frame would be a no-op a peer could repeat forever.
            raise ProtocolViolation("DATA payload must not be empty")
        if len(self.payload) > MAX_DATA_FRAME:
            raise ProtocolViolation(
                f"DATA payload of {len(self.payload)} bytes is over {MAX_DATA_FRAME}", "too_large"
            )


@dataclass(frozen=True, slots=True)
class End:
    trailer: dict[str, Any] = field(default_factory=dict)  # {} is sent as an empty payload

    def __post_init__(self) -> None:
        _check_object("END trailer", self.trailer)


@dataclass(frozen=True, slots=True)
class Error:
    """Ends the sender's message. Any non-empty code is accepted on receipt, so that codes
    added later stay readable; ``send`` only lets the codes of ``ERROR_CODES`` out."""

    code: str
    message: str

    def __post_init__(self) -> None:
        _check_str("code", self.code)
        _check_str("message", self.message)
        if not self.code:
            raise ProtocolViolation("error code must not be empty")


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection between messages (received), or we close it (sent)."""


Event: TypeAlias = (
    Preface
    | PrefaceReply
    | Hello
    | Ready
    | Request
    | Response
    | Data
    | End
    | Error
    | ConnectionClosed
)


def choose_version(preface: Preface) -> int:
    """The version a server should reply to ``preface`` with: the highest version both
    sides speak, or 0 when there is none."""
    if preface.min_version <= PROTOCOL_VERSION <= preface.max_version:
        return PROTOCOL_VERSION
    return 0


# --- state machine ------------------------------------------------------------------------


class _Refusal:
    """Transition key for ``PrefaceReply(0)``, which leads elsewhere than an accepting reply."""


# What each role may send in each state, and the state that follows. Missing = nothing.
# Both directions are checked against this one table: our sends and the peer's frames.
_TRANSITIONS: Final[dict[Role, dict[State, dict[type, State]]]] = {
    Role.CLIENT: {
        State.SEND_PREFACE: {Preface: State.AWAIT_REPLY},
        State.SEND_HELLO: {Hello: State.AWAIT_READY},
        State.IDLE: {Request: State.SEND_BODY},
        # An ERROR aborts the request; the server sends nothing for it.
        State.SEND_BODY: {Data: State.SEND_BODY, End: State.AWAIT_RESPONSE, Error: State.IDLE},
    },
    Role.SERVER: {
        State.SEND_REPLY: {PrefaceReply: State.AWAIT_HELLO, _Refusal: State.SEND_REFUSAL},
        State.SEND_REFUSAL: {Error: State.CLOSED},
        # An ERROR anywhere but as the answer to a complete request means "and now I close".
        State.AWAIT_HELLO: {Error: State.CLOSED},
        State.SEND_READY: {Ready: State.IDLE, Error: State.CLOSED},
        State.IDLE: {Error: State.CLOSED},
        State.AWAIT_BODY: {Error: State.CLOSED},
        State.SEND_RESPONSE: {Response: State.SEND_BODY, Error: State.IDLE},
        State.SEND_BODY: {Data: State.SEND_BODY, End: State.IDLE, Error: State.IDLE},
    },
}

# How one side's move unblocks the other: (client, server) -> (client, server), applied until
# nothing matches. Kept apart from _TRANSITIONS because they depend on both states at once.
_SETTLE: Final[dict[tuple[State, State], tuple[State, State]]] = {
    (State.AWAIT_REPLY, State.AWAIT_PREFACE): (State.AWAIT_REPLY, State.SEND_REPLY),
    (State.AWAIT_REPLY, State.AWAIT_HELLO): (State.SEND_HELLO, State.AWAIT_HELLO),
    (State.AWAIT_REPLY, State.SEND_REFUSAL): (State.CLOSED, State.SEND_REFUSAL),
    (State.AWAIT_READY, State.AWAIT_HELLO): (State.AWAIT_READY, State.SEND_READY),
    (State.AWAIT_READY, State.IDLE): (State.IDLE, State.IDLE),
    (State.SEND_BODY, State.IDLE): (State.SEND_BODY, State.AWAIT_BODY),
    (State.IDLE, State.AWAIT_BODY): (State.IDLE, State.IDLE),  # the client aborted
    (State.AWAIT_RESPONSE, State.AWAIT_BODY): (State.AWAIT_RESPONSE, State.SEND_RESPONSE),
    (State.AWAIT_RESPONSE, State.IDLE): (State.IDLE, State.IDLE),
    # Only seen by a server that gave up with an ERROR while the client, not knowing yet,
    # finished its request: the client may go on, the server will answer nothing.
    (State.AWAIT_RESPONSE, State.CLOSED): (State.IDLE, State.CLOSED),
}

# Before these, the sender's framing is not established, so not even an ERROR can be sent.
_UNFRAMED: Final = frozenset({State.SEND_PREFACE, State.AWAIT_PREFACE, State.SEND_REPLY})

_FRAME_EVENT: Final[dict[int, type]] = {
    FrameType.HELLO: Hello,
    FrameType.READY: Ready,
    FrameType.REQUEST: Request,
    FrameType.RESPONSE: Response,
    FrameType.DATA: Data,
    FrameType.END: End,
    FrameType.ERROR: Error,
}
_EVENT_FRAME: Final[dict[type, FrameType]] = {cls: FrameType(t) for t, cls in _FRAME_EVENT.items()}


def _event_key(event: Event) -> type:
    if isinstance(event, PrefaceReply) and event.version == 0:
        return _Refusal
    return type(event)


def _name(key: type) -> str:
    if key is _Refusal:
        return "PREFACE_REPLY(0)"
    if key in (Preface, PrefaceReply):
        return key.__name__.upper()
    return _EVENT_FRAME[key].name


# --- JSON payloads ------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys are read differently by different parsers; refuse the ambiguity.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _decode_json(raw: bytes | bytearray, what: str) -> dict[str, Any]:
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:  # ValueError covers UnicodeDecodeError
        raise ProtocolViolation(f"{what} payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolViolation(f"{what} payload must be a JSON object")
    return obj


def _encode_json(obj: dict[str, Any], what: str) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"{what} payload cannot be sent as JSON: {exc}") from None
    if len(raw) > MAX_JSON_FRAME:
        raise ProtocolViolation(
            f"{what} payload is {len(raw)} bytes of JSON, over {MAX_JSON_FRAME}", "too_large"
        )
    return raw


def _json_of(event: Event) -> dict[str, Any]:
    if isinstance(event, Hello):
        return {"token": event.token}
    if isinstance(event, Ready):
        return event.info
    if isinstance(event, Request):
        return {"op": event.op, **event.fields}
    if isinstance(event, Response):
        return event.fields
    if isinstance(event, End):
        return event.trailer
    if isinstance(event, Error):
        return {"code": event.code, "message": event.message}
    raise TypeError(f"{type(event).__name__} has no JSON payload")


def _event_from_json(cls: type, obj: dict[str, Any]) -> Event:
    # Keys a frame does not define are ignored, so later versions can add optional ones.
    if cls is Hello:
        return Hello(_required_str(obj, "token", "HELLO"))
    if cls is Ready:
        return Ready(obj)
    if cls is Request:
        op = _required_str(obj, "op", "REQUEST")
        del obj["op"]
        return Request(op, obj)
    if cls is Response:
        return Response(obj)
    if cls is End:
        return End(obj)
    if cls is Error:
        return Error(_required_str(obj, "code", "ERROR"), _required_str(obj, "message", "ERROR"))
    raise TypeError(f"{cls.__name__} has no JSON payload")


def _required_str(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolViolation(f"{what} payload needs a string {key!r}")
    return value


# --- connection ---------------------------------------------------------------------------


class Connection:
    """One end of a splitstore connection: bytes in, events out; events in, bytes out.

    Calling ``next_event`` until it returns ``NEED_DATA`` before passing more bytes to
    ``receive_data`` keeps the buffer at most one frame long; a caller that passes bytes
    as they arrive bounds it itself (``buffered_bytes``, as ``CodecStream`` does). After
    ``next_event`` raised ``ProtocolViolation``, it raises again on every call; the caller
    may still send one ``Error`` (then our state is CLOSED) and should close the connection.

    A failed ``send`` leaves the connection as it was: nothing was emitted.

    With ``partial_data``, a DATA frame's payload comes out as it arrives, in one or more
    ``Data`` events (the protocol gives frame boundaries no meaning), so a DATA frame
    need never be buffered whole, and its bytes may bypass the buffer altogether
    (``payload_left``, ``receive_payload``).
    """

    def __init__(self, role: Role, *, partial_data: bool = False) -> None:
        self.our_role: Final = role
        # DATA payloads as their bytes arrive, not whole frames (see ``receive_payload``).
        self.partial_data: Final = partial_data
        self._payload_left = 0  # of the DATA frame being received, with partial_data
        self.their_role: Final = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._states = {Role.CLIENT: State.SEND_PREFACE, Role.SERVER: State.AWAIT_PREFACE}
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already consumed; compacted lazily to avoid O(n^2)
        self._eof = False
        self._closed_delivered = False
        self._violation: ProtocolViolation | None = None
        self._client_preface: Preface | None = None  # the range the client offered
        self._version: int | None = None

    @property
    def our_state(self) -> State:
        return self._states[self.our_role]

    @property
    def their_state(self) -> State:
        return self._states[self.their_role]

    @property
    def version(self) -> int | None:
        """The negotiated version: None before the preface reply, 0 if the server refused."""
        return self._version

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet turned into events."""
        return len(self._buf) - self._pos

    @property
    def payload_left(self) -> int:
        """With ``partial_data``: bytes of the DATA payload being received still to come
        (some may be buffered already), else 0."""
        return self._payload_left

    def receive_payload(self, nbytes: int) -> None:
        """Count ``nbytes`` of the DATA payload being received as delivered: the caller
        read them from the connection straight into a buffer of its own, so they never
        pass through this one. Only with ``partial_data``, with nothing buffered (every
        earlier byte came out as events), and for at most ``payload_left`` bytes."""
        if not (0 < nbytes <= self._payload_left) or self.buffered_bytes:
            raise RuntimeError(
                f"{nbytes} payload bytes delivered with {self._payload_left} expected and "
                f"{self.buffered_bytes} buffered"
            )
        self._payload_left -= nbytes

    # -- receiving --

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the peer; ``b""`` means the peer closed the connection."""
        if self._violation is not None:
            return  # nothing more will be parsed; do not let the buffer grow
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ProtocolViolation("data received after the peer closed the connection")
        if self._pos:
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif self._pos >= _COMPACT_MIN and self._pos * 2 >= len(self._buf):
                # Moves at most as many bytes as were consumed since the last compaction.
                del self._buf[: self._pos]
                self._pos = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next event from the peer, or ``NEED_DATA``. Raises ``ProtocolViolation``."""
        if self._violation is not None:
            raise ProtocolViolation(str(self._violation), self._violation.code)
        try:
            return self._next_event()
        except ProtocolViolation as exc:
            self._violation = exc
            self._states[self.their_role] = State.ERROR
            self._buf = bytearray()  # nothing more will be parsed
            self._pos = self._payload_left = 0
            raise

    def _next_event(self) -> Event | NeedData:
        if self._closed_delivered:
            return ConnectionClosed()
        their_state = self.their_state
        avail = len(self._buf) - self._pos
        if self._payload_left:
            return self._payload_piece(avail)
        if avail == 0:
            if not self._eof:
                return NEED_DATA
            # Mid-message is fine if we had already given up on the exchange (e.g. a client
            # stopping its upload on the server's ERROR), not otherwise: data was cut off.
            if their_state is State.SEND_BODY and self.our_state is not State.CLOSED:
                raise ProtocolViolation(
                    f"the {self.their_role.value} closed the connection in the middle of a message"
                )
            self._states[Role.CLIENT] = self._states[Role.SERVER] = State.CLOSED
            self._closed_delivered = True
            return ConnectionClosed()
        if not _TRANSITIONS[self.their_role].get(their_state):
            raise ProtocolViolation(
                f"unexpected data from the {self.their_role.value} in state {their_state.name}"
            )
        if self.their_role is Role.CLIENT and their_state is State.SEND_PREFACE:
            return self._parse_preface(avail)
        if self.their_role is Role.SERVER and their_state is State.SEND_REPLY:
            return self._parse_preface(avail)
        return self._parse_frame(avail)

    def _parse_preface(self, avail: int) -> Event | NeedData:
        pos = self._pos
        seen = min(avail, len(MAGIC))
        if self._buf[pos : pos + seen] != MAGIC[:seen]:
            raise ProtocolViolation(f"the {self.their_role.value} is not speaking splitstore")
        if avail < PREFACE_SIZE:
            if self._eof:
                raise ProtocolViolation("the connection closed in the middle of the preface")
            return NEED_DATA
        # The reserved bytes are ignored, so a later version may give them a meaning.
        event: Event
        if self.their_role is Role.CLIENT:
            _, lo, hi = _PREFACE.unpack_from(self._buf, pos)
            event = Preface(lo, hi)
            self._client_preface = event
        else:
            _, version = _PREFACE_REPLY.unpack_from(self._buf, pos)
            offered = self._client_preface
            in_range = offered is not None and offered.min_version <= version <= offered.max_version
            if version and not in_range:
                raise ProtocolViolation(
                    f"the server chose version {version}, which was not offered",
                    "unsupported_version",
                )
            event = PrefaceReply(version)
            self._version = version
        self._pos = pos + PREFACE_SIZE
        self._advance(self.their_role, _event_key(event), received=True)
        return event

    def _parse_frame(self, avail: int) -> Event | NeedData:
        if avail < HEADER_SIZE:
            if self._eof:
                raise ProtocolViolation("the connection closed in the middle of a frame header")
            return NEED_DATA
        pos = self._pos
        frame_type, length = _HEADER.unpack_from(self._buf, pos)
        cls = _FRAME_EVENT.get(frame_type)
        if cls is None:
            raise ProtocolViolation(f"unknown frame type 0x{frame_type:02x}")
        # Check everything the header tells before waiting for (and buffering) the payload.
        self._next_state(self.their_role, cls)
        limit = MAX_DATA_FRAME if cls is Data else MAX_JSON_FRAME
        if length > limit:
            raise ProtocolViolation(
                f"{_name(cls)} frame of {length} bytes is over the limit of {limit}", "too_large"
            )
        if cls is Data and length == 0:
            raise ProtocolViolation("empty DATA frame")
        if cls is Data and self.partial_data:
            self._pos = pos + HEADER_SIZE
            self._payload_left = length
            self._advance(self.their_role, cls, received=True)
            return self._payload_piece(avail - HEADER_SIZE)
        end = pos + HEADER_SIZE + length
        if avail < HEADER_SIZE + length:
            if self._eof:
                raise ProtocolViolation("the connection closed in the middle of a frame")
            return NEED_DATA
        event: Event
        if cls is Data:
            event = self._data(pos + HEADER_SIZE, end)
        elif cls is End and length == 0:
            event = End()
        else:
            raw = self._buf[pos + HEADER_SIZE : end]
            event = _event_from_json(cls, _decode_json(raw, _name(cls)))
        self._pos = end
        self._advance(self.their_role, cls, received=True)
        return event

    def _data(self, start: int, end: int) -> Data:
        # One copy, straight from the buffer into the bytes the event keeps.
        with memoryview(self._buf) as view:
            return Data(bytes(view[start:end]))

    def _payload_piece(self, avail: int) -> Data | NeedData:
        """With ``partial_data``: what is buffered of the DATA payload being received."""
        if not avail:
            if self._eof:
                raise ProtocolViolation("the connection closed in the middle of a frame")
            return NEED_DATA
        pos = self._pos
        end = pos + min(avail, self._payload_left)
        event = self._data(pos, end)
        self._pos = end
        self._payload_left -= end - pos
        return event

    # -- sending --

    def send(self, event: Event) -> bytes:
        """The bytes for ``event``. Raises ``ProtocolViolation`` if we may not send it now.

        ``send(ConnectionClosed())`` records that we are closing and returns ``b""``.
        """
        if isinstance(event, ConnectionClosed):
            self._states[self.our_role] = State.CLOSED
            self._settle()
            return b""
        key = _event_key(event)
        self._next_state(self.our_role, key)
        if isinstance(event, Preface):
            # Offer only what this module speaks, so any version the server picks is usable.
            if not event.min_version == event.max_version == PROTOCOL_VERSION:
                raise ProtocolViolation(
                    f"the preface may only offer version {PROTOCOL_VERSION}, the one spoken here"
                )
            out = _PREFACE.pack(MAGIC, event.min_version, event.max_version)
            self._client_preface = event
        elif isinstance(event, PrefaceReply):
            if event.version and (
                self._client_preface is None
                or event.version != choose_version(self._client_preface)
            ):
                raise ProtocolViolation(
                    f"cannot choose version {event.version} for this client", "unsupported_version"
                )
            out = _PREFACE_REPLY.pack(MAGIC, event.version)
            self._version = event.version
        elif isinstance(event, Data):
            out = _HEADER.pack(FrameType.DATA, len(event.payload)) + event.payload
        else:
            if isinstance(event, Error) and event.code not in ERROR_CODES:
                raise ProtocolViolation(f"unknown error code {event.code!r}")
            if isinstance(event, End) and not event.trailer:
                payload = b""
            else:
                payload = _encode_json(_json_of(event), _name(key))
            out = _HEADER.pack(_EVENT_FRAME[key], len(payload)) + payload
        self._advance(self.our_role, key, received=False)
        return out

    def send_data(self, payload: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """DATA frames for ``payload`` as ``[header, chunk, header, chunk, ...]``.

        The chunks are views of ``payload``, not copies, ready for ``writelines``; the caller
        must not change ``payload`` until they are written. An empty payload gives ``[]``.
        """
        self._next_state(self.our_role, Data)
        view = memoryview(payload)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = view.nbytes
        if isinstance(payload, bytes) and 0 < size <= MAX_DATA_FRAME:
            return [_HEADER.pack(FrameType.DATA, size), payload]
        pieces: list[bytes | memoryview] = []
        for start in range(0, size, MAX_DATA_FRAME):
            chunk = view[start : start + MAX_DATA_FRAME]
            pieces.append(_HEADER.pack(FrameType.DATA, len(chunk)))
            pieces.append(chunk)
        return pieces

    # -- state --

    def _next_state(self, role: Role, key: type) -> State:
        state = self._states[role]
        if role is self.our_role and self.their_state is State.ERROR:
            # The peer broke the protocol: one last ERROR saying so is all that makes sense.
            if key is Error and state not in _UNFRAMED and state is not State.CLOSED:
                return State.CLOSED
            raise ProtocolViolation(
                f"the {self.their_role.value} broke the protocol; only an ERROR can be sent"
            )
        new = _TRANSITIONS[role].get(state, {}).get(key)
        if new is None:
            if role is self.their_role:
                raise ProtocolViolation(
                    f"the {role.value} may not send {_name(key)} in state {state.name}"
                )
            raise ProtocolViolation(
                f"cannot send {_name(key)} as {role.value} in state {state.name}"
            )
        return new

    def _advance(self, role: Role, key: type, *, received: bool) -> None:
        new = self._next_state(role, key)
        self._states[role] = new
        if received and new is State.CLOSED:
            # The server's ERROR said it is closing: nothing we send would be read.
            self._states[self.our_role] = State.CLOSED
        self._settle()

    def _settle(self) -> None:
        while True:
            pair = (self._states[Role.CLIENT], self._states[Role.SERVER])
            settled = _SETTLE.get(pair)
            if settled is None:
                return
            self._states[Role.CLIENT], self._states[Role.SERVER] = settled
