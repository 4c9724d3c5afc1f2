"""Large files moved straight between the disk and our own buffers (O_DIRECT).

A stripe read back from disk, or a fetched file written out, goes through the page cache:
the kernel copies every byte between our buffer and pages it has just allocated for the
file. On the 2-core virtual machine measured, fresh pages are slow to touch (the host backs
them on first use), and reading a 512 MiB stripe that was not cached took 2.2 s of CPU per
GiB where the same read with O_DIRECT took 0.08; writing took 0.3-0.8 s per GiB against
0.04. Object stores and databases do the same for bulk data (MinIO reads and writes large
objects with O_DIRECT); the cost is that nothing of such a file is left in the cache.

Direct I/O wants the buffer's address, the file offset and the length to be multiples of
the device's logical block size; ``ALIGN`` covers every usual device, and the buffers are
whole pages from ``mmap``. Where the system or the file system does not offer it (macOS,
tmpfs before Linux 6.6, some FUSE file systems) or refuses a transfer, the same bytes go
the ordinary way: this is a speed-up only, never a condition. The bytes on disk are the
same either way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import mmap
import os
import threading
from typing import BinaryIO

from ._threads import shared_pool

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ALIGN",
    "DIRECT_BLOCK_BYTES",
    "AlignedBlock",
    "DirectReader",
    "DirectStage",
    "set_direct",
]

ALIGN = 4096
# Bytes per direct transfer: each one waits for the device, so not too few (1 MiB writes
# ran at ~1.9 GB/s here, 256 KiB at ~1.0); a file written or read holds one such buffer,
# or up to its ``depth`` of them when written in the background.
DIRECT_BLOCK_BYTES = 1024 * 1024

# Threads doing the background direct writes of all files (each waits for the device):
# at most this many of those writes run at once, whatever the files' depths.
WRITER_THREADS = 4

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_writer = shared_pool(WRITER_THREADS, "splitstore-direct")


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False if this system or file system has none."""
    if not _O_DIRECT or fcntl is None:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError:
        return False
    return True


class AlignedBlock:
    """One page-aligned buffer of ``size`` bytes (a multiple of ALIGN), freed by close."""

    def __init__(self, size: int = DIRECT_BLOCK_BYTES) -> None:
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)

    def close(self) -> None:
        self.view.release()
        # A slice still held (by an error's traceback) keeps the map: it goes with that.
        with contextlib.suppress(BufferError):
            self._map.close()


