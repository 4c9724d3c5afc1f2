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
from collections.abc import Callable

from ._bulk import Addresses, BulkOpener, BulkStripe, Endpoint, connect
from ._errors import ProtocolError
from ._remote import http_reply

__all__ = ["HttpBulkOpener"]


class HttpBulkOpener(BulkOpener):
    """Opens the request for one stripe (``open``, in a bulk thread)."""

    def __init__(
        self,
        endpoint: Endpoint,
        translating: Callable[[], contextlib.AbstractContextManager[None]],
        *,
        max_reply_bytes: int,
    ) -> None:
        if endpoint.ssl_context is None:  # never an unverified default context
            raise ValueError("an HTTPS connection needs the setup's TLS context")
        super().__init__(endpoint, translating)
        self._max_reply = max_reply_bytes
        # Given the socket ``connect`` made (so that each step can be cancelled), not
        # left to connect by itself.
        self._conn = http.client.HTTPSConnection(
            endpoint.host, endpoint.port, context=endpoint.ssl_context
        )
        self._resp: http.client.HTTPResponse | None = None

    def open(self, addresses: Addresses, path: str) -> BulkStripe:
        """Send the request and read the response's head; the stripe's reader, at the
        body's start. Blocking. On failure the connection is closed."""
        at, conn = self._at, self._conn
        try:
            sock = connect(at, addresses, self._held)
            conn.sock = sock
            sock.settimeout(at.io_timeout)
            conn.request("GET", path, headers={"Authorization": f"Bearer {at.token}"})
            self._resp = resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read(self._max_reply + 1)
                if len(raw) > self._max_reply:
                    raise ProtocolError(f"the {at.label} sent an oversized reply", server=at.label)
                http_reply(resp.status, raw, at.label)  # raises the server's error
                raise ProtocolError(
                    f"the {at.label} answered a stripe with HTTP {resp.status}", server=at.label
                )
            if resp.length is None:  # chunked, or to the connection's close
                raise ProtocolError(
                    f"the {at.label} sent a stripe without a length", server=at.label
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

        return BulkStripe(length, fill, self._held, self._translating)

    def close(self) -> None:
        # The response holds the socket once the server said it closes the connection.
        if self._resp is not None:
            self._resp.close()
        with contextlib.suppress(OSError):
            self._conn.close()
