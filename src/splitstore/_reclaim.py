"""Large superseded files removed after the request that superseded them has answered.

Freeing a large file's blocks takes the file system a while: unlinking a 512 MiB stripe
took 0.12 s on the machine measured (0.24 s per GiB, ext4), and a store that replaces a
version two back waited for that on both servers before its commit was answered. The
removal decides nothing, since the record that drops the version is durable before it
starts, so the server moves such a file out of the object's folder (a rename into
``tmp/``, which is emptied at every start) and a thread of its own unlinks it later.
A crash in between leaves it in ``tmp/``, where the next start removes it.

The thread frees the file from its end in steps (truncating it), then unlinks it, as
RocksDB deletes large files: the file system frees a file's blocks within one journal
handle, and an fsync meanwhile (the next commit's, say) waits for it. Freed whole, a
256 MiB file held such fsyncs up to 26-38 ms on the machine measured; in 16 MiB steps,
up to 10 ms.

Bytes waiting here are counted as free by the disk-space check: they are on their way
out, and a store that replaces a large file on a nearly full disk should not be refused
for the space its own previous version is freeing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from pathlib import Path

from ._threads import shared_pool

__all__ = [
    "RECLAIM_LATER_BYTES",
    "RECLAIM_STEP_BYTES",
    "pending_bytes",
    "reclaim_later",
    "wait_reclaimed",
]

# Files at least this large are removed in the background; smaller ones go at once, where
# a thread hop would cost more than the unlink.
RECLAIM_LATER_BYTES = 16 * 1024 * 1024
# Bytes freed per step (a truncation) of a file being removed.
RECLAIM_STEP_BYTES = 16 * 1024 * 1024

log = logging.getLogger("splitstore.storage")

_pool = shared_pool(1, "splitstore-reclaim")
_lock = threading.Lock()
_pending: dict[concurrent.futures.Future[None], int] = {}


def reclaim_later(path: Path, size: int) -> None:
    """Unlink ``path`` (``size`` bytes, moved out of every folder a reader looks in) soon."""
    with _lock:
        future = _pool().submit(_unlink, path)
        _pending[future] = size
    future.add_done_callback(_forget)


def pending_bytes() -> int:
    """Bytes of files queued for removal and not yet removed, in this process."""
    with _lock:
        return sum(_pending.values())


def wait_reclaimed() -> None:
    """Block until every removal queued so far has ended."""
    with _lock:
        queued = list(_pending)
    concurrent.futures.wait(queued)


def _unlink(path: Path) -> None:
    try:
        with contextlib.suppress(FileNotFoundError):
            _shrink(path)
            os.unlink(path)
    except OSError as exc:  # left in tmp/, which the next start empties
        log.warning("could not remove %s: %s", path.name, exc.strerror)


def _shrink(path: Path) -> None:
    """Free ``path``'s blocks from its end, RECLAIM_STEP_BYTES at a time."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        while size > RECLAIM_STEP_BYTES:
            size -= RECLAIM_STEP_BYTES
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _forget(future: concurrent.futures.Future[None]) -> None:
    with _lock:
        _pending.pop(future, None)