class DirectStage:
    """The rest of a file, written from aligned buffers through O_DIRECT.

    Start it at an aligned offset of ``fd`` (``start`` returns None where direct I/O is not
    to be had, or the file is opened for appending, and the caller writes as before).
    Bytes are copied into a buffer, and each full buffer is written at its offset
    (``pwrite``). A direct write waits for the device, so with a ``depth`` above one the
    stage holds up to ``depth`` buffers: full ones are written by writer threads (up to
    ``depth - 1`` of them waiting at once) while the caller fills the next. ``close``
    waits for those, writes what is left (the last part of a block after switching
    O_DIRECT off), and leaves O_DIRECT off and the file position at the end. A transfer
    the file system refuses (EINVAL) or cuts short is finished without O_DIRECT, and so is
    the rest of the file (``direct`` is then False). A background write's error is raised
    by a later ``write`` that hands off a buffer once that write has ended, or by
    ``close``; after an error the stage is not to be used again, only closed: what the
    file holds is unknown.

    The stage writes through a duplicate of ``fd`` of its own, closed only once every
    write has ended: if the caller's descriptor were closed early and its number reused
    for another file, no pending write could reach that file.
    """

    def __init__(self, fd: int, depth: int = 1) -> None:
        self._offset = os.lseek(fd, 0, os.SEEK_CUR)  # where the current buffer goes
        self._spare: list[AlignedBlock] = []
        self._blocks = 1  # allocated so far, at most ``depth``
        self._depth = max(1, depth)
        self._block = AlignedBlock()
        self._fill = 0
        self._direct = True
        # Held while O_DIRECT is turned off: a writer thread that finds ``_direct`` false
        # may write unaligned bytes, so the flag goes off before ``_direct`` says so.
        self._switching = threading.Lock()
        # Buffers being written, oldest first: (its write, the buffer, bytes in it).
        self._pending: collections.deque[
            tuple[concurrent.futures.Future[None], AlignedBlock, int]
        ] = collections.deque()
        # Last, so that nothing can fail after it: shares the file offset and the O_DIRECT
        # flag with ``fd`` (one open file).
        self._fd = os.dup(fd)

    @classmethod
    def start(cls, fd: int, depth: int = 1) -> DirectStage | None:
        # Appending, pwrite would ignore the offsets (Linux): buffers could land out of order.
        if fcntl is not None and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return None
        if not set_direct(fd, True):
            return None
        try:
            return cls(fd, depth)
        except OSError:  # out of descriptors or memory: a speed-up only
            set_direct(fd, False)
            return None

    @property
    def direct(self) -> bool:
        """Still writing with O_DIRECT (not since a refusal)."""
        return self._direct

    @property
    def staged(self) -> int:
        """Bytes taken but not yet known to be in the file."""
        return self._fill + sum(n for _, _, n in self._pending)

    def write(self, data: memoryview) -> None:
        while data:
            view = self._block.view
            take = min(len(data), len(view) - self._fill)
            view[self._fill : self._fill + take] = data[:take]
            self._fill += take
            data = data[take:]
            if self._fill == len(view):
                self._hand_off()

    def close(self, *, flush: bool = True) -> None:
        """Write what is staged (unless ``flush`` is false: the file is being thrown away)."""
        try:
            # Every write still running ends first, whatever happens: none may outlive
            # the stage (its buffer freed, or the file closed under it).
            error = self._wait_all()
            if flush:
                if error is not None:
                    raise error
                self._put(self._block.view[: self._fill], self._offset)
                self._offset += self._fill
                self._fill = 0
                os.lseek(self._fd, self._offset, os.SEEK_SET)
        finally:
            fd, self._fd = self._fd, -1
            try:
                if fd >= 0:  # not closed before (a second close must not close a reused number)
                    if self._direct:
                        set_direct(fd, False)
                    os.close(fd)
            finally:
                for block in (self._block, *self._spare):
                    block.close()
                self._spare.clear()

    def _hand_off(self) -> None:
        """Queue the full buffer for writing and go on with a free one (with a depth of
        one, write it here and now)."""
        if self._depth == 1:
            self._put(self._block.view, self._offset)
            self._offset += self._fill
            self._fill = 0
            return
        if self._blocks >= self._depth and not self._spare:
            self._reap()  # every buffer is in use: wait for the oldest
        # The next buffer first: if there is none to be had, nothing was handed off and
        # the full one is still ours to write (a hand-off then a failure would write the
        # block twice, once queued and once by ``close``).
        if self._spare:
            following = self._spare.pop()
        else:
            following = AlignedBlock()
            self._blocks += 1
        try:
            writing = _writer().submit(self._put, self._block.view, self._offset)
        except BaseException:
            self._spare.append(following)
            raise
        self._pending.append((writing, self._block, self._fill))
        self._offset += self._fill
        self._block = following
        self._fill = 0
        while self._pending and self._pending[0][0].done():
            self._reap()

    def _reap(self) -> None:
        """Wait for the oldest write, take its buffer back; raise its error. Interrupted
        while waiting (KeyboardInterrupt), the write stays pending: ``close`` waits for it."""
        future, block, _ = self._pending[0]
        concurrent.futures.wait([future])
        self._pending.popleft()
        self._spare.append(block)
        future.result()

    def _wait_all(self) -> Exception | None:
        """Wait for every write, through an interruption too (raised once all have ended:
        none may outlive the buffer and descriptor freed next); the first write error."""
        error: Exception | None = None
        interrupted: BaseException | None = None
        while self._pending:
            try:
                self._reap()
            except Exception as exc:
                error = error or exc
            except BaseException as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted
        return error

    def _put(self, view: memoryview, offset: int) -> None:
        """Write ``view`` at ``offset``: directly while the file system takes it."""
        done = 0
        whole = len(view) - len(view) % ALIGN
        while self._direct and done < whole:
            try:
                n = os.pwrite(self._fd, view[done:whole], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                n = 0
            done += n
            if n == 0 or done % ALIGN:
                self._stop_direct()
        if done < len(view):
            # The end of the file, or a refusal: the ordinary way.
            self._stop_direct()
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)

    def _stop_direct(self) -> None:
        """O_DIRECT off, for this and every other writer thread. Returns only once the
        flag is off, whichever thread turns it off: an ordinary write made while it is
        still on would be refused (EINVAL) for its unaligned offset or length."""
        with self._switching:
            if self._direct:
                set_direct(self._fd, False)
                self._direct = False


class DirectReader:
    """A file read from its start with O_DIRECT into one aligned buffer.

    ``start`` returns None where direct I/O is not to be had (the caller reads as before).
    Each ``read(n)`` asks for whole blocks (the file ends where it ends, so the last read
    comes back short) and returns at most ``n`` bytes, b"" at the end. A read the file
    system refuses (EINVAL) is done again, and so are the rest, without O_DIRECT. The
    reader holds a reference to the file, so a read in a worker thread never finds its
    descriptor closed by the garbage collector; closing the file stays the caller's,
    after the last read has returned.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._fd = file.fileno()
        self._block = AlignedBlock()
        self._offset = 0
        self._direct = True

    @classmethod
    def start(cls, file: BinaryIO) -> DirectReader | None:
        if not hasattr(os, "preadv") or not set_direct(file.fileno(), True):
            return None
        return cls(file)

    def read(self, n: int) -> bytes:
        view = self._block.view
        n = min(n, len(view))
        want = min(len(view), n + -n % ALIGN)
        try:
            got = os.preadv(self._fd, [view[:want]], self._offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._direct = False
            set_direct(self._fd, False)
            got = os.preadv(self._fd, [view[:want]], self._offset)
        data = bytes(view[: min(got, n)])
        self._offset += len(data)
        return data

    def rewind(self) -> None:
        """Read from the start again."""
        self._offset = 0

    def close(self) -> None:
        self._block.close()
