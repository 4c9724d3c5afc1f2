"""Large files written and read past the page cache (O_DIRECT): byte for byte the same as
the ordinary way, aligned as direct I/O needs, and the ordinary way wherever it is refused."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from splitstore import _direct, _service
from splitstore._direct import ALIGN, DIRECT_BLOCK_BYTES, DirectReader, set_direct
from splitstore._service import StripeChunks
from splitstore._syncing import SyncingWriter

fcntl = pytest.importorskip("fcntl")  # O_DIRECT is toggled with fcntl: not on Windows

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
        assert not fcntl.fcntl(raw.fileno(), fcntl.F_GETFL) & O_DIRECT  # off again


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


def test_where_there_is_no_direct_io_the_data_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: False)
    data = os.urandom(2 * DIRECT_BLOCK_BYTES + 777)
    write_in_pieces(tmp_path / "out", data, 50_000, buffered=False)
    assert (tmp_path / "out").read_bytes() == data


@needs_direct_io
@pytest.mark.parametrize("refusal", ["refused", "cut short"])
def test_a_direct_write_refused_or_cut_short_is_finished_the_ordinary_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    real = os.write
    odd: list[int] = []

    def unhelpful(fd: int, data: memoryview) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & O_DIRECT:
            return real(fd, data)
        if refusal == "refused":
            odd.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        # Part of the block, and not a whole number of ALIGN: the offset is then unaligned.
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        try:
            n = real(fd, data[: len(data) // 2 + 1])
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        odd.append(n)
        return n

    monkeypatch.setattr(os, "write", unhelpful)
    data = os.urandom(3 * DIRECT_BLOCK_BYTES + 777)
    write_in_pieces(tmp_path / "out", data, 50_000, buffered=False)
    assert (tmp_path / "out").read_bytes() == data
    assert len(odd) == 1  # once: the rest of the file went the ordinary way


@needs_direct_io
def test_after_a_refusal_the_file_stops_going_through_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    real = os.write

    def refusing(fd: int, data: memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)  # each sync over at once
    data = os.urandom(SYNC + 2 * DIRECT_BLOCK_BYTES + SYNC)
    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC) as w,
    ):
        w.write(data[: SYNC + 1])  # O_DIRECT is due
        w.write(data[SYNC + 1 : SYNC + DIRECT_BLOCK_BYTES + 1])  # the stage's block: refused
        assert w._stage is not None
        time.sleep(0.05)  # room for the background sync to end before the next is due
        w.write(data[SYNC + DIRECT_BLOCK_BYTES + 1 :])  # past the next sync
        assert w._stage is None  # ended there: no more copying through it
        w.finish()
    assert (tmp_path / "out").read_bytes() == data


def test_after_a_failed_write_the_file_refuses_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry after a failure must not give a file that looks complete and is not: part
    of a block may be on disk and staged bytes lost."""
    real = os.write
    fail = [True]

    def full_once(fd: int, data: memoryview) -> int:
        if fail[0]:
            fail[0] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC) as w,
    ):
        w.write(os.urandom(SYNC + 1))
        monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)  # any file system
        monkeypatch.setattr(os, "write", full_once)
        with pytest.raises(OSError, match="No space"):
            w.write(os.urandom(2 * DIRECT_BLOCK_BYTES))  # fills the stage: a write fails
        with pytest.raises(OSError, match="earlier write to this file failed"):
            w.write(b"more")
        with pytest.raises(OSError, match="earlier write to this file failed"):
            w.finish()


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_in_pieces(tmp_path / "out", os.urandom(2 * DIRECT_BLOCK_BYTES), 65536, buffered=False)


def test_starting_again_mid_file_keeps_only_the_new_content(
    tmp_path: Path, writes: list[tuple[int, int, bool]]
) -> None:
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
    if direct_io_here(tmp_path):
        assert any(on for *_, on in writes)  # both contents went past the cache in part


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
        reader = DirectReader.start(f)
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
    direct_reads: list[int] = []
    real_preadv = os.preadv

    def spying(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            direct_reads.append(offset)
        return real_preadv(fd, buffers, offset)

    if hasattr(os, "preadv"):
        monkeypatch.setattr(os, "preadv", spying)
    f = (tmp_path / "stripe").open("rb")

    async def read_all() -> bytes:
        async with contextlib.aclosing(StripeChunks(f, len(data))) as chunks:
            return b"".join([piece async for piece in chunks])

    assert asyncio.run(read_all()) == data
    assert f.closed
    if O_DIRECT and hasattr(os, "preadv") and direct_io_here(tmp_path):
        assert direct_reads == [i * DIRECT_BLOCK_BYTES for i in range(4)]


@needs_direct_io
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
    opened: list[int] = []

    def slow_second(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            release.wait(5)
        os.fstat(fd)  # still open: raises if it was closed
        opened.append(calls)
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
    assert opened == [1, 2]  # the held-up read still found its file open
