"""The HTTPS server: a small versioned REST API over aiohttp (see docs/protocol.md).

    GET    /healthz                                   liveness, no token needed
    GET    /v1/ping                                   checks the token
    GET    /v1/objects                                committed records, NDJSON
    PUT    /v1/objects/{object_id}/stripes/{version}  upload a stripe (Content-Length required)
    GET    /v1/objects/{object_id}/stripes/{version}  download a stripe
    PUT    /v1/objects/{object_id}/record             commit a version (JSON record)
    GET    /v1/objects/{object_id}/record             the committed record
    DELETE /v1/objects/{object_id}                    delete an object
    POST   /v1/batch/put-stripes                      upload many small stripes
    POST   /v1/batch/get-stripes                      download many small stripes
    POST   /v1/batch/commit                           commit many records
    POST   /v1/batch/get-records                      read many records

aiohttp was chosen because it streams request and response bodies with back-pressure
and, measured on our kind of machine, moves about twice the bytes per second of
uvicorn with its default parser (figures in the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from . import _batch
from ._limits import ConnectionGate, check_stripe_length, gated_connection
from ._service import ServerLimits, StorageService
from ._storage import MAX_RECORD_BYTES, StorageError
from ._tenants import Tenant, TenantRegistry
from ._version import __version__

__all__ = ["HttpsServer", "start_https_server"]

log = logging.getLogger("splitstore.https")


class _AiohttpLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's log, with malformed requests at DEBUG: aiohttp logs each one at ERROR with
    a traceback, so that any client could fill a server's logs with its own mistakes."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and 400 <= exc_info.code < 500:
            self.debug(msg, *args, exc_info=exc_info, **kwargs)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "timeout": 408,
    "conflict": 409,
    "length_required": 411,
    "too_large": 413,
    "insufficient_storage": 507,
    # 507 as WebDAV answers an exceeded quota (RFC 4918, section 9.7.4 and 11.5).
    "quota_exceeded": 507,
    "internal": 500,
}
# Response bodies are streamed from disk in pieces of this size.
READ_BUFFER_BYTES = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SERVICE = web.AppKey("service", StorageService)
_TENANTS = web.AppKey("tenants", TenantRegistry)
# The tenant the request being handled was authenticated as; set by _guard for each
# request (the middleware and the handler run in the same task).
_TENANT: contextvars.ContextVar[Tenant] = contextvars.ContextVar("splitstore_tenant")
_LIMITS = web.AppKey("limits", ServerLimits)


def _error(code: str, message: str) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=_STATUS.get(code, 500), text=body, content_type="application/json")


@web.middleware
async def _request_clock(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stop the connection's header time-out while its request is served (see _limits)."""
    connection = gated_connection(request.transport)
    if connection is None:
        return await handler(request)
    connection.request_started()
    try:
        return await handler(request)
    finally:
        connection.request_finished()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every request (but /healthz) to a tenant before any body is read, and
    turn failures into JSON errors. The tenants file is re-checked each time, so a revoked
    token is refused from its next request on, even on a kept-alive connection."""
    if request.path == "/healthz":
        return await _handle(request, handler)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    tenant = (
        request.app[_TENANTS].authenticate(token.strip()) if scheme.lower() == "bearer" else None
    )
    if tenant is None:
        return _error("unauthorized", "missing or wrong access token")
    reset = _TENANT.set(tenant)
    try:
        return await _handle(request, handler)
    finally:
        _TENANT.reset(reset)


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StorageError as exc:
        return _error(exc.code, exc.message)
    except TimeoutError:
        return _error("timeout", "the client was too slow sending the request body")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error("internal", "internal server error")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "server": f"splitstore/{__version__}"})


async def _put_stripe(request: web.Request) -> web.Response:
    if request.content_length is None:
        return _error("length_required", "a stripe upload needs a Content-Length header")
    check_stripe_length(request.content_length, request.app[_LIMITS])
    length, digest = await request.app[_SERVICE].put_stripe(
        _TENANT.get(),
        request.match_info["object_id"],
        request.match_info["version_id"],
        request.content_length,
        _BodyReader(request).pieces(),
    )
    return web.json_response({"status": "ok", "length": length, "digest": digest}, status=201)


async def _get_stripe(request: web.Request) -> web.StreamResponse:
    length, chunks = await request.app[_SERVICE].open_stripe(
        _TENANT.get(), request.match_info["object_id"], request.match_info["version_id"]
    )
    async with contextlib.aclosing(chunks):
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = length
        await response.prepare(request)
        async for piece in chunks:
            await response.write(piece)
        await response.write_eof()
    return response


async def _put_record(request: web.Request) -> web.Response:
    fields = await _read_json(request)
    await request.app[_SERVICE].commit(_TENANT.get(), request.match_info["object_id"], fields)
    return web.json_response({"status": "ok"})


async def _get_record(request: web.Request) -> web.Response:
    record = await request.app[_SERVICE].get_record(_TENANT.get(), request.match_info["object_id"])
    return web.json_response({"status": "ok", "record": record.to_json()})


async def _delete(request: web.Request) -> web.Response:
    await request.app[_SERVICE].delete(_TENANT.get(), request.match_info["object_id"])
    return web.json_response({"status": "ok"})


async def _list(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for lines in request.app[_SERVICE].list_lines(_TENANT.get()):
        await response.write(lines)
    await response.write_eof()
    return response


async def _put_stripes(request: web.Request) -> web.Response:
    if request.content_length is None:
        return _error("length_required", "a batch upload needs a Content-Length header")
    body = _BodyReader(request)
    index = _parse_json_object(await body.read_line(_batch.MAX_INDEX_BYTES))
    items = _batch.parse_stripe_items(index.get("stripes"), with_lengths=True)
    for item in items:
        check_stripe_length(item.length, request.app[_LIMITS])
    total = sum(item.length or 0 for item in items)
    if request.content_length != body.consumed + total:
        raise StorageError("bad_request", "Content-Length differs from the stripes' lengths")
    stored = await request.app[_SERVICE].put_stripes(
        _TENANT.get(), items, lambda: body.read_rest(total)
    )
    stripes = [{"length": n, "digest": digest} for n, digest in stored]
    return web.json_response({"status": "ok", "stripes": stripes}, status=201)


async def _get_stripes(request: web.Request) -> web.StreamResponse:
    index = _parse_json_object(await _BodyReader(request).read_rest(_batch.MAX_INDEX_BYTES))
    items = _batch.parse_stripe_items(index.get("stripes"), with_lengths=False)
    answers, found = await request.app[_SERVICE].get_stripes(_TENANT.get(), items)
    head = json.dumps({"status": "ok", "stripes": answers}).encode() + b"\n"
    return web.Response(body=b"".join([head, *found]), content_type="application/octet-stream")


async def _commit_records(request: web.Request) -> web.Response:
    raw = await _BodyReader(request).read_rest(_batch.MAX_BATCH_RECORD_BYTES)
    entries = _batch.parse_record_lines(raw)
    results = await request.app[_SERVICE].commit_records(_TENANT.get(), entries)
    return web.json_response({"status": "ok", "results": results})


async def _get_records(request: web.Request) -> web.Response:
    index = _parse_json_object(await _BodyReader(request).read_rest(_batch.MAX_INDEX_BYTES))
    ids = _batch.parse_object_ids(index.get("object_ids"))
    lines = await request.app[_SERVICE].get_records(_TENANT.get(), ids)
    return web.Response(body=lines, content_type="application/x-ndjson")


class _BodyReader:
    """A request body read to bounds, each wait under the idle time-out."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._idle = request.app[_LIMITS].idle_timeout
        self._buffer = bytearray()
        self.consumed = 0  # bytes handed out so far

    async def read_line(self, limit: int) -> bytes:
        """Up to and without the first newline, which must come within ``limit`` bytes."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > limit or not await self._more():
                raise StorageError("bad_request", "the body must start with a JSON line")
        if end > limit:
            raise StorageError("bad_request", "the body must start with a JSON line")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self.consumed += end + 1
        return line

    async def read_rest(self, limit: int) -> bytes:
        """The rest of the body, refused once it goes over ``limit`` bytes."""
        while len(self._buffer) <= limit and await self._more():
            pass
        if len(self._buffer) > limit:
            raise StorageError("too_large", f"the body is over its limit of {limit} bytes")
        rest = bytes(self._buffer)
        self._buffer.clear()
        self.consumed += len(rest)
        return rest

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives, streamed (nothing held here)."""
        while piece := await self._next():
            yield piece

    async def _more(self) -> bool:
        piece = await self._next()
        self._buffer += piece
        return bool(piece)

    async def _next(self) -> bytes:
        try:
            async with asyncio.timeout(self._idle):
                return await self._request.content.readany()
        except ConnectionResetError as exc:  # the client went away; nothing to answer
            raise StorageError("bad_request", "the client closed the connection") from exc


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # deep nesting too: a client's mistake
        raise StorageError("bad_request", "the body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise StorageError("bad_request", "the body must be a JSON object")
    return doc


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_RECORD_BYTES:
        raise StorageError("too_large", f"a record can be at most {MAX_RECORD_BYTES} bytes")
    try:
        async with asyncio.timeout(request.app[_LIMITS].idle_timeout):
            raw = await request.read()  # bounded by the app's client_max_size
    except web.HTTPRequestEntityTooLarge as exc:
        raise StorageError(
            "too_large", f"a record can be at most {MAX_RECORD_BYTES} bytes"
        ) from exc
    return _parse_json_object(raw)


def make_app(
    service: StorageService, tenants: TenantRegistry, limits: ServerLimits
) -> web.Application:
    app = web.Application(middlewares=[_request_clock, _guard], client_max_size=MAX_RECORD_BYTES)
    app[_SERVICE] = service
    app[_TENANTS] = tenants
    app[_LIMITS] = limits
    oid = "{object_id}"
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/healthz", _healthz),
        ("GET", "/v1/ping", _healthz),
        ("GET", "/v1/objects", _list),
        ("PUT", f"/v1/objects/{oid}/stripes/{{version_id}}", _put_stripe),
        ("GET", f"/v1/objects/{oid}/stripes/{{version_id}}", _get_stripe),
        ("PUT", f"/v1/objects/{oid}/record", _put_record),
        ("GET", f"/v1/objects/{oid}/record", _get_record),
        ("DELETE", f"/v1/objects/{oid}", _delete),
        ("POST", "/v1/batch/put-stripes", _put_stripes),
        ("POST", "/v1/batch/get-stripes", _get_stripes),
        ("POST", "/v1/batch/commit", _commit_records),
        ("POST", "/v1/batch/get-records", _get_records),
        # Last: whatever matched nothing above still gets our Expect handling (a 404).
        ("*", "/{tail:.*}", _no_route),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler, expect_handler=_expect)
    return app


