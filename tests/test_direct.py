"""Large files written and read past the page cache (O_DIRECT): byte for byte the same as
the ordinary way, aligned as direct I/O needs, and the ordinary way wherever it is refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

import pytest

from splitstore import _direct, _service
from splitstore._direct import ALIGN, DIRECT_BLOCK_BYTES, DirectReader, set_direct
from splitstore._service import StripeChunks
from splitstore._syncing import SyncingWriter

SYNC = 256 * 1024  # a small sync interval: direct writes start early in the file
O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_io_here(folder: Path) -> bool:
    with (folder / "probe").open("wb") as f:
        return set_direct(f.fileno(), True)


needs_direct_io = pytest.mark.skipif(
    not O_DIRECT or not hasattr(os, "preadv"), reason="no O_DIRECT on this system"
)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    """Every write the direct module makes: (offset, length, with O_DIRECT on)."""
    seen: list[tuple[int, int, bool]] = []
    real = os.write

    def spying(fd: int, data: memoryview) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        seen.append((os.lseek(fd, 0, os.SEEK_CUR), len(data), direct))
        return real(fd, data)

    monkeypatch.setattr(os, "write", spying)
    return seen


def write_in_pieces(path: Path, data: bytes, piece: int, *, buffered: bool) -> None:
    with (
        path.open("wb", buffering=-1 if buffered else 0) as raw,
        SyncingWriter(raw, sync_every=SYNC) as w,
    ):
        for i in range(0, len(data), piece):
            w.write(data[i : i + piece])
        w.finish()
        if not buffered:
            assert not fcntl.fcntl(raw.fileno(), fcntl.F_GETFL) & O_DIRECT  # left as found


@needs_direct_io
@pytest.mark.parametrize("piece", [1000, ALIGN, 65537, 300_001])
@pytest.mark.parametrize("buffered", [False, True])
def test_a_large_file_is_written_directly_and_byte_for_byte(
    tmp_path: Path, writes: list[tuple[int, int, bool]], piece: int, buffered: bool
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    data = os.urandom(3 * DIRECT_BLOCK_BYTES + 12345)  # ends mid-block
    write_in_pieces(tmp_path / "out", data, piece, buffered=buffered)
    assert (tmp_path / "out").read_bytes() == data
    direct = [(at, n) for at, n, on in writes if on]
    assert direct, "no write went past the cache"
    assert all(at % ALIGN == 0 and n % ALIGN == 0 for at, n in direct)
    assert direct[0][0] >= SYNC  # only once the file proved large
    assert not writes[-1][2]  # the tail, the ordinary way


@pytest.mark.parametrize("refusal", ["no O_DIRECT", "write refused"])
def test_where_direct_io_is_refused_the_data_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    if refusal == "no O_DIRECT":
        monkeypatch.setattr(_direct, "set_direct", lambda fd, on: False)
    else:
        real = os.write

        def refusing(fd: int, data: memoryview) -> int:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data)

        monkeypatch.setattr(os, "write", refusing)
    data = os.urandom(2 * DIRECT_BLOCK_BYTES + 777)
    write_in_pieces(tmp_path / "out", data, 50_000, buffered=False)
    assert (tmp_path / "out").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_in_pieces(tmp_path / "out", os.urandom(2 * DIRECT_BLOCK_BYTES), 65536, buffered=False)


def test_starting_again_mid_file_keeps_only_the_new_content(tmp_path: Path) -> None:
    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC) as w,
    ):
        w.write(os.urandom(SYNC + 5000))  # the next write starts O_DIRECT
        w.write(os.urandom(70_000))  # staged, not yet written
        w.seek(0)
        w.truncate()
        again = os.urandom(SYNC * 3 + 99)
        for i in range(0, len(again), 40_000):
            w.write(again[i : i + 40_000])
        w.finish()
    assert (tmp_path / "out").read_bytes() == again


@needs_direct_io
def test_a_file_thrown_away_mid_write_is_let_go(tmp_path: Path) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")

    def fetch_that_fails() -> None:
        with (
            (tmp_path / "out").open("wb", buffering=0) as raw,
            SyncingWriter(raw, sync_every=SYNC) as w,
        ):
            w.write(os.urandom(SYNC + 1))
            w.write(os.urandom(10_000))
            raise RuntimeError("the fetch failed")

    with pytest.raises(RuntimeError):
        fetch_that_fails()
    assert (tmp_path / "out").stat().st_size <= SYNC + 1 + ALIGN  # the staged part not written


def read_directly(path: Path) -> bytes:
    with path.open("rb") as f:
        reader = DirectReader.start(f.fileno())
        assert reader is not None
        try:
            return b"".join(iter(lambda: reader.read(DIRECT_BLOCK_BYTES), b""))
        finally:
            reader.close()


@needs_direct_io
@pytest.mark.parametrize(
    "size", [0, 1, ALIGN - 1, ALIGN, DIRECT_BLOCK_BYTES + 1, 3 * DIRECT_BLOCK_BYTES]
)
def test_direct_reads_return_the_file_byte_for_byte(tmp_path: Path, size: int) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    assert read_directly(tmp_path / "in") == data


@needs_direct_io
def test_a_refused_direct_read_is_done_the_ordinary_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * DIRECT_BLOCK_BYTES + 3)
    (tmp_path / "in").write_bytes(data)
    real = os.preadv

    def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    monkeypatch.setattr(os, "preadv", refusing)
    assert read_directly(tmp_path / "in") == data


def test_a_large_stripe_is_read_whole_and_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_service, "DIRECT_READ_MIN_BYTES", 1)
    data = os.urandom(3 * DIRECT_BLOCK_BYTES + 10)
    (tmp_path / "stripe").write_bytes(data)
    f = (tmp_path / "stripe").open("rb")

    async def read_all() -> bytes:
        async with contextlib.aclosing(StripeChunks(f, len(data))) as chunks:
            return b"".join([piece async for piece in chunks])

    assert asyncio.run(read_all()) == data
    assert f.closed


def test_a_stripe_left_mid_read_is_closed_when_its_read_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response that stops (the client went away) while the next block is being read
    must not close the file under that read, and must close it once the read is done."""
    monkeypatch.setattr(_service, "DIRECT_READ_MIN_BYTES", 1)
    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)  # any file system
    release = threading.Event()
    real_preadv = os.preadv
    calls = 0

    def slow_second(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            release.wait(5)
        os.fstat(fd)  # still open
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", slow_second)
    (tmp_path / "stripe").write_bytes(os.urandom(3 * DIRECT_BLOCK_BYTES))
    f = (tmp_path / "stripe").open("rb")

    async def stop_after_one() -> bool:
        chunks = StripeChunks(f, 3 * DIRECT_BLOCK_BYTES)
        await chunks.__anext__()  # the second read starts, and waits
        await chunks.aclose()
        still_open = not f.closed
        release.set()
        for _ in range(100):
            if f.closed:
                break
            await asyncio.sleep(0.01)
        return still_open

    assert asyncio.run(stop_after_one()) is True
    assert f.closed
