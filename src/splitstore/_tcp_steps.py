"""The client's side of TCP exchanges, without I/O.

Shared by the pooled links on the event loop (``_tcp_client``) and the blocking ones of
large fetches (``_tcp_bulk``), so that both speak and judge the protocol alike.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Final

from . import _protocol as p
from ._errors import ProtocolError, ServerError
from ._remote import raise_for_code, server_text
from ._version import __version__

__all__ = [
    "RECEIVE",
    "body_piece",
    "handshake_steps",
    "next_event",
    "response_fields",
    "stripe_length",
]

# What ``handshake_steps`` yields where it needs the server's next event.
RECEIVE: Final = object()


def handshake_steps(token: str, label: str) -> Generator[Any, Any, None]:
    """The client's side of the handshake, without I/O: yields each event to send, and
    ``RECEIVE`` where it needs the server's next event, which the caller sends in. Ends
    when the connection is ready for requests; raises what went wrong."""
    yield p.Preface(p.PROTOCOL_VERSION, p.PROTOCOL_VERSION)
    reply = yield RECEIVE
    if isinstance(reply, p.PrefaceReply) and reply.version == 0:
        error = yield RECEIVE
        message = error.message if isinstance(error, p.Error) else "no common version"
        raise ProtocolError(
            f"the {label} speaks another protocol version ({server_text(message)}); "
            f"this client, splitstore {__version__}, speaks protocol version "
            f"{p.PROTOCOL_VERSION}: "
            "run the same splitstore version on the client and the servers",
            server=label,
        )
    if not isinstance(reply, p.PrefaceReply):
        raise p.ProtocolViolation("expected the preface reply")
    yield p.Hello(token)
    ready = yield RECEIVE
    if isinstance(ready, p.Error):
        raise_for_code(ready.code, ready.message, label)
    if not isinstance(ready, p.Ready):
        raise p.ProtocolViolation("expected READY")


def next_event(pull: Callable[[], Any], *, ended: bool) -> Any:
    """The server's next event from the codec (``pull``), or NEED_DATA. ``ended``: the
    connection has ended and the codec been told so; a message cut short then means the
    server went away."""
    try:
        event = pull()
    except p.ProtocolViolation as exc:
        if ended:  # cut off mid-message: the server went away, not misspoke
            raise ConnectionResetError("the server closed the connection mid-transfer") from exc
        raise
    if isinstance(event, p.ConnectionClosed):
        raise ConnectionResetError("the server closed the connection")
    return event


def response_fields(event: Any, label: str) -> dict[str, Any]:
    """A RESPONSE event's fields; the server's error raised for an ERROR."""
    if isinstance(event, p.Error):
        raise_for_code(event.code, event.message, label)
    if not isinstance(event, p.Response):
        raise p.ProtocolViolation("expected RESPONSE")
    return event.fields


def body_piece(event: Any, label: str) -> bytes | None:
    """A response body event's bytes; None at the END."""
    if isinstance(event, p.Data):
        return event.payload
    if isinstance(event, p.End):
        return None
    if isinstance(event, p.Error):
        if event.code == "not_found":  # the body had begun: not "no such object"
            raise ServerError(
                f"the {label} stopped in the middle of the data it was sending (not_found)",
                server=label,
            )
        raise_for_code(event.code, event.message, label)
    raise p.ProtocolViolation("expected DATA or END")


def stripe_length(reply: dict[str, Any], label: str) -> int:
    """The length a get_stripe response announces."""
    length = reply.get("length")
    if not isinstance(length, int) or length < 0:
        raise ProtocolError(f"the {label} sent a bad stripe length", server=label)
    return length
