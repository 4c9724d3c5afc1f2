"""Large files written and read past the page cache (O_DIRECT): byte for byte the same as
the ordinary way, aligned as direct I/O needs, and the ordinary way wherever it is refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitstore import _direct, _service, _syncing
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
    """Every write the direct module makes: (offset, length, with O_DIRECT on), in the
    order they ended (with writer threads, not always the file's order)."""
    seen: list[tuple[int, int, bool]] = []
    real = os.pwrite

    def spying(fd: int, data: memoryview, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        n = real(fd, data, offset)
        seen.append((offset, len(data), direct))
        return n

    monkeypatch.setattr(os, "pwrite", spying)
    return seen


def write_in_pieces(path: Path, data: bytes, piece: int, *, buffered: bool, depth: int = 1) -> None:
    with (
        path.open("wb", buffering=-1 if buffered else 0) as raw,
        SyncingWriter(raw, sync_every=SYNC, write_depth=depth) as w,
    ):
        for i in range(0, len(data), piece):
            w.write(data[i : i + piece])
        w.finish()
        assert not fcntl.fcntl(raw.fileno(), fcntl.F_GETFL) & O_DIRECT  # off again
        assert raw.tell() == len(data)  # the position at the end, as after ordinary writes


@needs_direct_io
@pytest.mark.parametrize("piece", [1000, ALIGN, 65537, 300_001])
@pytest.mark.parametrize("buffered", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_a_large_file_is_written_directly_and_byte_for_byte(
    tmp_path: Path,
    writes: list[tuple[int, int, bool]],
    piece: int,
    buffered: bool,
    depth: int,
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    data = os.urandom(6 * DIRECT_BLOCK_BYTES + 12345)  # ends mid-block
    write_in_pieces(tmp_path / "out", data, piece, buffered=buffered, depth=depth)
    assert (tmp_path / "out").read_bytes() == data
    writes.sort()
    direct = [(at, n) for at, n, on in writes if on]
    assert direct, "no write went past the cache"
    assert all(at % ALIGN == 0 and n % ALIGN == 0 for at, n in direct)
    assert direct[0][0] >= SYNC  # only once the file proved large
    assert not writes[-1][2]  # the tail, the ordinary way
    # Each byte from the stage's start written once, none twice, none left out.
    assert all(a + n == b for (a, n, _), (b, _, _) in itertools.pairwise(writes))
    assert writes[-1][0] + writes[-1][1] == len(data)


def test_where_there_is_no_direct_io_the_data_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: False)
    data = os.urandom(2 * DIRECT_BLOCK_BYTES + 777)
    write_in_pieces(tmp_path / "out", data, 50_000, buffered=False)
    assert (tmp_path / "out").read_bytes() == data


@needs_direct_io
@pytest.mark.parametrize("refusal", ["refused", "cut short"])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("switch", ["quick", "slow"])
def test_a_direct_write_refused_or_cut_short_is_finished_the_ordinary_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: str, depth: int, switch: str
) -> None:
    """With writer threads, the others go on once one turns O_DIRECT off; "slow" widens
    the moment the flag takes to go off, in which no thread may write the ordinary way
    (such a write, unaligned, would be refused while the flag is still on)."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    if switch == "slow":
        real_set = _direct.set_direct

        def slow_set(fd: int, on: bool) -> bool:
            if not on:
                time.sleep(0.05)
            return real_set(fd, on)

        monkeypatch.setattr(_direct, "set_direct", slow_set)
    real = os.pwrite
    odd: list[int] = []

    def unhelpful(fd: int, data: memoryview, offset: int) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not flags & O_DIRECT:
            return real(fd, data, offset)
        if refusal == "refused":
            odd.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        # Part of the block, and not a whole number of ALIGN: the offset is then unaligned.
        # Written through a descriptor of its own without O_DIRECT: toggling the flag of
        # the shared one would race with another writer thread turning it off for good.
        plain = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            n = real(plain, data[: len(data) // 2 + 1], offset)
        finally:
            os.close(plain)
        odd.append(n)
        return n

    monkeypatch.setattr(os, "pwrite", unhelpful)
    data = os.urandom(3 * DIRECT_BLOCK_BYTES + 777)
    write_in_pieces(tmp_path / "out", data, 50_000, buffered=False, depth=depth)
    assert (tmp_path / "out").read_bytes() == data
    # Once: the rest of the file went the ordinary way (with writer threads, also those
    # that had already found O_DIRECT on).
    assert 1 <= len(odd) <= depth


def fail_direct_writes(
    monkeypatch: pytest.MonkeyPatch, error: OSError, *, after: threading.Event | None = None
) -> None:
    """Every write made while O_DIRECT is on raises ``error`` (once ``after`` is set, if
    given); ordinary writes go through."""
    real = os.pwrite

    def failing(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            if after is not None:
                after.wait(10)
            raise error
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)


@needs_direct_io
def test_after_a_refusal_the_file_stops_going_through_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    fail_direct_writes(monkeypatch, OSError(errno.EINVAL, "Invalid argument"))
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
    real = os.pwrite
    fail = [True]

    def full_once(fd: int, data: memoryview, offset: int) -> int:
        if fail[0]:
            fail[0] = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC) as w,
    ):
        w.write(os.urandom(SYNC + 1))
        monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)  # any file system
        monkeypatch.setattr(os, "pwrite", full_once)
        with pytest.raises(OSError, match="No space"):
            w.write(os.urandom(2 * DIRECT_BLOCK_BYTES))  # fills the stage: a write fails
        with pytest.raises(OSError, match="earlier write to this file failed"):
            w.write(b"more")
        with pytest.raises(OSError, match="earlier write to this file failed"):
            w.finish()


@pytest.mark.parametrize("depth", [1, 3])
def test_other_write_errors_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: True)
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        write_in_pieces(
            tmp_path / "out", os.urandom(2 * DIRECT_BLOCK_BYTES), 65536, buffered=False, depth=depth
        )


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


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[int]]]:
    """Direct writes held until the event is set; the offsets of those that ended. Set
    at the end of the test whatever happens: a failed test must not leave the shared
    writer threads held, stalling the tests after it."""
    release = threading.Event()
    ended: list[int] = []
    real = os.pwrite

    def held(fd: int, data: memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            release.wait(10)
        n = real(fd, data, offset)
        ended.append(offset)
        return n

    monkeypatch.setattr(os, "pwrite", held)
    yield release, ended
    release.set()


@needs_direct_io
def test_with_a_depth_the_writer_goes_on_while_the_disk_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_writes: tuple[threading.Event, list[int]]
) -> None:
    """Full buffers are written by writer threads: the caller is not held up by the device
    until all ``depth`` buffers are waiting for it."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    release, ended = held_writes
    data = os.urandom(SYNC + 5 * DIRECT_BLOCK_BYTES + 99)
    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC, write_depth=4) as w,
    ):
        w.write(data[: SYNC + 1])  # O_DIRECT from here on
        w.write(data[SYNC + 1 : SYNC + 1 + 3 * DIRECT_BLOCK_BYTES])  # 3 buffers wait
        assert ended == []  # none written yet, and the writer was not held up
        threading.Timer(0.2, release.set).start()
        w.write(data[SYNC + 1 + 3 * DIRECT_BLOCK_BYTES :])  # needs a 5th buffer: waits
        assert ended  # for the oldest write
        w.finish()
    assert (tmp_path / "out").read_bytes() == data


