"""Files synced to disk as they are written: the data intact, sync errors never dropped."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from splitstore import Client, LocalFileError
from splitstore._direct import DirectStage
from splitstore._syncing import SyncingWriter

PIECE = 64 * 1024


def test_data_is_intact_and_synced_as_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []

    def counting(fd: int) -> None:
        # Counted, not done: a real sync on a busy disk can outlast the whole write, and
        # then only one is due (a file has one sync at a time). The timing is not the point.
        synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fdatasync", counting)
    data = os.urandom(40 * PIECE)
    with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=4 * PIECE) as w:
        for i in range(0, len(data), PIECE):
            w.write(data[i : i + PIECE])
            time.sleep(0.001)  # room for a background sync to end before the next is due
        w.finish()
    assert (tmp_path / "out").read_bytes() == data
    assert len(synced) >= 2  # in the background, before the end
    assert min(synced) < len(data)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_each_range_is_dropped_once_and_only_after_its_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int, int]] = []
    real_fsync = os.fsync

    def counting_sync(fd: int) -> None:
        events.append(("sync", os.fstat(fd).st_size, 0))

    def counting_fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("sync", os.fstat(fd).st_size, 0))

    def counting_advice(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        events.append(("drop", offset, length))

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    monkeypatch.setattr(os, "posix_fadvise", counting_advice)
    data = os.urandom(40 * PIECE)
    with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=4 * PIECE) as w:
        for i in range(0, len(data), PIECE):
            w.write(data[i : i + PIECE])
            time.sleep(0.001)
        w.finish()
    assert (tmp_path / "out").read_bytes() == data
    drops = [i for i, e in enumerate(events) if e[0] == "drop"]
    assert len(drops) >= 2
    end = 0
    for i in drops[:-1]:  # each right after its sync, taking up where the last one ended
        kind, synced, _ = events[i - 1]
        assert kind == "sync"
        assert events[i][1] == end
        end += events[i][2]
        assert events[i][2] > 0
        assert end <= synced
    assert events[-2] == ("sync", len(data), 0)  # the final fsync, then
    assert events[-1] == ("drop", end, 0)  # the rest of the file


@pytest.mark.parametrize("case", ["keep_cached", "small"])
def test_a_file_read_again_or_small_stays_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    advised: list[int] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(1), raising=False)
    pieces = 10 if case == "keep_cached" else 3
    with (
        (tmp_path / "out").open("wb") as raw,
        SyncingWriter(raw, sync_every=4 * PIECE, keep_cached=case == "keep_cached") as w,
    ):
        for _ in range(pieces):
            w.write(os.urandom(PIECE))
        w.finish()
    assert advised == []


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_a_file_kept_cached_then_let_go_is_written_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drop_behind (a scanned fetch that turned out not to be an archive): from then on
    the file is dropped behind its syncs and written past the cache, where it can be."""
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: advised.append((o, n)))
    staged: list[int] = []
    real_start = DirectStage.start

    def counting_start(fd: int, depth: int = 1) -> DirectStage | None:
        staged.append(fd)
        return real_start(fd, depth)

    monkeypatch.setattr(DirectStage, "start", counting_start)
    data = os.urandom(40 * PIECE)
    with (
        (tmp_path / "out").open("wb") as raw,
        SyncingWriter(raw, sync_every=4 * PIECE, keep_cached=True) as w,
    ):
        w.write(data[:PIECE])
        w.drop_behind()
        for i in range(PIECE, len(data), PIECE):
            w.write(data[i : i + PIECE])
            time.sleep(0.001)
        w.finish()
    assert (tmp_path / "out").read_bytes() == data
    assert advised[0][0] == 0  # from the start of the file: nothing of it kept cached
    assert advised[-1][1] == 0  # and the rest after the final fsync
    assert staged  # O_DIRECT was tried (the file system may still refuse it)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_let_go_after_a_sync_while_kept_drops_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advised: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: advised.append((o, n)))
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    data = os.urandom(12 * PIECE)
    with (
        (tmp_path / "out").open("wb") as raw,
        SyncingWriter(raw, sync_every=4 * PIECE, keep_cached=True) as w,
    ):
        w.write(data[: 4 * PIECE])  # a sync is due while the file is still kept
        w.drop_behind()
        for i in range(4 * PIECE, len(data), PIECE):
            w.write(data[i : i + PIECE])
            time.sleep(0.001)
        w.finish()
    assert (tmp_path / "out").read_bytes() == data
    assert advised
    assert advised[0][0] == 0  # the part synced while kept is dropped too


def test_a_file_system_that_refuses_the_advice_still_gets_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refusing(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refusing, raising=False)
    data = os.urandom(10 * PIECE)
    with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=PIECE) as w:
        for i in range(0, len(data), PIECE):
            w.write(data[i : i + PIECE])
        w.finish()
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize("raised_at", ["write", "finish"])
def test_a_failed_background_sync_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised_at: str
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=PIECE) as w:
        w.write(os.urandom(PIECE))  # starts the sync that fails
        time.sleep(0.05)
        then = (lambda: w.write(os.urandom(PIECE))) if raised_at == "write" else w.finish
        with pytest.raises(OSError, match="Input/output"):
            then()


def test_leaving_waits_for_a_sync_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = threading.Event()

    def slow(fd: int) -> None:
        time.sleep(0.3)
        os.fstat(fd)  # still open: the file was not closed under the sync
        ended.set()

    monkeypatch.setattr(os, "fdatasync", slow)

    def fetch_that_fails() -> None:
        with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=PIECE) as w:
            w.write(os.urandom(PIECE))
            raise RuntimeError("the fetch failed")

    with pytest.raises(RuntimeError):
        fetch_that_fails()
    assert ended.is_set()


def test_starting_again_truncates(tmp_path: Path) -> None:
    with (tmp_path / "out").open("wb") as raw, SyncingWriter(raw, sync_every=PIECE) as w:
        w.write(os.urandom(3 * PIECE))
        w.seek(0)
        w.truncate()
        w.write(b"older version")
        w.finish()
    assert (tmp_path / "out").read_bytes() == b"older version"


def test_a_fetch_whose_fsync_fails_says_so_and_leaves_nothing(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5000)
    (tmp_path / "in").write_bytes(data)
    client.store(tmp_path / "in", "doc")
    out = tmp_path / "fetched"
    out.mkdir()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(LocalFileError, match=r"cannot write .*Input/output error"):
        client.fetch("doc", out / "doc")
    assert list(out.iterdir()) == []
