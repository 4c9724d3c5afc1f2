"""Connection limits shared by both servers, enforced before a client costs anything.

A :class:`ConnectionGate` is the protocol factory a server listens with. Each accepted
connection is counted at once, in total and under its client's address, and closed on the
spot if either count is full: before its TLS handshake, the costly part, and before the
server's own protocol (aiohttp's, or the TCP server's codec stream) ever sees it. asyncio
has no hook between accepting a connection and its TLS handshake, so the servers listen
without TLS and the gate does the handshake itself with ``loop.start_tls`` once it has
admitted the client.
After that it only passes calls through, and gives the slot back when the connection ends.

For the HTTPS server the gate also keeps a request clock (slowloris): a client must send
the request line and headers within ``header_timeout``, counted from the end of the TLS
handshake for the first request and from the first byte of each later one (idle time
between requests is the idle time-out's business). The server's request handling stops
the clock with :meth:`GatedConnection.request_started` and :meth:`request_finished`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Protocol, cast

from ._service import ServerLimits
from ._storage import StorageError

#: Beyond the idle time-out, before a connection whose writing stays paused is dropped:
#: the TCP server first says why itself (a 'timeout' ERROR, within the idle time-out).
WRITE_STALL_GRACE = 2.0

__all__ = [
    "ConnectionGate",
    "GatedConnection",
    "PeerCounter",
    "check_stripe_length",
    "gated_connection",
    "peer_key",
]

log = logging.getLogger("splitstore.limits")


class InnerProtocol(Protocol):
    """What the gate passes a connection on to: a stream protocol's calls."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


# Addresses one IPv6 host commonly holds: counting a client per /64 stops it from dodging
# its limit by hopping across its own prefix.
IPV6_CLIENT_PREFIX = 64


