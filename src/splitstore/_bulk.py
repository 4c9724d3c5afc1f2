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
its body in a ``BulkStripe``. A cancelled step (the fetch failed elsewhere, or was given
up) shuts the socket down, whichever step the thread is in (connecting, the TLS
handshake, waiting for the reply or the body), so that it ends at once rather than at
its time-out; the cancellation is raised only once the thread has ended, as
``_threads.in_thread_to_the_end`` does.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._threads import outlast, shared_pool

__all__ = [
    "BULK_READ_MIN_BYTES",
    "BULK_THREADS",
    "BulkOpener",
    "BulkSocket",
    "BulkStripe",
    "Endpoint",
    "connect",
    "in_bulk_thread",
    "resolve",
    "shut_down",
]

T = TypeVar("T")

# Stripes this long or longer are fetched off the event loop. A connection of its own
# costs a TLS handshake (about a millisecond here), which a stripe of a MiB repays.
BULK_READ_MIN_BYTES = 1024 * 1024

# Threads that wait on bulk sockets: two per large fetch (one per server), and a few
# fetches at once. Their own pool, so that blocked reads never hold up the default
# executor's file and crypto work.
BULK_THREADS = 8
_pool = shared_pool(BULK_THREADS, "splitstore-bulk")


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


async def in_bulk_thread(call: Callable[[], T], on_cancel: Callable[[], None]) -> T:
    """``call()`` in a bulk thread; if cancelled meanwhile, ``on_cancel()`` (which makes
    the thread's blocking call return) and raise the cancellation once the thread ended.
    A call still queued for a thread (all busy) is dropped at once instead."""
    queued = _pool().submit(call)
    running = asyncio.wrap_future(queued)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if not queued.cancel():  # running (or done): stop it, wait for its thread
            on_cancel()
            await outlast(running)
        raise


class BulkSocket:
    """The socket of one bulk connection as it is being made, for the event loop's thread
    to shut down at any step (``cancel``); ``publish`` each socket before blocking on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.cancelled = False

    def publish(self, sock: socket.socket) -> None:
        """``sock`` is the one to shut down from now on; raises if cancelled already."""
        with self._lock:
            self._sock = sock
            cancelled = self.cancelled
        if cancelled:
            shut_down(sock)
            raise ConnectionAbortedError("the transfer was given up")

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            sock = self._sock
        shut_down(sock)


class BulkOpener(abc.ABC):
    """What opens a bulk connection for one stripe, in a bulk thread (each remote's
    ``open``): where to (``_at``), its socket as it is made (``_held``, which ``cancel``
    shuts down from any thread), and how a read of the body translates its errors into
    the remote's (``_translating``)."""

    def __init__(
        self,
        endpoint: Endpoint,
        translating: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._at = endpoint
        self._translating = translating
        self._held = BulkSocket()

    def cancel(self) -> None:
        self._held.cancel()

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection, whatever step it reached (each opener's own)."""

    @contextlib.asynccontextmanager
    async def stripe(
        self,
        open_stripe: Callable[[Addresses], BulkStripe],
        translating: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> AsyncIterator[BulkStripe]:
        """The stripe ``open_stripe`` opens in a bulk thread, after the address lookup,
        both inside ``translating``; the connection is closed when the caller is done."""
        at = self._at
        try:
            with translating():
                addresses = await resolve(at)
                # Each step in the thread has a time-out of its own, per read: the whole
                # opening (connect, handshake, the reply's head) has one too, or a server
                # dripping a byte now and then, or 100 Continue without end, would hold it.
                async with asyncio.timeout(at.connect_timeout + at.io_timeout):
                    stripe = await in_bulk_thread(lambda: open_stripe(addresses), self.cancel)
            # Outside the translation: what the caller raises here is its own (a full
            # disk is not the server's failing connection); reads translate themselves.
            yield stripe
        finally:
            self.close()


# What ``resolve`` finds: (family, type, proto, canonname, address) per address.
Addresses = list[tuple[Any, Any, int, str, Any]]


async def resolve(at: Endpoint) -> Addresses:
    """``at``'s addresses, looked up on the event loop, within ``at.connect_timeout`` (in
    a bulk thread the lookup could be neither timed out nor cancelled)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(at.connect_timeout):
        return await loop.getaddrinfo(at.host, at.port, type=socket.SOCK_STREAM)


def connect(at: Endpoint, addresses: Addresses, held: BulkSocket) -> socket.socket:
    """A socket connected to one of ``addresses`` of ``at`` (with its TLS handshake
    done, if it has a context), each step published to ``held``; blocking, the connect
    within ``at.connect_timeout`` over all addresses, and so the handshake."""
    deadline = time.monotonic() + at.connect_timeout
    error: OSError = OSError(f"no address found for {at.host}")
    for family, kind, proto, _, address in addresses:
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, kind, proto)
            held.publish(sock)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
            break
        except OSError as exc:
            if sock is not None:
                sock.close()
            if held.cancelled:
                raise
            error = exc  # the next address, as socket.create_connection does
    else:
        raise error
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if at.ssl_context is not None:
            sock.settimeout(at.connect_timeout)
            sock = at.ssl_context.wrap_socket(
                sock, server_hostname=at.host, do_handshake_on_connect=False
            )
            held.publish(sock)
            sock.do_handshake()
    except BaseException:
        sock.close()
        raise
    return sock


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
    many bytes it wrote; ``held`` is its connection's socket, shut down if a read is
    cancelled; ``translating`` turns what a read raises into the remote's errors. Each
    read returns a buffer of its own, left uninitialised (a bytearray is zeroed first),
    since every byte of it is written.
    """

    def __init__(
        self,
        length: int,
        fill: Callable[[memoryview], int],
        held: BulkSocket,
        translating: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self.length = length
        self._fill = fill
        self._held = held
        self._translating = translating

    async def read(self, n: int) -> memoryview:
        import numpy as np  # on first use, as in _stripes

        view = np.empty(n, dtype=np.uint8).data
        with self._translating():
            filled = await in_bulk_thread(lambda: self._fill(view), self._held.cancel)
        return view if filled == n else view[:filled]
