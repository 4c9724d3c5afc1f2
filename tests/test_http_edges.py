"""Edges of the HTTPS path and the manifest checks that a reviewer found uncovered."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from splitstore import Client, IntegrityError, ServerUnavailableError, UsageError
from splitstore._demo import run_demo
from splitstore._http_client import HttpsRemote
from splitstore._manifest import Manifest, StripeInfo
from splitstore._tls import client_ssl_context, server_ssl_context

from .conftest import LiveServers
from .test_bulk import timed_out_asking
from .test_server_robustness import status, tls_socket


def test_upload_to_a_server_that_stops_reading_times_out(servers: LiveServers) -> None:
    """aiohttp's read time-out starts after the body: our own deadline must catch a stall."""
    paths = servers.paths

    async def scenario() -> float:
        stalled: list[asyncio.StreamWriter] = []

        async def swallow_then_stall(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            stalled.append(writer)
            await reader.read(100)
            await asyncio.sleep(60)  # never reads again: the client's writes back up

        ctx = server_ssl_context(paths.server_cert, paths.server_key)
        server = await asyncio.start_server(swallow_then_stall, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        remote = HttpsRemote(
            "127.0.0.1", port, "token", client_ssl_context(paths.ca_cert), io_timeout=1.5
        )

        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * (1 << 20)

        started = time.monotonic()
        try:
            with pytest.raises(ServerUnavailableError, match="timed out"):
                await remote.put_stripe("a" * 64, "b" * 32, 1 << 40, endless())
        finally:
            await remote.close()
            for w in stalled:
                w.close()
            server.close()
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 30


def test_commit_body_in_several_writes_is_accepted(servers: LiveServers, tmp_path: Path) -> None:
    """A record that arrives in pieces (as from any client or proxy) must parse."""
    with servers.client() as client:
        (tmp_path / "f").write_bytes(b"hello world")
        info = client.store(tmp_path / "f", "f")
    record_file = servers.object_dir("https", "f") / "record.json"
    record = json.loads(record_file.read_text())["current"]
    body = json.dumps(record).encode()
    oid = servers.object_dir("https", "f").name
    head = (
        f"PUT /v1/objects/{oid}/record HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {servers.config.token()}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = tls_socket(servers, "https")
    sock.sendall(head)
    sock.sendall(body[:10])
    time.sleep(0.2)
    sock.sendall(body[10:])
    reply = sock.recv(4096)
    assert status(reply) == 200, reply
    assert record["version_id"] == info.version_id


def test_manifest_listing_other_servers_is_an_integrity_error(
    plain_servers: LiveServers, plain_client: Client, tmp_path: Path
) -> None:
    """With encryption off a server can rewrite a manifest: the client still checks it."""
    servers, client = plain_servers, plain_client
    (tmp_path / "f").write_bytes(b"x" * 3000)
    client.store(tmp_path / "f", "f")
    record_file = servers.object_dir("https", "f") / "record.json"
    doc = json.loads(record_file.read_text())
    m = Manifest.from_bytes(base64.b64decode(doc["current"]["manifest"]))
    https = m.stripe_for("https")
    forged = dataclasses.replace(
        m, size=https.length, stripes=(StripeInfo("https", https.length, https.digest),)
    )
    doc["current"]["manifest"] = base64.b64encode(forged.to_bytes()).decode()
    record_file.write_text(json.dumps(doc))
    (servers.object_dir("tcp", "f") / "record.json").unlink()
    with pytest.raises(IntegrityError, match="https server") as info:
        client.fetch("f", tmp_path / "out")
    assert info.value.server is not None
    assert not (tmp_path / "out").exists()


def test_huge_chunk_size_in_a_manifest_is_refused() -> None:
    digest = hashlib.sha256(b"").hexdigest()
    doc = {
        "format": 1,
        "name": "f",
        "size": 2,
        "chunk_size": 2**50,
        "sha256": digest,
        "version_id": "a" * 32,
        "created_ns": 1,
        "encryption": "none",
        "stripes": [
            {"server": "https", "length": 2, "sha256": digest},
            {"server": "tcp", "length": 0, "sha256": digest},
        ],
    }
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(json.dumps(doc).encode())


def test_demo_never_overwrites_a_setup(servers: LiveServers) -> None:
    before = servers.paths.token.read_text()
    with pytest.raises(UsageError, match="already holds"):
        run_demo(servers.paths.root, size_mb=0.1)
    assert servers.paths.token.read_text() == before


@pytest.mark.parametrize(
    ("path", "expect"),
    [("/v1/nowhere", b"\xa0"), ("/v1/ping", b"\xa0"), ("/v1/ping", b"100-continue")],
)
def test_expect_headers_never_make_a_500(servers: LiveServers, path: str, expect: bytes) -> None:
    """aiohttp's default Expect handler echoes the value and fails on non-UTF-8 bytes (a
    fuzzer found it); ours answers 100 Continue or 417, on every path, routed or not."""
    token = servers.config.token().encode()
    request = (
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + token + b"\r\nExpect: " + expect + b"\r\n\r\n"
    )
    with tls_socket(servers, "https") as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if expect == b"100-continue":
        assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    else:
        assert status(reply) == 417, reply[:200]


@pytest.mark.parametrize(
    "call",
    ["ping", "get_record", "pooled stripe", "bulk stripe"],
    ids=lambda c: c.replace(" ", "-"),
)
def test_a_server_that_never_ends_its_answer_times_out(servers: LiveServers, call: str) -> None:
    """Endless '100 Continue' lines: aiohttp and http.client read each within their read
    time-out and wait for the next, so only a deadline on the whole exchange (the request
    and the answer's head) ends it."""

    async def scenario() -> float:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.2)

        ctx = server_ssl_context(servers.paths.server_cert, servers.paths.server_key)
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        ctx = client_ssl_context(servers.paths.ca_cert)
        remote = HttpsRemote("127.0.0.1", port, "token", ctx, io_timeout=1.0, connect_timeout=1.0)
        try:
            return await timed_out_asking(remote, call)
        finally:
            server.close()

    assert asyncio.run(scenario()) < 10  # connect_timeout + io_timeout
