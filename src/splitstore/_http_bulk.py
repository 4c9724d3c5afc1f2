"""A large stripe fetched from the HTTPS server on a blocking connection of its own (``_bulk``).

One ``GET`` of the stripe through the standard library's ``http.client`` (its parser; we
write none), with the same TLS context, token and time-outs as the aiohttp session that
carries everything else. The response's body is read with ``readinto``, which for a body
of known length reads from the TLS socket straight into the reader's buffer. The
connection is closed afterwards, not pooled: it was opened for this stripe alone.
"""

from __future__ import annotations

import contextlib
import http.client
import socket

from ._bulk import BulkStripe, Endpoint
from ._errors import ProtocolError
from ._remote import http_reply

__all__ = ["HttpBulkOpener"]


class HttpBulkOpener:
    """Opens the request for one stripe, in a bulk thread (``open``); ``sock`` is its
    socket once there is one, for ``_bulk`` to shut down if the opening is cancelled."""

    def __init__(self, endpoint: Endpoint, *, max_reply_bytes: int) -> None:
        if endpoint.ssl_context is None:  # never an unverified default context
            raise ValueError("an HTTPS connection needs the setup's TLS context")
        self.label = endpoint.label
        self._token = endpoint.token
        self._io_timeout = endpoint.io_timeout
        self._max_reply = max_reply_bytes
        self._conn = http.client.HTTPSConnection(
            endpoint.host,
            endpoint.port,
            timeout=endpoint.connect_timeout,
            context=endpoint.ssl_context,
        )
        self.sock: socket.socket | None = None

    def open(self, path: str) -> BulkStripe:
        """Send the request and read the response's head; the stripe's reader, at the
        body's start. Blocking. On failure the connection is closed."""
        conn = self._conn
        try:
            conn.connect()
            self.sock = sock = conn.sock
            sock.settimeout(self._io_timeout)
            conn.request("GET", path, headers={"Authorization": f"Bearer {self._token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read(self._max_reply + 1)
                if len(raw) > self._max_reply:
                    raise ProtocolError(
                        f"the {self.label} sent an oversized reply", server=self.label
                    )
                http_reply(resp.status, raw, self.label)  # raises the server's error
                raise ProtocolError(
                    f"the {self.label} answered a stripe with HTTP {resp.status}",
                    server=self.label,
                )
            if resp.length is None:  # chunked, or to the connection's close
                raise ProtocolError(
                    f"the {self.label} sent a stripe without a length", server=self.label
                )
        except BaseException:
            self.close()
            raise
        length = resp.length

        def fill(view: memoryview) -> int:
            filled = 0
            while filled < len(view):
                got = resp.readinto(view[filled:])
                if not got:
                    if resp.length:  # bytes were due: the connection was cut
                        raise http.client.IncompleteRead(b"", resp.length)
                    break
                filled += got
            return filled

        return BulkStripe(length, fill, sock)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()
