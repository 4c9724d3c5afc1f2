"""A large file on its way to disk: synced as it is written, not all at the end.

Both a fetched file and a stripe a server receives are fsynced before they are renamed
into place. Left to itself, the kernel keeps a large file's pages dirty until then (they
stay under its background writeback threshold), and the final fsync writes all of it
while everything waits: about an eighth of a 1 GiB fetch on the machine measured.
Here, every SYNC_EVERY_BYTES, the written part is handed to fdatasync in a thread of
its own, so the disk works while the transfer goes on and the final fsync has only the
tail left. An error from a background sync is raised at the next write or at the end:
after a failed fsync the kernel may forget the error, so it must not be dropped.

A large file does not stay in the page cache: a 4 GiB store or fetch must not push
everything else out of the machine's cache. Once the first background sync is due (the
file is large), the rest is written with O_DIRECT from an aligned buffer (``_direct``),
which skips the kernel's copy into fresh cache pages; where direct I/O is not to be had,
what each sync made durable is dropped from the cache instead (POSIX_FADV_DONTNEED), and
so is the first part written the ordinary way. On the 2-core virtual machine measured,
where fresh memory is slow to touch, dropping alone kept the servers' system time of a
repeated 512 MiB store at ~0.5 s per GiB instead of 1.3-1.6.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO

from ._direct import ALIGN, DirectStage
from ._threads import shared_pool, wait_through

__all__ = ["SYNC_EVERY_BYTES", "SyncingWriter"]

# Bytes written between two background syncs: large enough that a sync costs little,
# small enough that the final fsync of a large file is short.
SYNC_EVERY_BYTES = 16 * 1024 * 1024

# A few threads: a server syncs several uploads at once, and one slow disk must not hold
# back the others' syncs. Each file still has at most one sync at a time.
_syncer = shared_pool(4, "splitstore-sync")


def _sync_then_forget(fd: int, start: int, end: int) -> None:
    """Sync the file, then drop bytes ``start`` to ``end`` (durable now) from the cache."""
    os.fdatasync(fd)
    if end > start:
        _forget(fd, start, end - start)


def _forget(fd: int, offset: int, length: int) -> None:
    """Drop the clean cached pages of ``length`` bytes of ``fd`` from ``offset`` (0: to the end).

    Only advice: dirty pages are never dropped (the kernel starts writing them instead),
    and a system or file system without it simply keeps its cache.
    """
    if hasattr(os, "posix_fadvise"):  # not on macOS
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class SyncingWriter:
    """Writes to ``raw`` (a binary file) and syncs it to disk in the background.

    Use as a context manager inside the one that closes ``raw``: leaving it waits for a
    sync still running, so the file is never closed under it. With ``keep_cached`` the
    pages stay cached and no O_DIRECT is used (the caller reads the file again at once,
    as a scan of archives does) until ``drop_behind``; a file that never reached
    ``sync_every`` is small and stays cached too.
    """

    def __init__(
        self,
        raw: BinaryIO,
        sync_every: int = SYNC_EVERY_BYTES,
        *,
        keep_cached: bool = False,
        write_depth: int = 1,
    ) -> None:
        self._raw = raw
        self._depth = write_depth
        self._every = sync_every
        self._unsynced = 0
        self._syncing: concurrent.futures.Future[None] | None = None
        self._keep = keep_cached
        # Bytes from the start already handed to a background drop; above 0 once a
        # background sync was due, so the file is large enough to drop at the end.
        self._dropped = 0
        self._pos = raw.tell()  # where the next byte goes
        self._stage: DirectStage | None = None  # writing with O_DIRECT
        self._go_direct = False  # to start at the next aligned offset
        # The file system refused O_DIRECT (none is tried either while the file is kept).
        self._refused = False
        self._failed = False  # an error was raised: no further writing

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._failing():
            return self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = len(view)
        if self._go_direct:
            view = self._begin_direct(view)
        if self._stage is not None:
            self._stage.write(view)
        else:
            self._put(view)
        self._pos += n
        self._unsynced += n
        if self._unsynced >= self._every and self._sync_done():
            self._raw.flush()
            fd, end = self._raw.fileno(), self._pos
            if self._stage is not None:
                end -= self._stage.staged  # not in the file yet
            start = end if self._keep else self._dropped
            self._syncing = _syncer().submit(_sync_then_forget, fd, start, end)
            if not self._keep:  # kept, nothing is dropped: a drop_behind starts from 0
                self._dropped = max(self._dropped, end)
            self._unsynced = 0
            if self._stage is not None and not self._stage.direct:
                self._end_direct()  # refused: no more copying through the stage
                self._refused = True
            self._go_direct = self._stage is None and not (self._keep or self._refused)
        return n

    def drop_behind(self) -> None:
        """The file will not be read again after all (``keep_cached`` was a guess): from
        the next background sync on it is written as without ``keep_cached``, and that
        sync drops everything durable so far. Called before the first sync, it is as if
        ``keep_cached`` had never been given."""
        self._keep = False

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._failing():
            self._end_direct()
            self._pos = self._raw.seek(offset, whence)
            return self._pos

    def truncate(self, size: int | None = None) -> int:
        with self._failing():
            self._wait()  # not while a sync of the old content runs
            self._end_direct()
            size = self._raw.truncate(size)
            self._dropped = min(self._dropped, size)
            return size

    def finish(self) -> None:
        """Make everything written durable (raises what a background sync raised)."""
        with self._failing():
            self._wait()
            self._end_direct()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            if self._dropped and not self._keep:
                _forget(self._raw.fileno(), self._dropped, 0)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """After any error the file's content is unknown (part of a block may be written,
        or staged bytes lost): every later call raises, so that a retry cannot produce a
        file that looks complete and is not. The staged bytes are dropped, O_DIRECT is off."""
        if self._failed:
            raise OSError(errno.EIO, "an earlier write to this file failed")
        try:
            yield
        except BaseException:
            self._failed = True
            self._end_direct(flush=False)
            raise

    def __enter__(self) -> SyncingWriter:
        return self

    def abandon(self) -> None:
        """Wait for a sync still running, whatever its outcome: the file is thrown away."""
        try:
            if self._syncing is not None:
                wait_through(self._syncing)
                self._syncing = None
        finally:
            self._end_direct(flush=False)  # waits for the stage's writes, interrupted or not

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and not self._failed:
            try:
                with self._failing():
                    self._wait()
                    self._end_direct()
            except BaseException:
                self.abandon()  # interrupted in the wait, the sync is still running: outwait it
                raise
        else:
            self.abandon()

    def _put(self, view: memoryview) -> None:
        """Write all of ``view`` through ``raw`` (an unbuffered file may write a part)."""
        while view:
            written = self._raw.write(view)
            view = view[written:]

    def _begin_direct(self, view: memoryview) -> memoryview:
        """Write up to the next aligned offset the ordinary way, and start O_DIRECT there;
        return what of ``view`` is still to be written."""
        head = min(len(view), -self._pos % ALIGN)
        self._put(view[:head])
        if (self._pos + head) % ALIGN == 0:
            self._go_direct = False
            self._raw.flush()  # nothing buffered may land after the direct writes
            self._stage = DirectStage.start(self._raw.fileno(), self._depth)
            self._refused = self._stage is None
        return view[head:]

    def _end_direct(self, *, flush: bool = True) -> None:
        """Write what is staged and go back to ordinary writes (till the next sync)."""
        stage, self._stage = self._stage, None
        self._go_direct = False
        if stage is not None:
            stage.close(flush=flush)

    def _sync_done(self) -> bool:
        """True if no sync is running; raises the error of one that failed."""
        if self._syncing is None:
            return True
        if not self._syncing.done():
            return False
        self._wait()
        return True

    def _wait(self) -> None:
        syncing = self._syncing
        if syncing is not None:
            # Interrupted while waiting, it is still ours: ``abandon`` then waits for it.
            concurrent.futures.wait([syncing])
            # Forgotten before it is raised: one failure is reported once, not on exit too.
            self._syncing = None
            syncing.result()
