"""Bad input and faults, against real servers on loopback.

Every case checks three things: the exact SplitStoreError subclass, a message that is one
clear line naming the server concerned, and that nothing stored was lost and no partial
output was left behind (no file at the destination, no ``*.splitstore-part`` beside it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from splitstore import (
    AuthenticationError,
    Client,
    IntegrityError,
    InvalidNameError,
    LocalFileError,
    NotFoundError,
    ServerError,
    ServerUnavailableError,
    SplitStoreError,
    StorageFullError,
    TLSVerificationError,
)
from splitstore._client import AsyncClient
from splitstore._coalesce import CoalescingRemote
from splitstore._service import ServerLimits
from splitstore._setup import generate_ca, issue_server_cert
from splitstore._tcp_client import POOL_IDLE_SECONDS, TcpRemote
from splitstore._tcp_server import TcpServer

from .conftest import LiveServers, LoopThread

KINDS = ["https", "tcp"]
# How long reporting a server that is down may take (loopback refuses at once).
QUICKLY = 5.0
BIG = 64 * 1024 * 1024


# -- helpers ---------------------------------------------------------------------------


def label(servers: LiveServers, kind: str) -> str:
    return servers.config.server(kind).label  # type: ignore[arg-type]


def other(kind: str) -> str:
    return "tcp" if kind == "https" else "https"


def check_message(exc: BaseException, *mentions: str, server: str | None = None) -> str:
    """The message is one clear line, mentions what it should, and names ``server``."""
    message = str(exc)
    assert message, f"{type(exc).__name__} has no message"
    assert message == message.strip()
    for unwanted in ("\n", "\r", "Traceback", "Errno"):
        assert unwanted not in message, message
    for text in mentions:
        assert text in message, f"{text!r} not in {message!r}"
    if server is not None:
        assert server in message, f"{server!r} not named in {message!r}"
        assert getattr(exc, "server", None) == server
    return message


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def write_big(path: Path, size: int = BIG) -> None:
    """A large, mostly sparse file, with random bytes at a few places so versions differ."""
    with path.open("wb") as f:
        f.truncate(size)
        for offset in (0, size // 3, size - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))


def digest(path: Path) -> str:
    """SHA-256 of a file, read in pieces (big files are not held in memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def partials(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".splitstore-part")]


def fetched(client: Client, name: str, folder: Path) -> bytes:
    """Fetch ``name`` into a fresh file in ``folder`` and return its bytes."""
    folder.mkdir(exist_ok=True)
    out = folder / f"fetched-{time.monotonic_ns()}"
    data = client.fetch(name, out).read_bytes()
    out.unlink()
    return data


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def reconfigure(servers: LiveServers, kind: str, **changes: Any) -> None:
    """Restart one server with some of its config entry changed."""
    servers.stop(kind)
    servers.config = dataclasses.replace(
        servers.config,
        servers=tuple(
            dataclasses.replace(s, **changes) if s.kind == kind else s
            for s in servers.config.servers
        ),
    )
    servers.start(kind)


def raises_within(
    cls: type[SplitStoreError], seconds: float, call: Callable[[], object]
) -> SplitStoreError:
    start = time.monotonic()
    with pytest.raises(cls) as info:
        call()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.1f}s to report: {info.value}"
    return info.value


# -- 1. local input --------------------------------------------------------------------


def test_store_missing_file(client: Client, tmp_path: Path) -> None:
    with pytest.raises(LocalFileError) as info:
        client.store(tmp_path / "nope.bin")
    check_message(info.value, str(tmp_path / "nope.bin"), "does not exist")
    assert client.list() == []