@needs_direct_io
@pytest.mark.parametrize("outcome", ["abandoned", "finished"])
def test_no_background_write_outlives_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outcome: str,
    held_writes: tuple[threading.Event, list[int]],
) -> None:
    """Whether the file is finished or thrown away, every write still running ends before
    the writer lets go of the file: none may find its buffer freed or its file closed."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    release, ended = held_writes
    data = os.urandom(SYNC + 3 * DIRECT_BLOCK_BYTES)
    threading.Timer(0.2, release.set).start()
    with contextlib.suppress(RuntimeError):
        with (
            (tmp_path / "out").open("wb", buffering=0) as raw,
            SyncingWriter(raw, sync_every=SYNC, write_depth=4) as w,
        ):
            w.write(data[: SYNC + 1])  # O_DIRECT from here on
            w.write(data[SYNC + 1 :])  # two buffers handed to writer threads, both held
            assert not any(at > SYNC for at in ended)
            if outcome == "abandoned":
                raise RuntimeError("the fetch failed")
            w.finish()
        assert (tmp_path / "out").read_bytes() == data
    # Both direct writes ended before the file was let go.
    assert len([at for at in ended if at > SYNC]) >= 2


@needs_direct_io
@pytest.mark.parametrize("raised_by", ["write", "finish"])
def test_a_background_write_error_is_raised_and_the_file_refuses_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised_by: str
) -> None:
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    fails = threading.Event()
    fail_direct_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), after=fails)
    with (
        (tmp_path / "out").open("wb", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC, write_depth=2) as w,
    ):
        w.write(os.urandom(SYNC + 1))  # O_DIRECT from here on
        w.write(os.urandom(2 * DIRECT_BLOCK_BYTES))  # one buffer to a writer thread, held
        fails.set()  # its write fails now, after this writer has gone on
        more = os.urandom(DIRECT_BLOCK_BYTES)
        then = (lambda: w.write(more)) if raised_by == "write" else w.finish  # finds it
        with pytest.raises(OSError, match="No space"):
            then()
        with pytest.raises(OSError, match="earlier write to this file failed"):
            w.finish()


@needs_direct_io
def test_a_pending_write_never_reaches_a_file_that_took_the_descriptor_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_writes: tuple[threading.Event, list[int]]
) -> None:
    """The stage writes through its own duplicate of the descriptor: even if the caller's
    were closed while writes wait, and its number given to another file, they land in
    their own file."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    release, ended = held_writes
    data = os.urandom(3 * DIRECT_BLOCK_BYTES)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    stage = _direct.DirectStage.start(fd, depth=4)
    assert stage is not None
    stage.write(memoryview(data))  # three buffers to writer threads, all held
    os.close(fd)  # too early
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert other == fd  # the number was reused (the lowest free one), as in the danger
        release.set()
        stage.close()
    finally:
        os.close(other)
    assert len(ended) == 3
    assert (tmp_path / "other").read_bytes() == b""
    assert (tmp_path / "out").read_bytes() == data