def peer_key(peername: object) -> str | None:
    """The client address a connection is counted under, or None if it has none (gone)."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    try:
        address = ipaddress.ip_address(peername[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack socket's view of an IPv4 client
            return str(address.ipv4_mapped)
        prefix = int(address) >> (128 - IPV6_CLIENT_PREFIX) << (128 - IPV6_CLIENT_PREFIX)
        return str(ipaddress.IPv6Network((prefix, IPV6_CLIENT_PREFIX)))
    return str(address)


class PeerCounter:
    """Open connections in total and per client address, each capped."""

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self._per_peer: dict[str, int] = {}

    def count(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def admit(self, peer: str) -> bool:
        """Count one more connection of ``peer``, or return False if a cap is reached."""
        held = self._per_peer.get(peer, 0)
        if self.total >= self.max_total or held >= self.max_per_peer:
            return False
        self.total += 1
        self._per_peer[peer] = held + 1
        return True

    def release(self, peer: str) -> None:
        held = self._per_peer.get(peer, 0) - 1
        if held > 0:
            self._per_peer[peer] = held
        else:
            self._per_peer.pop(peer, None)  # no entry left behind per address ever seen
        self.total -= 1


class ConnectionGate:
    """The protocol factory for ``loop.create_server`` (which must get ``ssl=None``)."""

    def __init__(
        self,
        inner_factory: Callable[[], InnerProtocol],
        *,
        limits: ServerLimits,
        ssl_context: ssl.SSLContext | None,
        header_timeout: float | None = None,
    ) -> None:
        self.inner_factory = inner_factory
        self.counter = PeerCounter(limits.max_connections, limits.max_connections_per_client)
        self.ssl_context = ssl_context
        self.handshake_timeout = limits.handshake_timeout
        self.header_timeout = header_timeout
        # How long a connection's writing may stay paused (its client takes nothing of
        # what it is sent): then it is dropped, whatever the server was writing.
        self.write_stall_timeout = limits.idle_timeout + WRITE_STALL_GRACE
        self.refused = 0  # connections closed at once because a cap was reached
        self._open: set[GatedConnection] = set()
        self._closed = False

    def __call__(self) -> GatedConnection:
        return GatedConnection(self)

    def close(self) -> None:
        """Admit nothing more and drop connections still in their TLS handshake; the
        server closes the ones it has taken over itself."""
        self._closed = True
        for conn in list(self._open):
            conn.abort_if_not_started()


class GatedConnection(asyncio.Protocol):
    """One admitted connection: its TLS handshake, then a pass-through to the inner protocol."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._peer: str | None = None  # set while the connection holds a slot
        self._raw: asyncio.Transport | None = None
        self._inner: InnerProtocol | None = None
        self._handshake: asyncio.Task[None] | None = None
        # What TLS delivers between the end of its handshake and _start (one loop turn).
        self._early: list[bytes] = []
        self._early_eof = False
        self._lost = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._stall_timer: asyncio.TimerHandle | None = None

    # -- from the transport ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a stream server's socket transport
        self._raw = transport
        gate = self._gate
        peer = peer_key(transport.get_extra_info("peername"))
        if gate._closed or peer is None or not gate.counter.admit(peer):
            gate.refused += 1
            log.debug("refused a connection from %s: connection limit reached", peer)
            transport.abort()
            return
        self._peer = peer
        gate._open.add(self)
        if gate.ssl_context is None:
            self._start(transport)
        else:
            self._handshake = asyncio.get_running_loop().create_task(
                self._tls(transport, gate.ssl_context)
            )

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            self._early.append(data)
            return
        if (
            not self._in_request
            and self._header_timer is None
            and self._gate.header_timeout is not None
        ):
            self._arm_header_timer(self._gate.header_timeout)  # the first byte of a request
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            self._early_eof = True
            return None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(
                self._gate.write_stall_timeout, self._stalled
            )
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_stall_timer()
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._release()
        if self._inner is not None:
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    # -- the request clock -----------------------------------------------------------------

    def request_started(self) -> None:
        """The headers of a request are in: stop the clock while it is served."""
        self._in_request = True
        self._cancel_header_timer()

    def request_finished(self) -> None:
        """The request is served; the clock starts again with the next request's first byte."""
        self._in_request = False

    # -- internals -------------------------------------------------------------------------

    async def _tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self._gate.handshake_timeout,
            )
        except asyncio.CancelledError:
            self._release()
            raw.abort()
            raise
        except Exception as exc:  # a failed or timed-out handshake: nothing to answer
            log.debug("TLS handshake with %s failed: %s", self._peer, exc)
            self._release()
            raw.abort()
            return
        finally:
            self._handshake = None
        if transport is None or self._lost or self._gate._closed:
            self._release()
            raw.abort()
            return
        self._start(transport)

    def _start(self, transport: asyncio.Transport) -> None:
        inner = self._gate.inner_factory()
        self._inner = inner
        inner.connection_made(transport)
        if self._gate.header_timeout is not None:
            self._arm_header_timer(self._gate.header_timeout)  # the first request's clock
        early, self._early = self._early, []
        for data in early:
            if self._inner is not None:
                self.data_received(data)
        if self._early_eof and self._inner is not None:
            self._inner.eof_received()

    def _arm_header_timer(self, timeout: float) -> None:
        self._header_timer = asyncio.get_running_loop().call_later(timeout, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._raw is not None and not self._in_request:
            log.debug("dropped %s: its request headers took too long", self._peer)
            self._raw.abort()

    def _stalled(self) -> None:
        """The client took nothing for the write stall time-out: drop it. aiohttp waits
        on such a client with no time-out of its own, and a graceful close would wait
        for it too: the connection, and whatever the request holds open, would stay."""
        self._stall_timer = None
        if self._raw is not None:
            log.debug("dropped %s: it took nothing of what it was sent", self._peer)
            self._raw.abort()

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def abort_if_not_started(self) -> None:
        if self._inner is None and self._raw is not None:
            self._release()
            self._raw.abort()

    def _release(self) -> None:
        self._cancel_header_timer()
        self._cancel_stall_timer()
        if self._peer is not None:
            self._gate.counter.release(self._peer)
            self._peer = None
            self._gate._open.discard(self)


def gated_connection(transport: asyncio.BaseTransport | None) -> GatedConnection | None:
    """The gate's connection behind ``transport`` (as given to the inner protocol), if any."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GatedConnection) else None


def check_stripe_length(length: object, limits: ServerLimits) -> None:
    """Refuse a declared stripe length over the server's limit, before any byte of it."""
    if isinstance(length, int) and length > limits.max_stripe_bytes:
        raise StorageError(
            "too_large", f"this server takes stripes of at most {limits.max_stripe_bytes} bytes"
        )
