"""A large stripe fetched from the TCP server on a blocking connection of its own (``_bulk``).

The same protocol and codec as ``_tcp_client``, driven by a blocking socket in a bulk
thread: the handshake (``handshake_steps``), one ``get_stripe`` request, then the body,
each DATA payload received straight into the reader's buffer (``partial_data``). The
connection is closed afterwards, not pooled: it was opened for this stripe alone.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from . import _protocol as p
from ._bulk import Addresses, BulkOpener, BulkStripe, connect
from ._tcp_steps import (
    RECEIVE,
    body_piece,
    handshake_steps,
    next_event,
    response_fields,
    stripe_length,
)

__all__ = ["TcpBulkOpener"]

# Bytes asked of the socket at once when not inside a payload (frame headers, replies).
_RECEIVE_BYTES = 256 * 1024


class TcpBulkOpener(BulkOpener):
    """Opens the connection for one stripe (``open``, in a bulk thread)."""

    _sock: socket.socket | None = None

    def open(self, addresses: Addresses, object_id: str, version_id: str) -> BulkStripe:
        """Connect, shake hands and ask for the stripe; its reader, at the body's start.
        Blocking. On failure the socket is closed."""
        at = self._at
        try:
            self._sock = sock = connect(at, addresses, self._held)
            link = _BlockingLink(sock, at.label)
            link.handshake(at.token)
            sock.settimeout(at.io_timeout)
            link.send(p.Request("get_stripe", {"object_id": object_id, "version_id": version_id}))
            link.send(p.End({}))
            length = stripe_length(link.read_response(), at.label)
        except BaseException:
            self.close()
            raise
        return BulkStripe(length, link.fill, self._held, self._translating)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


class _BlockingLink:
    """One connection's codec, fed by a blocking socket."""

    def __init__(self, sock: socket.socket, label: str) -> None:
        self._sock = sock
        self._label = label
        self._conn = p.Connection(p.Role.CLIENT, partial_data=True)
        self._ended = False
        self._rest = memoryview(b"")  # body bytes beyond the last fill
        self._done = False  # the body's END has come

    def handshake(self, token: str) -> None:
        steps = handshake_steps(token, self._label)
        step = next(steps)
        with contextlib.suppress(StopIteration):
            while True:
                if step is RECEIVE:
                    step = steps.send(self._next())
                else:
                    self.send(step)
                    step = next(steps)

    def send(self, event: Any) -> None:
        self._sock.sendall(self._conn.send(event))

    def read_response(self) -> dict[str, Any]:
        return response_fields(self._next(), self._label)

    def fill(self, view: memoryview) -> int:
        """Fill ``view`` from the body; fewer bytes only where the body ended."""
        size = len(view)
        filled = min(size, len(self._rest))
        view[:filled] = self._rest[:filled]
        self._rest = self._rest[filled:]
        conn = self._conn
        while filled < size and not self._done:
            if conn.payload_left and not conn.buffered_bytes:
                # The rest of a DATA payload: decrypted by OpenSSL straight into ``view``.
                want = min(conn.payload_left, size - filled)
                got = self._sock.recv_into(view[filled:], want)
                if not got:
                    raise ConnectionResetError("the server closed the connection mid-transfer")
                conn.receive_payload(got)
                filled += got
                continue
            event = next_event(conn.next_event, ended=self._ended)
            if event is p.NEED_DATA:
                self._receive()
                continue
            piece = body_piece(event, self._label)
            if piece is None:
                self._done = True
                break
            take = min(len(piece), size - filled)
            view[filled : filled + take] = memoryview(piece)[:take]
            filled += take
            self._rest = memoryview(piece)[take:]
        return filled

    def _next(self) -> Any:
        while True:
            event = next_event(self._conn.next_event, ended=self._ended)
            if event is not p.NEED_DATA:
                return event
            self._receive()

    def _receive(self) -> None:
        data = self._sock.recv(_RECEIVE_BYTES)
        self._conn.receive_data(data)  # b"": the end, which the codec then judges
        self._ended = not data