def test_a_file_opened_for_appending_is_written_the_ordinary_way(tmp_path: Path) -> None:
    """Appending, pwrite ignores its offset on Linux: buffers written by several threads
    could land out of order, so such a file gets no stage."""
    path = tmp_path / "out"
    path.write_bytes(b"head")
    with path.open("ab", buffering=0) as raw:
        assert _direct.DirectStage.start(raw.fileno(), depth=4) is None
    data = os.urandom(SYNC + 3 * DIRECT_BLOCK_BYTES + 5)
    with (
        path.open("ab", buffering=0) as raw,
        SyncingWriter(raw, sync_every=SYNC, write_depth=4) as w,
    ):
        for i in range(0, len(data), 100_000):
            w.write(data[i : i + 100_000])
        w.finish()
    assert path.read_bytes() == b"head" + data


@needs_direct_io
def test_an_interrupted_wait_still_waits_for_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held_writes: tuple[threading.Event, list[int]]
) -> None:
    """Ctrl-C while the stage waits for its writes: the wait goes on until every write has
    ended (their buffers and descriptor are freed next), then the interruption is raised."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    release, ended = held_writes
    real_wait = concurrent.futures.wait
    interrupts = [KeyboardInterrupt()]

    def interrupted(futures: object) -> object:
        if interrupts:
            raise interrupts.pop()
        return real_wait(futures)  # type: ignore[arg-type]

    with (tmp_path / "out").open("wb", buffering=0) as raw:
        stage = _direct.DirectStage.start(raw.fileno(), depth=4)
        assert stage is not None
        stage.write(memoryview(os.urandom(2 * DIRECT_BLOCK_BYTES)))  # two writes, held
        monkeypatch.setattr(concurrent.futures, "wait", interrupted)
        threading.Timer(0.2, release.set).start()
        with pytest.raises(KeyboardInterrupt):
            stage.close(flush=False)
        assert len(ended) == 2  # both had ended when it was raised


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


@needs_direct_io
def test_a_buffer_that_cannot_be_had_leaves_the_full_one_to_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory for the next buffer, nothing was handed off: ``close`` writes the
    full block once, not once more after a writer thread has."""
    real, made = _direct.AlignedBlock, [0]

    class Scarce(real):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            made[0] += 1
            if made[0] == 2:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            super().__init__()

    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    monkeypatch.setattr(_direct, "AlignedBlock", Scarce)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        stage = _direct.DirectStage.start(fd, depth=4)
        assert stage is not None
        data = os.urandom(DIRECT_BLOCK_BYTES)
        with pytest.raises(OSError, match="allocate"):
            stage.write(memoryview(data))  # fills the first buffer; no second one
        stage.close()
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == data


def slow_syncs_and_an_interruption(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Background syncs wait to be released; the function returned makes the next wait
    for one raise KeyboardInterrupt (a Ctrl-C), and releases the sync 0.2 s later."""
    release = threading.Event()
    real_sync = _syncing._sync_then_forget

    def slow_sync(fd: int, start: int, end: int) -> None:
        release.wait(10)
        real_sync(fd, start, end)

    monkeypatch.setattr(_syncing, "_sync_then_forget", slow_sync)
    real_wait, calls = concurrent.futures.wait, [0]

    def interrupted_once(fs: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            threading.Timer(0.2, release.set).start()
            raise KeyboardInterrupt
        return real_wait(fs, *args, **kwargs)

    return lambda: monkeypatch.setattr(concurrent.futures, "wait", interrupted_once)


@needs_direct_io
@pytest.mark.parametrize("ending", ["abandon", "exit"])
def test_an_interrupted_ending_still_waits_for_the_sync_and_closes_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """A Ctrl-C while the writer waits for its background sync, as a thrown-away file is
    abandoned or as the writer's ``with`` ends normally: the wait goes on (the sync uses
    the file's descriptor, closed next), then the interruption is raised, and the stage
    is closed either way."""
    if not direct_io_here(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    interrupt_next_wait = slow_syncs_and_an_interruption(monkeypatch)
    with (tmp_path / "out").open("wb", buffering=0) as raw:
        w = SyncingWriter(raw, sync_every=SYNC, write_depth=4)
        w.write(os.urandom(SYNC + 3 * DIRECT_BLOCK_BYTES))  # a sync runs, a stage is open
        syncing = w._syncing
        assert syncing is not None
        end = w.abandon if ending == "abandon" else lambda: w.__exit__(None, None, None)
        interrupt_next_wait()
        with pytest.raises(KeyboardInterrupt):
            end()
        assert syncing.done()  # waited for, through the interruption
        assert w._stage is None  # and the stage closed
