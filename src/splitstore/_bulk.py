"""Large stripes fetched on blocking sockets, in worker threads, off the event loop.

A fetch is bound by the client's GIL (docs/performance.md). On the event loop every TLS
record of a stripe passes through asyncio's SSL layer in Python, and the HTTPS stripe
through aiohttp's parser and stream buffers besides, all with the GIL held. On a blocking
socket, ``recv_into`` has OpenSSL decrypt straight into our buffer with the GIL
released: receiving 256 MiB over loopback TLS took 0.15 s of CPU this way against 0.27 s
through asyncio, and held the GIL about a tenth as long. So a stripe of at least
``BULK_READ_MIN_BYTES`` is fetched over a connection of its own, opened and read in a
thread of ``_pool``; everything else (records, listings, small stripes, uploads) stays on
the event loop, where a connection is shared and pooled. The wire is the same either way.

The remotes open such a connection (``_http_bulk``, ``_tcp_bulk``) and wrap what reads
its body in a ``BulkStripe``. A read that is cancelled (the fetch failed elsewhere, or
was given up) shuts the socket down, so that the thread, blocked in ``recv``, ends at
once rather than at its time-out; the read raises the cancellation only once the thread
has ended, as ``_threads.in_thread_to_the_end`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ._threads import outlast, shared_pool

__all__ = ["BULK_READ_MIN_BYTES", "BulkStripe", "Endpoint", "in_bulk_thread", "shut_down"]

T = TypeVar("T")

# Stripes this long or longer are fetched off the event loop. A connection of its own
# costs a TLS handshake (about a millisecond here), which a stripe of a MiB repays.
BULK_READ_MIN_BYTES = 1024 * 1024

# Threads that wait on bulk sockets: two per large fetch (one per server), and a few
# fetches at once. Their own pool, so that blocked reads never hold up the default
# executor's file and crypto work.
_pool = shared_pool(8, "splitstore-bulk")


@dataclass(frozen=True)
class Endpoint:
    """Where a remote's bulk connections go, and how: as its pooled ones do."""

    host: str
    port: int
    token: str
    ssl_context: ssl.SSLContext | None  # None: plain TCP (``tls = false``)
    connect_timeout: float
    io_timeout: float
    label: str


async def in_bulk_thread(call: Callable[[], T], sock: Callable[[], socket.socket | None]) -> T:
    """``call()`` in a bulk thread; if cancelled meanwhile, shut down ``sock()`` (the socket
    ``call`` blocks on, if any yet) and raise the cancellation once the thread has ended."""
    running = asyncio.get_running_loop().run_in_executor(_pool(), call)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        shut_down(sock())
        await outlast(running)
        raise


def shut_down(sock: socket.socket | None) -> None:
    """Stop every transfer on ``sock`` now, from any thread: a thread blocked reading it
    sees the end at once. Only the plain socket's ``shutdown`` is called: a TLS socket's
    own would also drop its TLS state, which the blocked thread is using."""
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class BulkStripe:
    """A stripe's body read by ``fill`` in a bulk thread (a ``StripeReader``).

    ``fill(view)`` blocks until ``view`` is full or the body has ended, and returns how
    many bytes it wrote; ``sock`` is the socket it reads, shut down if a read is
    cancelled. Each read returns a buffer of its own, left uninitialised (a bytearray is
    zeroed first), since every byte of it is written.
    """

    def __init__(self, length: int, fill: Callable[[memoryview], int], sock: socket.socket) -> None:
        self.length = length
        self._fill = fill
        self._sock = sock

    async def read(self, n: int) -> memoryview:
        import numpy as np  # on first use, as in _stripes

        view = np.empty(n, dtype=np.uint8).data
        filled = await in_bulk_thread(lambda: self._fill(view), lambda: self._sock)
        return view if filled == n else view[:filled]
