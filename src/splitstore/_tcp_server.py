"""The TCP server: an asyncio adapter around the sans-IO protocol in ``_protocol``.

Each connection does the version handshake and token check, then serves one exchange
at a time (docs/protocol.md). The token of the HELLO is authenticated again at every
request, so a revoked tenant is refused (``unauthorized``, closing) from its next request
on, even on a connection that was open before the revocation. Every wait has a time-out,
so a client that connects and says nothing, or stalls mid-body, is dropped without
holding up anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from . import _batch
from . import _protocol as p
from ._codec_stream import CodecStream
from ._limits import ConnectionGate, check_stripe_length
from ._service import ServerLimits, StorageService
from ._storage import StorageError
from ._tenants import Tenant, TenantRegistry
from ._version import __version__

__all__ = ["TcpServer", "start_tcp_server"]

log = logging.getLogger("splitstore.tcp")


class _Closed(Exception):
    """The client went away; nothing left to answer."""


class _Aborted(Exception):
    """The client aborted its request body with ERROR; the spec says no answer follows."""


# After a refusal that closes the connection, read and drop what the client is still
# sending for this long, so its kernel does not reset the connection and lose our ERROR.
LINGER_SECONDS = 1.0


@dataclass
class TcpServer:
    host: str
    port: int
    _server: asyncio.Server
    _gate: ConnectionGate
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Called once the server has stopped (start_server's release of the data folder).
    after_close: list[Callable[[], None]] = field(default_factory=list)

    async def close(self) -> None:
        try:
            self._server.close()
            self._gate.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
        finally:
            for call in self.after_close:
                call()


async def start_tcp_server(
    service: StorageService,
    tenants: TenantRegistry,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    limits: ServerLimits | None = None,
) -> TcpServer:
    limits = limits or ServerLimits()
    holder: list[TcpServer] = []

    def on_connect(stream: CodecStream) -> None:
        tasks = holder[0]._tasks
        task = asyncio.get_running_loop().create_task(
            _Session(stream, service, tenants, limits).run()
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def streams() -> CodecStream:
        # Each connection feeds the codec straight from the TLS layer, behind the gate,
        # which counts connections before TLS and does the handshake itself (see _limits).
        # partial_data: a DATA frame's bytes go on as they come, never buffered whole.
        conn = p.Connection(p.Role.SERVER, partial_data=True)
        return CodecStream(conn, on_connect=on_connect, half_close=True)

    gate = ConnectionGate(streams, limits=limits, ssl_context=ssl_context)
    server = await asyncio.get_running_loop().create_server(gate, host, port, backlog=128)
    bound = server.sockets[0].getsockname()[1]
    holder.append(TcpServer(host, bound, server, gate))
    return holder[0]


class _Session:
    def __init__(
        self,
        stream: CodecStream,
        service: StorageService,
        tenants: TenantRegistry,
        limits: ServerLimits,
    ) -> None:
        self.stream = stream
        self.service = service
        self.tenants = tenants
        self.limits = limits
        self.token = ""  # the HELLO's, once accepted
        self.conn = stream.conn

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._serve()
        except _Closed:
            pass
        except TimeoutError:
            await self._send_error("timeout", "the client was idle or too slow")
        except p.ProtocolViolation as exc:
            await self._send_error(exc.code, str(exc))
            await self._linger()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        except Exception:
            log.exception("unexpected error on a tcp connection")
            await self._send_error("internal", "internal server error")
        finally:
            self.stream.close()
            try:
                await asyncio.wait_for(self.stream.wait_closed(), 1.0)
            except Exception:
                # A peer that reads nothing never lets the last bytes out, and a graceful
                # close waits for them: drop the connection, or it holds its slot for ever.
                self.stream.abort()

    async def _handshake(self) -> bool:
        async with asyncio.timeout(self.limits.handshake_timeout):
            preface = await self._next()
            if not isinstance(preface, p.Preface):
                raise p.ProtocolViolation("expected the protocol preface")
            if not preface.min_version <= p.PROTOCOL_VERSION <= preface.max_version:
                await self._send(p.PrefaceReply(0))
                await self._send_error(
                    "unsupported_version",
                    f"this server speaks protocol version {p.PROTOCOL_VERSION} only (splitstore "
                    f"{__version__}): use a client of the same version",
                )
                return False
            await self._send(p.PrefaceReply(p.PROTOCOL_VERSION))
            hello = await self._next()
            if not isinstance(hello, p.Hello):
                raise p.ProtocolViolation("expected HELLO")
            if self.tenants.authenticate(hello.token) is None:
                await self._send_error("unauthorized", "missing or wrong access token")
                return False
            self.token = hello.token
            info = {"server": f"splitstore/{__version__}", "max_data_frame": p.MAX_DATA_FRAME}
            await self._send(p.Ready(info))
            return True

    async def _serve(self) -> None:
        while True:
            event = await self._next(self.limits.idle_timeout)
            if isinstance(event, p.ConnectionClosed):
                return
            if not isinstance(event, p.Request):
                raise p.ProtocolViolation("expected a REQUEST")
            try:
                tenant = self.tenants.authenticate(self.token)
                if tenant is None:  # revoked since the HELLO: refused before any body
                    raise StorageError("unauthorized", "the access token is no longer valid")
                await self._dispatch(tenant, event.op, event.fields)
            except _Aborted:
                continue
            except StorageError as exc:
                await self._send_error(exc.code, exc.message)
                if self.conn.our_state is p.State.CLOSED:
                    await self._linger()  # the client may still be sending its body
                    return

    async def _dispatch(self, tenant: Tenant, op: str, fields: dict[str, Any]) -> None:
        svc = self.service
        if op == "put_stripe":
            check_stripe_length(fields.get("length"), self.limits)
            length, digest = await svc.put_stripe(
                tenant,
                _str(fields, "object_id"),
                _str(fields, "version_id"),
                fields.get("length"),
                self._body(),
            )
            await self._reply({"status": "ok", "length": length, "digest": digest})
            return
        if op == "put_stripes":
            items = _batch.parse_stripe_items(fields.get("stripes"), with_lengths=True)
            for item in items:
                check_stripe_length(item.length, self.limits)
            total = sum(item.length or 0 for item in items)
            stored = await svc.put_stripes(tenant, items, lambda: self._read_body(total))
            stripes = [{"length": n, "digest": digest} for n, digest in stored]
            await self._reply({"status": "ok", "stripes": stripes})
            return
        if op == "commit_records":
            raw = await self._read_body(_batch.MAX_BATCH_RECORD_BYTES)
            results = await svc.commit_records(tenant, _batch.parse_record_lines(raw))
            await self._reply({"status": "ok", "results": results})
            return
        await self._expect_end()
        if op == "get_stripes":
            items = _batch.parse_stripe_items(fields.get("stripes"), with_lengths=False)
            answers, found = await svc.get_stripes(tenant, items)
            await self._send(p.Response({"status": "ok", "stripes": answers}))
            if found:
                self.stream.writelines(self.conn.send_data(b"".join(found)))
            await self._send(p.End({}))
        elif op == "get_records":
            ids = _batch.parse_object_ids(fields.get("object_ids"))
            lines = await svc.get_records(tenant, ids)
            await self._send(p.Response({"status": "ok"}))
            self.stream.writelines(self.conn.send_data(lines))
            await self._send(p.End({}))
        elif op == "get_stripe":
            length, chunks = await svc.open_stripe(
                tenant, _str(fields, "object_id"), _str(fields, "version_id")
            )
            async with contextlib.aclosing(chunks):
                await self._send(p.Response({"status": "ok", "length": length}))
                async for piece in chunks:
                    self.stream.writelines(self.conn.send_data(piece))
                    await self._drain()
            await self._send(p.End({}))
        elif op == "commit":
            await svc.commit(tenant, _str(fields, "object_id"), fields)
            await self._reply({"status": "ok"})
        elif op == "get_record":
            record = await svc.get_record(tenant, _str(fields, "object_id"))
            await self._reply({"status": "ok", "record": record.to_json()})
        elif op == "list":
            await self._send(p.Response({"status": "ok"}))
            async for lines in svc.list_lines(tenant):
                self.stream.writelines(self.conn.send_data(lines))
                await self._drain()
            await self._send(p.End({}))
        elif op == "delete":
            await svc.delete(tenant, _str(fields, "object_id"))
            await self._reply({"status": "ok"})
        elif op == "ping":
            await self._reply({"status": "ok"})
        else:
            raise StorageError("bad_request", f"unknown operation {op[:64]!r}")

    # -- plumbing ------------------------------------------------------------------------

    async def _body(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next(self.limits.idle_timeout)
            if isinstance(event, p.Data):
                yield event.payload
            elif isinstance(event, p.End):
                return
            elif isinstance(event, p.Error):
                raise _Aborted
            elif isinstance(event, p.ConnectionClosed):
                raise _Closed
            else:
                raise p.ProtocolViolation("expected DATA or END")

    async def _read_body(self, limit: int) -> bytes:
        """The whole request body, refused (closing) once it goes over ``limit`` bytes.

        Joined as it arrives: a body sent as many tiny DATA frames must cost its bytes,
        not an object per frame several times their size."""
        body = bytearray()
        async for piece in self._body():
            if len(body) + len(piece) > limit:
                raise StorageError("too_large", f"the body is over its limit of {limit} bytes")
            body += piece
        return bytes(body)

    async def _expect_end(self) -> None:
        async for _ in self._body():
            raise StorageError("bad_request", "this operation takes no body")

    async def _next(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        while True:
            event = self.stream.next_event()
            if event is not p.NEED_DATA:
                return event
            if self.stream.ended:
                raise _Closed
            async with asyncio.timeout(timeout):
                await self.stream.receive()

    async def _reply(self, fields: dict[str, Any]) -> None:
        self.stream.write(self.conn.send(p.Response(fields)))
        self.stream.write(self.conn.send(p.End({})))
        await self._drain()

    async def _send(self, event: Any) -> None:
        self.stream.write(self.conn.send(event))
        await self._drain()

    async def _drain(self) -> None:
        async with asyncio.timeout(self.limits.idle_timeout):
            await self.stream.drain()

    async def _linger(self) -> None:
        self.stream.discard_incoming()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_SECONDS):
                while await self.stream.receive():
                    pass

    async def _send_error(self, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self.stream.write(self.conn.send(p.Error(code, message)))
            async with asyncio.timeout(1.0):
                await self.stream.drain()


def _str(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str):
        raise StorageError("bad_request", f"'{key}' must be a string")
    return value
