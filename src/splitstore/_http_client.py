"""The client side of the HTTPS server's REST API, on one keep-alive aiohttp session."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from ._batch import MAX_BATCH_BYTES, MAX_BATCH_ITEMS
from ._bulk import BULK_READ_MIN_BYTES, BulkStripe, Endpoint
from ._errors import (
    ProtocolError,
    ServerUnavailableError,
    SplitStoreError,
    TLSVerificationError,
)
from ._http_bulk import HttpBulkOpener
from ._remote import (
    MAX_LISTING_LINE,
    ListingParser,
    StripeReader,
    connection_error,
    http_reply,
    parse_record,
    parse_reply,
    read_commit_results,
    read_put_stripes_reply,
    read_record_lines,
    record_lines_body,
    server_text,
    split_stripes,
    stripe_index,
    stripe_keys,
    upload_digest,
    why_unreachable,
)
from ._storage import MAX_RECORD_BYTES, ObjectRecord
from ._tls import describe_ssl_error

__all__ = ["HttpsRemote"]

_BINARY = {"Content-Type": "application/octet-stream"}
# A JSON reply from our server is a record or a short status; anything longer is not ours.
MAX_REPLY_BYTES = 2 * MAX_RECORD_BYTES


class HttpsRemote:
    kind = "https"

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        ssl_context: ssl.SSLContext,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        label: str | None = None,
    ) -> None:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.label = label or f"https server at {netloc}"
        self._base = f"https://{netloc}"
        self._token = token
        self._ssl = ssl_context
        self._io_timeout = io_timeout
        self._connect_timeout = connect_timeout
        # Where the blocking connections of large fetches go (``_http_bulk``).
        self._bulk_at = Endpoint(
            host, port, token, ssl_context, connect_timeout, io_timeout, self.label
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=io_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._token}"},
                read_bufsize=1024 * 1024,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- operations ----------------------------------------------------------------------

    async def ping(self) -> None:
        with self._translating():
            async with self._exchange(), self._http().get(f"{self._base}/v1/ping") as resp:
                await self._json(resp)

    async def put_stripe(
        self, object_id: str, version_id: str, length: int, body: AsyncIterator[bytes]
    ) -> str:
        url = f"{self._base}/v1/objects/{object_id}/stripes/{version_id}"
        loop = asyncio.get_running_loop()
        with self._translating():
            # aiohttp's read time-out starts only once the body is sent, so a server that
            # stops reading mid-upload would hang us: a deadline that each piece moves on.
            # It stands still while the next piece is awaited: that wait is the other
            # stripe's (the pieces come from one reader, held up by the slower upload),
            # and a stalled TCP server must not be blamed on this one.
            async with asyncio.timeout(self._io_timeout) as deadline:

                async def paced() -> AsyncIterator[bytes]:
                    pieces = aiter(body)
                    while True:
                        deadline.reschedule(None)
                        try:
                            piece = await anext(pieces)
                        except StopAsyncIteration:
                            break
                        deadline.reschedule(loop.time() + self._io_timeout)
                        yield piece
                    deadline.reschedule(loop.time() + self._io_timeout)

                reply = await self._upload(url, paced(), length)
        return upload_digest(reply, length, self.label)

    async def _upload(self, url: str, body: AsyncIterator[bytes], length: int) -> dict[str, Any]:
        async with self._http().put(
            url,
            data=body,
            headers={
                "Content-Length": str(length),
                "Content-Type": "application/octet-stream",
            },
        ) as resp:
            return await self._json(resp)

    @asynccontextmanager
    async def get_stripe(
        self, object_id: str, version_id: str, *, expected_length: int | None = None
    ) -> AsyncIterator[StripeReader]:
        path = f"/v1/objects/{object_id}/stripes/{version_id}"
        if expected_length is not None and expected_length >= BULK_READ_MIN_BYTES:
            async with self._bulk_stripe(path) as bulk:
                yield bulk
            return
        url = f"{self._base}{path}"
        async with contextlib.AsyncExitStack() as stack:
            with self._translating():
                async with self._exchange():  # the head; each read of the body has its own
                    resp = await stack.enter_async_context(self._http().get(url))
                    if resp.status != 200:
                        await self._json(resp)
                if resp.content_length is None:
                    raise ProtocolError(
                        f"the {self.label} sent a stripe without a length", server=self.label
                    )
            yield _HttpStripe(resp, self)  # the caller's errors are its own; reads translate

    @asynccontextmanager
    async def _bulk_stripe(self, path: str) -> AsyncIterator[BulkStripe]:
        """A large stripe, on a blocking connection of its own read in bulk threads."""
        opener = HttpBulkOpener(
            self._bulk_at,
            lambda: self._translating_bulk(in_body=True),
            max_reply_bytes=MAX_REPLY_BYTES,
        )
        opening = opener.stripe(
            lambda addresses: opener.open(addresses, path),
            lambda: self._translating_bulk(in_body=False),
        )
        async with opening as stripe:
            yield stripe

    async def commit(self, object_id: str, record: ObjectRecord) -> None:
        url = f"{self._base}/v1/objects/{object_id}/record"
        with self._translating():
            async with self._exchange(), self._http().put(url, json=record.to_json()) as resp:
                await self._json(resp)

    async def get_record(self, object_id: str) -> ObjectRecord:
        url = f"{self._base}/v1/objects/{object_id}/record"
        with self._translating():
            async with self._exchange(), self._http().get(url) as resp:
                reply = await self._json(resp)
        return parse_record(reply.get("record"), self.label)

    async def list_records(self) -> AsyncIterator[tuple[str, ObjectRecord]]:
        with self._translating():
            async with self._http().get(f"{self._base}/v1/objects") as resp:
                if resp.status != 200:
                    await self._json(resp)
                listing = ListingParser(self.label)
                async for piece in resp.content.iter_any():
                    for item in listing.feed(piece):
                        yield item
                listing.close()

    async def delete(self, object_id: str) -> None:
        url = f"{self._base}/v1/objects/{object_id}"
        with self._translating():
            async with self._exchange(), self._http().delete(url) as resp:
                await self._json(resp)

    # -- batches -------------------------------------------------------------------------

    async def put_stripes(self, stripes: Sequence[tuple[str, str, bytes]]) -> list[str]:
        index = json.dumps({"stripes": stripe_index(stripes)}).encode()
        body = b"".join([index, b"\n", *(data for _, _, data in stripes)])
        url = f"{self._base}/v1/batch/put-stripes"
        with self._translating():
            async with self._exchange(), self._http().post(url, data=body, headers=_BINARY) as resp:
                reply = await self._json(resp)
        return read_put_stripes_reply(reply, [len(d) for _, _, d in stripes], self.label)

    async def commit_records(
        self, records: Sequence[tuple[str, ObjectRecord]]
    ) -> list[SplitStoreError | None]:
        url = f"{self._base}/v1/batch/commit"
        with self._translating():
            lines = record_lines_body(records)
            async with self._exchange(), self._http().post(url, data=lines) as resp:
                reply = await self._json(resp)
        return read_commit_results(reply, len(records), self.label)

    async def get_records(self, object_ids: Sequence[str]) -> list[ObjectRecord | SplitStoreError]:
        body = await self._post_for_body(
            "get-records", {"object_ids": list(object_ids)}, MAX_BATCH_ITEMS * MAX_LISTING_LINE
        )
        return read_record_lines(body, object_ids, self.label)

    async def get_stripes(
        self, stripes: Sequence[tuple[str, str]]
    ) -> list[bytes | SplitStoreError | None]:
        index = stripe_keys(stripes)
        # The answer is a JSON line, then the stripes' bytes.
        body = await self._post_for_body(
            "get-stripes", {"stripes": index}, MAX_REPLY_BYTES + MAX_BATCH_BYTES
        )
        head, newline, data = body.partition(b"\n")
        if not newline:
            raise ProtocolError(f"the {self.label} sent a malformed batch", server=self.label)
        return split_stripes(parse_reply(head, self.label), data, len(stripes), self.label)

    async def _post_for_body(self, what: str, doc: dict[str, Any], limit: int) -> bytes:
        url = f"{self._base}/v1/batch/{what}"
        with self._translating():
            async with self._exchange(), self._http().post(url, json=doc) as resp:
                if resp.status != 200:
                    await self._json(resp)
                if resp.content_length is not None and resp.content_length > limit:
                    raise ProtocolError(
                        f"the {self.label} sent an oversized batch", server=self.label
                    )
                body = await resp.content.read(limit + 1)
                while len(body) <= limit and (piece := await resp.content.read(limit + 1)):
                    body += piece
                if len(body) > limit:
                    raise ProtocolError(
                        f"the {self.label} sent an oversized batch", server=self.label
                    )
                return body

    # -- helpers -------------------------------------------------------------------------

    def _exchange(self) -> asyncio.Timeout:
        """The deadline of an exchange of bounded size (a request and its reply, or a
        stripe's head): io_timeout in all. aiohttp's read time-out is per read, so without
        it a server sending a byte now and then (or 100 Continue without end) would hold
        the exchange for days. aiohttp's connect, within it, has connect_timeout."""
        return asyncio.timeout(self._connect_timeout + self._io_timeout)

    async def _json(self, resp: aiohttp.ClientResponse) -> dict[str, Any]:
        """Read a JSON reply; raise the matching error for a non-2xx status."""
        # read(n) returns what is buffered, not n bytes: gather to the end, bounded.
        raw = b""
        while piece := await resp.content.read(MAX_REPLY_BYTES + 1 - len(raw)):
            raw += piece
            if len(raw) > MAX_REPLY_BYTES:
                raise ProtocolError(f"the {self.label} sent an oversized reply", server=self.label)
        return http_reply(resp.status, raw, self.label)

    @contextmanager
    def _translating(self) -> Iterator[None]:
        """Turn aiohttp and socket errors into SplitStoreErrors that name this server."""
        label = self.label
        try:
            yield
        except aiohttp.ClientConnectorCertificateError as exc:
            raise TLSVerificationError(
                f"cannot trust the {label}: {describe_ssl_error(exc.certificate_error)}",
                server=label,
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise TLSVerificationError(
                f"TLS with the {label} failed: {describe_ssl_error(exc)}", server=label
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            # Worded as on the TCP server's connections: not "Connect call failed (...)".
            reason = why_unreachable(exc.os_error) or exc.strerror or str(exc.os_error)
            raise ServerUnavailableError(
                f"cannot connect to the {label}: {reason}", server=label
            ) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise ServerUnavailableError(
                f"the {label} closed the connection mid-transfer", server=label
            ) from exc
        except aiohttp.ClientOSError as exc:
            raise ServerUnavailableError(
                f"the connection to the {label} failed: {exc.strerror or exc}", server=label
            ) from exc
        except TimeoutError as exc:
            raise ServerUnavailableError(f"the {label} timed out", server=label) from exc
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            raise ServerUnavailableError(
                f"talking to the {label} failed: {exc}", server=label
            ) from exc

    @contextmanager
    def _translating_bulk(self, *, in_body: bool) -> Iterator[None]:
        """As ``_translating``, for the blocking connections of large fetches
        (``_http_bulk``); ``in_body``: reading the body, past the TLS handshake."""
        label = self.label
        try:
            yield
        except TimeoutError as exc:
            raise ServerUnavailableError(f"the {label} timed out", server=label) from exc
        except (http.client.IncompleteRead, http.client.RemoteDisconnected) as exc:
            raise ServerUnavailableError(
                f"the {label} closed the connection mid-transfer", server=label
            ) from exc
        except http.client.HTTPException as exc:
            raise ServerUnavailableError(
                f"talking to the {label} failed: {server_text(repr(exc))}", server=label
            ) from exc
        except OSError as exc:  # ssl.SSLError included
            raise connection_error(exc, label, in_body=in_body) from exc


class _HttpStripe:
    def __init__(self, resp: aiohttp.ClientResponse, remote: HttpsRemote) -> None:
        self._resp = resp
        self._remote = remote
        self.length: int = resp.content_length or 0

    async def read(self, n: int) -> bytes:
        with self._remote._translating():
            try:
                return await self._resp.content.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                # The stream ended early: hand back what did arrive, the caller judges it.
                return exc.partial