def test_store_directory(client: Client, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(LocalFileError) as info:
        client.store(tmp_path / "folder")
    check_message(info.value, str(tmp_path / "folder"), "is a directory")
    assert client.list() == []


@pytest.fixture
def unreadable_file() -> Iterator[Path]:
    """A file of mode 000 in a folder anyone may enter (tmp_path's parents are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="splitstore-unreadable-"))
    try:
        folder.chmod(0o755)
        path = folder / "secret.bin"
        path.write_bytes(b"secret" * 100)
        path.chmod(0)
        yield path
    finally:
        shutil.rmtree(folder)


def test_store_unreadable_file(client: Client, unreadable_file: Path) -> None:
    client.list()  # connect and read the token now, while this process still may
    if os.geteuid() == 0:
        # chmod does not stop root: act as "nobody" for the store (all threads follow).
        try:
            nobody = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            nobody = 65534
        os.seteuid(nobody)
        try:
            with pytest.raises(LocalFileError) as info:
                client.store(unreadable_file)
        finally:
            os.seteuid(0)
    else:
        with pytest.raises(LocalFileError) as info:
            client.store(unreadable_file)
    check_message(info.value, str(unreadable_file), "permission denied")
    assert client.list() == []


def test_store_fifo_is_refused_without_blocking(client: Client, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(client.store, fifo)
            try:
                with pytest.raises(LocalFileError) as info:
                    future.result(timeout=QUICKLY)
            finally:
                if not future.done():  # opening blocked: give it a writer so it returns
                    with open(fifo, "wb"):
                        pass
    finally:
        fifo.unlink()
    check_message(info.value, str(fifo), "not a regular file")
    assert client.list() == []


def test_store_device_is_refused(client: Client) -> None:
    with pytest.raises(LocalFileError) as info:
        client.store("/dev/null", "null")
    check_message(info.value, "/dev/null", "not a regular file")
    assert client.list() == []


def test_empty_file_stores_and_fetches(client: Client, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    info = client.store(tmp_path / "empty")
    # Encrypted, even nothing is one sealed (empty) segment: its 16-byte tag.
    assert (info.size, info.chunks, info.bytes_per_server) == (0, 1, {"https": 16, "tcp": 0})
    out = client.fetch("empty", tmp_path / "out")
    assert out.read_bytes() == b""
    assert client.stat("empty").size == 0
    assert client.verify("empty").size == 0
    assert partials(tmp_path) == []


@pytest.mark.parametrize("op", ["fetch", "stat", "verify", "delete"])
def test_name_not_stored(client: Client, tmp_path: Path, op: str) -> None:
    write_random(tmp_path / "x", 100)
    client.store(tmp_path / "x", "stored")
    calls: dict[str, Callable[[], object]] = {
        "fetch": lambda: client.fetch("never stored", tmp_path / "out"),
        "stat": lambda: client.stat("never stored"),
        "verify": lambda: client.verify("never stored"),
        "delete": lambda: client.delete("never stored"),
    }
    with pytest.raises(NotFoundError) as info:
        calls[op]()
    check_message(info.value, "'never stored'")
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []
    assert [i.name for i in client.list()] == ["stored"]


UNUSUAL_NAMES = [
    "a/b/c.txt",
    "/absolute/path",
    "../../x",
    "..",
    "with  spaces .txt",
    "ünïcödé/日本語 ✓ 🎉",
    "n" * 1000,
    "é" * 2048,  # exactly 4096 bytes of UTF-8
]


@pytest.mark.parametrize("name", UNUSUAL_NAMES, ids=lambda n: repr(n[:20]))
def test_unusual_names_work(
    servers: LiveServers, client: Client, tmp_path: Path, name: str
) -> None:
    data = write_random(tmp_path / "in", 3000)
    assert client.store(tmp_path / "in", name).name == name
    assert client.stat(name).size == 3000
    assert client.fetch(name, tmp_path / "out").read_bytes() == data
    assert client.verify(name).name == name
    assert [i.name for i in client.list()] == [name]
    client.delete(name)
    with pytest.raises(NotFoundError):
        client.stat(name)
    # a name never becomes a path on a server
    for kind in KINDS:
        assert sorted(p.name for p in servers.data_dir(kind).iterdir()) == [
            "FORMAT",
            "lock",
            "tenants",
            "tmp",
        ]
        assert [p.name for p in (servers.data_dir(kind) / "tenants").iterdir()] == ["default"]


INVALID_NAMES = {
    "empty": ("", "cannot be empty"),
    "nul": ("a\x00b", "control characters"),
    "newline": ("two\nlines", "control characters"),
    "escape": ("\x1b[31mred", "control characters"),
    "delete": ("del\x7f", "control characters"),
    "surrogate": ("bad\ud800", "valid Unicode"),
    "4097 bytes": ("é" * 2048 + "a", "at most 4096 bytes"),
}


@pytest.mark.parametrize("op", ["store", "fetch", "stat", "verify", "delete"])
@pytest.mark.parametrize("case", list(INVALID_NAMES))
def test_invalid_names(client: Client, tmp_path: Path, case: str, op: str) -> None:
    name, reason = INVALID_NAMES[case]
    (tmp_path / "in").write_bytes(b"data")
    calls: dict[str, Callable[[], object]] = {
        "store": lambda: client.store(tmp_path / "in", name),
        "fetch": lambda: client.fetch(name, tmp_path / "out"),
        "stat": lambda: client.stat(name),
        "verify": lambda: client.verify(name),
        "delete": lambda: client.delete(name),
    }
    with pytest.raises(InvalidNameError) as info:
        calls[op]()
    message = check_message(info.value, reason)
    assert message.isprintable()
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []
    assert client.list() == []


@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a/b/../x", "dir\\..\\..\\x"])
def test_fetch_without_destination_writes_base_name_here(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    data = write_random(tmp_path / "in", 2000)
    client.store(tmp_path / "in", name)
    monkeypatch.chdir(work)
    out = client.fetch(name)
    assert out == Path("x")
    assert os.listdir(work) == ["x"]
    assert (work / "x").read_bytes() == data
    for folder in (tmp_path, tmp_path / "a", tmp_path / "a" / "b"):
        assert not (folder / "x").exists()


@pytest.mark.parametrize("name", ["dir/", "a/..", "..", ".", "/"])
def test_fetch_name_without_base_name_asks_for_destination(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    data = write_random(tmp_path / "in", 1500)
    client.store(tmp_path / "in", name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for dest in (None, work):
        with pytest.raises(LocalFileError) as info:
            client.fetch(name, dest)
        check_message(info.value, repr(name), "-o")
        assert os.listdir(work) == []
    assert client.fetch(name, work / "named").read_bytes() == data


def test_fetch_name_too_long_for_the_file_system(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "n" * 1000  # a fine stored name, but no file system takes it as a file name
    write_random(tmp_path / "in", 1500)
    client.store(tmp_path / "in", name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(LocalFileError) as info:
        client.fetch(name)
    check_message(info.value, "too long")
    assert os.listdir(work) == []


# -- 2. the destination ----------------------------------------------------------------


def test_existing_destination_needs_force(client: Client, tmp_path: Path) -> None:
    new = write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "doc")
    dest = tmp_path / "out"
    dest.write_bytes(b"precious old content")
    with pytest.raises(LocalFileError) as info:
        client.fetch("doc", dest)
    check_message(info.value, str(dest), "already exists", "--force")
    assert dest.read_bytes() == b"precious old content"
    assert partials(tmp_path) == []
    assert client.fetch("doc", dest, force=True) == dest
    assert dest.read_bytes() == new
    assert partials(tmp_path) == []


def test_existing_file_inside_destination_folder_needs_force(
    client: Client, tmp_path: Path
) -> None:
    new = write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "docs/report.pdf")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "report.pdf").write_bytes(b"old")
    with pytest.raises(LocalFileError) as info:
        client.fetch("docs/report.pdf", folder)
    check_message(info.value, str(folder / "report.pdf"), "already exists")
    assert (folder / "report.pdf").read_bytes() == b"old"
    assert client.fetch("docs/report.pdf", folder, force=True) == folder / "report.pdf"
    assert (folder / "report.pdf").read_bytes() == new
    assert os.listdir(folder) == ["report.pdf"]


def test_destination_folder_missing(client: Client, tmp_path: Path) -> None:
    write_random(tmp_path / "in", 100)
    client.store(tmp_path / "in", "doc")
    with pytest.raises(LocalFileError) as info:
        client.fetch("doc", tmp_path / "missing" / "out")
    check_message(info.value, str(tmp_path / "missing"), "does not exist")
    assert not (tmp_path / "missing").exists()
    assert partials(tmp_path) == []


def test_destination_is_a_folder(client: Client, tmp_path: Path) -> None:
    data = write_random(tmp_path / "in", 4000)
    client.store(tmp_path / "in", "photos/2024/beach.jpg")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert client.fetch("photos/2024/beach.jpg", folder) == folder / "beach.jpg"
    assert os.listdir(folder) == ["beach.jpg"]
    assert (folder / "beach.jpg").read_bytes() == data


# -- 3. a server that is down ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_server_down(servers: LiveServers, client: Client, tmp_path: Path, kind: str) -> None:
    keep = write_random(tmp_path / "keep", 5000)
    client.store(tmp_path / "keep", "keep")
    client.store(tmp_path / "keep", "doomed")
    servers.stop(kind)
    down = label(servers, kind)
    out = tmp_path / "out"
    ops: dict[str, Callable[[], object]] = {
        "store": lambda: client.store(tmp_path / "keep", "new"),
        "fetch": lambda: client.fetch("keep", out),
        "list": client.list,
        "stat": lambda: client.stat("keep"),
        "verify": lambda: client.verify("keep"),
        "delete": lambda: client.delete("doomed"),
    }
    for op, call in ops.items():
        exc = raises_within(ServerUnavailableError, QUICKLY, call)
        check_message(exc, "cannot connect to the", "connection refused", server=down)
        assert not out.exists(), op
        assert partials(tmp_path) == [], op
    # Back up: the client recovers on its own, and what was stored is intact.
    servers.start(kind)
    assert fetched(client, "keep", tmp_path / "check") == keep
    client.delete("doomed")  # finishes the delete that was cut short
    assert [i.name for i in client.list()] == ["keep"]
    assert client.verify("keep").committed_on == ("https", "tcp")


@pytest.mark.parametrize("kind", KINDS)
def test_server_restart_between_operations(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """Pooled connections to a server that went away must not fail the next operation."""
    data = write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "doc")
    servers.stop(kind)
    servers.start(kind)
    assert [i.name for i in client.list()] == ["doc"]
    assert fetched(client, "doc", tmp_path / "check") == data


def test_connections_dropped_when_idle_are_not_reused(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    """Servers close connections idle past their time-out; the next operation still works."""
    live = LiveServers(
        tmp_path / "setup", loop_thread, ServerLimits(handshake_timeout=2.0, idle_timeout=0.3)
    )
    live.start()
    try:
        with live.client() as client:
            data = write_random(tmp_path / "in", 5000)
            client.store(tmp_path / "in", "doc")
            tcp = cast(TcpServer, live.running["tcp"])
            assert wait_for(lambda: not tcp._tasks)  # it dropped the client's connections
            assert [i.name for i in client.list()] == ["doc"]
            assert fetched(client, "doc", tmp_path / "check") == data
    finally:
        live.stop()


# -- 4. a server that stops mid-transfer -----------------------------------------------


class PauseWhen:
    """A progress callback that, once ``ready()`` holds, holds the client still until
    ``resume`` is set: a slow client, so a server can be stopped mid-transfer for sure."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self.ready = ready
        self.paused = threading.Event()
        self.resume = threading.Event()

    def __call__(self, done: int, total: int) -> None:
        if not self.paused.is_set() and self.ready():
            self.paused.set()
            self.resume.wait(30)


def stop_while_paused(
    servers: LiveServers, kind: str, pause: PauseWhen, future: Future[Any]
) -> None:
    try:
        assert wait_for(lambda: pause.paused.is_set() or future.done())
        assert pause.paused.is_set(), f"the transfer ended before it could be cut: {future}"
        servers.stop(kind)
    finally:
        pause.resume.set()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_server_stops_mid_store(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    v1 = write_random(tmp_path / "v1", 100_000)
    client.store(tmp_path / "v1", "doc")
    write_big(tmp_path / "v2")
    uploads = servers.data_dir(kind) / "tmp"
    pause = PauseWhen(lambda: any(uploads.iterdir()))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.store, tmp_path / "v2", "doc", progress=pause)
        stop_while_paused(servers, kind, pause, future)
        with pytest.raises(ServerError) as info:
            future.result(timeout=30)
    assert type(info.value) is ServerUnavailableError, info.value
    check_message(info.value, server=label(servers, kind))
    # The server that stayed up drops the abandoned upload.
    assert wait_for(lambda: not any((servers.data_dir(other(kind)) / "tmp").iterdir()))
    servers.start(kind)
    assert fetched(client, "doc", tmp_path / "check") == v1
    assert client.verify("doc").size == len(v1)


class StallingRelay:
    """A relay to a server that stops taking the client's bytes once ``after`` of them
    have gone up: a server whose disk hung mid-upload. Runs on the tests' loop."""

    def __init__(self, loop_thread: LoopThread, port: int, after: int) -> None:
        self._loop_thread, self._port, self._after = loop_thread, port, after
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = loop_thread.run(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.stalled = threading.Event()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._port)

        async def up() -> None:
            sent = 0
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
                sent += len(data)
                if sent >= self._after:
                    self.stalled.set()
                    await asyncio.Event().wait()  # never reads again

        async def down() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(up(), down())
        finally:
            client_w.close()
            server_w.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in self._tasks:
                task.cancel()

        self._loop_thread.run(stop())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_server_that_stops_reading_mid_store_is_the_one_named(
    servers: LiveServers, loop_thread: LoopThread, tmp_path: Path, kind: str
) -> None:
    """Both uploads take their pieces from one reader, so the other server's upload waits
    too when one server stalls: only the stalled one may be named, and soon."""
    relay = StallingRelay(loop_thread, servers.spec(kind).port, after=4 << 20)
    try:
        config = dataclasses.replace(
            servers.config,
            io_timeout=1.5,
            servers=tuple(
                dataclasses.replace(s, port=relay.port) if s.kind == kind else s
                for s in servers.config.servers
            ),
        )
        write_big(tmp_path / "big")
        with Client(config) as client:
            exc = raises_within(
                ServerUnavailableError, 4 * 1.5, lambda: client.store(tmp_path / "big", "big")
            )
        assert relay.stalled.is_set()
        stalled = f"{kind} server at 127.0.0.1:{relay.port}"
        check_message(exc, "timed out", server=stalled)
    finally:
        relay.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_server_stops_mid_fetch(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    write_big(tmp_path / "big")
    client.store(tmp_path / "big", "big")
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    pause = PauseWhen(lambda: bool(partials(dest_dir)))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.fetch, "big", dest_dir / "big", progress=pause)
        stop_while_paused(servers, kind, pause, future)
        with pytest.raises(ServerError) as info:
            future.result(timeout=30)
    assert type(info.value) is ServerUnavailableError, info.value
    check_message(info.value, server=label(servers, kind))
    assert os.listdir(dest_dir) == []
    servers.start(kind)
    assert digest(client.fetch("big", dest_dir / "big")) == digest(tmp_path / "big")


# -- 5. a wrong token ------------------------------------------------------------------


def test_client_with_wrong_token(servers: LiveServers, tmp_path: Path) -> None:
    (tmp_path / "bad-token").write_text("not-the-right-token\n")
    config = dataclasses.replace(servers.config, token_file=tmp_path / "bad-token")
    write_random(tmp_path / "in", 100)
    with Client(config) as client:
        for call in (client.list, lambda: client.store(tmp_path / "in", "doc")):
            with pytest.raises(AuthenticationError) as info:
                call()
            server = getattr(info.value, "server", None)
            assert server in (label(servers, "https"), label(servers, "tcp"))
            check_message(info.value, "refused the access token", server=server)
    with servers.client() as client:
        assert client.list() == []


@pytest.mark.parametrize("kind", KINDS)
def test_server_refuses_token(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """Only one server has another token: the error names that one."""
    data = write_random(tmp_path / "in", 3000)
    client.store(tmp_path / "in", "doc")
    (tmp_path / "server-token").write_text("a-token-the-client-does-not-have\n")
    # A server without a tenants file accepts its one token file's token (tenant "default").
    reconfigure(servers, kind, token_file=tmp_path / "server-token", tenants_file=None)
    with servers.client() as fresh:
        for call in (
            fresh.list,
            lambda: fresh.fetch("doc", tmp_path / "out"),
            lambda: fresh.store(tmp_path / "in", "other"),
        ):
            with pytest.raises(AuthenticationError) as info:
                call()
            check_message(info.value, "refused the access token", server=label(servers, kind))
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []
    reconfigure(servers, kind, token_file=servers.paths.token)
    assert fetched(client, "doc", tmp_path / "check") == data
    assert [i.name for i in client.list()] == ["doc"]


# -- 6. certificates -------------------------------------------------------------------


def test_client_trusts_another_ca(servers: LiveServers, tmp_path: Path) -> None:
    (tmp_path / "other-ca.pem").write_bytes(generate_ca("some other CA").cert_pem)
    config = dataclasses.replace(servers.config, ca_file=tmp_path / "other-ca.pem")
    with Client(config) as client, pytest.raises(TLSVerificationError) as info:
        client.list()
    server = getattr(info.value, "server", None)
    assert server in (label(servers, "https"), label(servers, "tcp"))
    check_message(info.value, "not signed by a CA this client trusts", server=server)


def install_cert(servers: LiveServers, kind: str, folder: Path, cert: bytes, key: bytes) -> None:
    folder.mkdir()
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    reconfigure(servers, kind, cert_file=folder / "cert.pem", key_file=folder / "key.pem")


@pytest.mark.parametrize("kind", KINDS)
def test_server_certificate_from_another_ca(
    servers: LiveServers, tmp_path: Path, kind: str
) -> None:
    ca = generate_ca("an impostor CA")
    cert = issue_server_cert(ca.cert_pem, ca.key_pem)
    install_cert(servers, kind, tmp_path / "impostor", cert.cert_pem, cert.key_pem)
    with servers.client() as client, pytest.raises(TLSVerificationError) as info:
        client.list()
    check_message(
        info.value,
        "cannot trust the",
        "not signed by a CA this client trusts",
        server=label(servers, kind),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_server_certificate_for_another_host(
    servers: LiveServers, tmp_path: Path, kind: str
) -> None:
    paths = servers.paths
    cert = issue_server_cert(
        paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), hostnames=["wrong.example"]
    )
    # Over the setup's own files; the other server keeps the certificate it loaded.
    paths.server_cert.write_bytes(cert.cert_pem)
    paths.server_key.write_bytes(cert.key_pem)
    servers.stop(kind)
    servers.start(kind)
    with servers.client() as client, pytest.raises(TLSVerificationError) as info:
        client.list()
    check_message(
        info.value, "does not match the host name '127.0.0.1'", server=label(servers, kind)
    )


# -- 7. damaged data on a server -------------------------------------------------------


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def extend(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0extra")


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped": (flip, "damaged"),
    "truncated": (truncate, "cut short or extended"),
    "extended": (extend, "cut short or extended"),
    "deleted": (Path.unlink, "no longer holds"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_stripe(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str, damage: str
) -> None:
    write_random(tmp_path / "v1", 9000)
    client.store(tmp_path / "v1", "doc")
    write_random(tmp_path / "v2", 10_000)
    client.store(tmp_path / "v2", "doc")  # an older version is there, but not silently used
    harm, says = DAMAGE[damage]
    harm(servers.stripe_path(kind, "doc"))
    bad = label(servers, kind)
    dest = tmp_path / "out"
    with pytest.raises(IntegrityError) as info:
        client.fetch("doc", dest)
    check_message(info.value, "'doc'", says, server=bad)
    assert not dest.exists()
    assert partials(tmp_path) == []
    with pytest.raises(IntegrityError) as info:
        client.verify("doc")
    assert type(info.value) is IntegrityError
    check_message(info.value, "'doc'", says, server=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_record_deleted_on_one_server(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    data = write_random(tmp_path / "in", 7000)
    client.store(tmp_path / "in", "doc")
    (servers.object_dir(kind, "doc") / "record.json").unlink()
    assert fetched(client, "doc", tmp_path / "check") == data
    assert client.stat("doc").committed_on == (other(kind),)
    with pytest.raises(IntegrityError) as info:
        client.verify("doc")
    check_message(info.value, "'doc'", "cut off", server=label(servers, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_record_swapped_with_another_objects(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    write_random(tmp_path / "a", 3000)
    b = write_random(tmp_path / "b", 5000)
    client.store(tmp_path / "a", "a")
    client.store(tmp_path / "b", "b")
    shutil.copyfile(
        servers.object_dir(kind, "a") / "record.json",
        servers.object_dir(kind, "b") / "record.json",
    )
    dest = tmp_path / "out"
    calls: dict[str, Callable[[], object]] = {
        "fetch": lambda: client.fetch("b", dest),
        "stat": lambda: client.stat("b"),
        "verify": lambda: client.verify("b"),
    }
    for op, call in calls.items():
        with pytest.raises(IntegrityError) as info:
            call()
        check_message(info.value, "'b'", "another file", server=label(servers, kind))
        assert not dest.exists(), op
        assert partials(tmp_path) == [], op
    # the other file is untouched, and the listing does not show the impostor as "b"
    assert fetched(client, "a", tmp_path / "check") == (tmp_path / "a").read_bytes()
    listed = {i.name: i.committed_on for i in client.list()}
    assert listed == {"a": ("https", "tcp"), "b": (other(kind),)}
    client.store(tmp_path / "b", "b")  # storing again repairs it
    assert fetched(client, "b", tmp_path / "check") == b


# -- 8. a server's disk is full --------------------------------------------------------


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(folder: Path) -> None:
    for attempt in range(50):
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode:
            if attempt == 49:
                subprocess.run(["umount", "-l", str(folder)], check=True)
            time.sleep(0.1)
        else:
            return


def store_refused_for_space(client: Client, path: Path, name: str, server: str) -> ServerError:
    """Store ``path`` where ``server`` has no room; return the StorageFullError.

    The server lingers after its refusal so the client reads the ERROR rather than a reset;
    tried several times because a lost refusal shows only now and then.
    """
    for _ in range(5):
        with pytest.raises(StorageFullError) as info:
            client.store(path, name)
    return info.value


@pytest.mark.parametrize("kind", KINDS)
def test_disk_full_refused_up_front(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """The data folder has less room than the stripe: refused before a byte is written."""
    small = tmp_path / "small"
    mount_tmpfs(small, "2m")
    try:
        reconfigure(servers, kind, data_dir=small)
        v1 = write_random(tmp_path / "v1", 100_000)
        client.store(tmp_path / "v1", "doc")
        write_random(tmp_path / "v2", 6 * 1024 * 1024)  # 3 MiB per server
        full = store_refused_for_space(client, tmp_path / "v2", "doc", label(servers, kind))
        check_message(full, "out of space", server=label(servers, kind))
        assert fetched(client, "doc", tmp_path / "check") == v1
        assert list((small / "tmp").iterdir()) == []
    finally:
        servers.stop(kind)
        unmount(small)


@pytest.mark.parametrize("kind", KINDS)
def test_disk_fills_up_mid_upload(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """The disk fills while the stripe is being written (uploads land in tmp/ first)."""
    v1 = write_random(tmp_path / "v1", 100_000)
    client.store(tmp_path / "v1", "doc")
    uploads = servers.data_dir(kind) / "tmp"
    mount_tmpfs(uploads, "2m")
    try:
        write_random(tmp_path / "v2", 16 * 1024 * 1024)  # 8 MiB per server
        full = store_refused_for_space(client, tmp_path / "v2", "doc", label(servers, kind))
        check_message(full, "out of space", "disk is full", server=label(servers, kind))
        assert wait_for(lambda: not any(uploads.iterdir()))
        assert fetched(client, "doc", tmp_path / "check") == v1
        assert client.stat("doc").size == len(v1)
    finally:
        unmount(uploads)


# -- 9. a store cut off between the two commits ----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_store_cut_off_between_commits(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """``kind`` never got the v2 commit: its record still names v1, though it holds
    v2's stripe (uploaded before the commit), as after a crash between the commits."""
    v1 = write_random(tmp_path / "v1", 6000)
    first = client.store(tmp_path / "v1", "doc")
    folder = servers.object_dir(kind, "doc")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(folder, snapshot)
    v2 = write_random(tmp_path / "v2", 8000)
    second = client.store(tmp_path / "v2", "doc")
    for saved in snapshot.iterdir():  # record.json, and v1's stripe and meta
        shutil.copy2(saved, folder / saved.name)
    assert (folder / f"{second.version_id}.stripe").exists()

    # v2's stripes are on both servers: fetch gives v2, though only one committed it.
    assert fetched(client, "doc", tmp_path / "check") == v2
    info = client.stat("doc")
    assert (info.version_id, info.committed_on) == (second.version_id, (other(kind),))
    assert {i.name: i.committed_on for i in client.list()} == {"doc": (other(kind),)}
    with pytest.raises(IntegrityError) as exc_info:
        client.verify("doc")
    check_message(exc_info.value, "'doc'", "cut off", server=label(servers, kind))

    # Had v2's stripe not reached that server either, this client (which saw v2) refuses
    # to fall back to v1, which would roll the file back; a client that never saw v2
    # gets v1, whole.
    for suffix in (".stripe", ".meta"):
        (folder / f"{second.version_id}{suffix}").unlink()
    with pytest.raises(IntegrityError) as exc_info:
        fetched(client, "doc", tmp_path / "check")
    check_message(exc_info.value, "'doc'", "no longer holds", server=label(servers, kind))
    fresh_config = dataclasses.replace(servers.config, state_file=tmp_path / "fresh.state")
    with Client(fresh_config) as fresh:
        assert fetched(fresh, "doc", tmp_path / "check") == v1
    assert partials(tmp_path / "check") == []
    with pytest.raises(IntegrityError):
        client.verify("doc")

    # Storing again puts both servers back in step.
    v3 = write_random(tmp_path / "v3", 9000)
    third = client.store(tmp_path / "v3", "doc")
    assert client.verify("doc").committed_on == ("https", "tcp")
    assert fetched(client, "doc", tmp_path / "check") == v3
    assert third.version_id not in (first.version_id, second.version_id)


def test_a_pooled_connection_holding_unread_bytes_is_not_reused(
    servers: LiveServers, tmp_path: Path
) -> None:
    """Bytes a server sent between exchanges (the ERROR of its idle time-out, its close
    not arrived yet) answer no request: the connection is dropped, not handed to the
    next operation, which would take them for its answer."""
    write_random(tmp_path / "in", 5000)

    async def run() -> bool:
        async with AsyncClient(servers.config) as client:
            await client.store(tmp_path / "in", "doc")
            pooled = [cast(CoalescingRemote, r).remote for r in client.remotes()]
            tcp = next(cast(TcpRemote, r) for r in pooled if r.kind == "tcp")
            assert tcp._idle, "the store left its connection in the pool"
            stale = tcp._idle[-1]
            stale.stream.conn.receive_data(b"\xff" * 8)  # arrived after the last answer
            await tcp.ping()  # on a new connection, not reading those bytes
            return stale.stream.is_closing()

    assert servers.loop.run(run())


def test_a_connection_pooled_for_too_long_is_not_reused(
    servers: LiveServers, tmp_path: Path
) -> None:
    """A link idle near the server's idle time-out may be dropped by the server just as
    it is reused: past POOL_IDLE_SECONDS it is closed and a new one opened instead."""
    write_random(tmp_path / "in", 5000)

    async def run() -> tuple[bool, bool, bool]:
        async with AsyncClient(servers.config) as client:
            await client.store(tmp_path / "in", "doc")
            pooled = [cast(CoalescingRemote, r).remote for r in client.remotes()]
            tcp = next(cast(TcpRemote, r) for r in pooled if r.kind == "tcp")
            await asyncio.gather(tcp.ping(), tcp.ping(), tcp.ping())  # at least two links
            fresh = list(tcp._idle)
            await tcp.ping()  # reuses one of the links pooled just now
            reused = {id(link) for link in tcp._idle} == {id(link) for link in fresh}
            for link in fresh:
                link.idle_since -= POOL_IDLE_SECONDS + 1
            await tcp.ping()
            all_closed = all(link.stream.is_closing() for link in fresh)
            return reused and len(fresh) >= 2, all_closed, tcp._idle[-1] not in fresh

    assert servers.loop.run(run()) == (True, True, True)