async def _expect(request: web.Request) -> None:
    """Answer an Expect header without echoing it: aiohttp's own handler puts the value
    in its 417 text and fails with a 500 on bytes that are not UTF-8."""
    if request.version != HttpVersion11:
        return
    if request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return
    raise web.HTTPExpectationFailed(text="unsupported Expect header")


async def _no_route(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


@dataclass
class HttpsServer:
    """A running HTTPS server; ``close()`` stops it and its open connections."""

    host: str
    port: int
    _runner: web.AppRunner
    _server: asyncio.Server
    _gate: ConnectionGate
    #: Called once the server has stopped (start_server's release of the data folder).
    after_close: list[Callable[[], None]] = field(default_factory=list)

    async def close(self) -> None:
        try:
            self._server.close()
            self._gate.close()
            await self._runner.cleanup()
        finally:
            for call in self.after_close:
                call()


async def start_https_server(
    service: StorageService,
    tenants: TenantRegistry,
    *,
    host: str,
    port: int,
    ssl_context: Any,
    limits: ServerLimits | None = None,
) -> HttpsServer:
    """Start serving on host:port (port 0 picks a free one) and return the running server."""
    limits = limits or ServerLimits()
    app = make_app(service, tenants, limits)
    runner = web.AppRunner(
        app,
        access_log=None,
        logger=_AiohttpLog(logging.getLogger("aiohttp.server")),
        handle_signals=False,
        keepalive_timeout=limits.idle_timeout,
        shutdown_timeout=1.0,
        max_line_size=8190,
        max_field_size=8190,
        read_bufsize=READ_BUFFER_BYTES,
    )
    await runner.setup()
    if runner.server is None:  # set by setup(); checked for the type checker
        raise RuntimeError("aiohttp runner did not create a server")
    # The gate counts connections before TLS and does the handshake itself (see _limits),
    # so the server listens without TLS; loop.create_server rather than web.TCPSite for it.
    gate = ConnectionGate(
        runner.server,
        limits=limits,
        ssl_context=ssl_context,
        header_timeout=limits.header_timeout,
    )
    server = await asyncio.get_running_loop().create_server(gate, host, port, backlog=128)
    bound_port = server.sockets[0].getsockname()[1]
    return HttpsServer(host, bound_port, runner, server, gate)
