"""Large superseded files removed after the request that superseded them has answered.

Freeing a large file's blocks takes the file system a while: unlinking a 512 MiB stripe
took 0.12 s on the machine measured (0.24 s per GiB, ext4), and a store that replaces a
version two back waited for that on both servers before its commit was answered. The
removal decides nothing, since the record that drops the version is durable before it
starts, so the server moves such a file out of the object's folder (a rename into
``tmp/``, which is emptied at every start) and a thread of its own unlinks it later.
A crash in between leaves it in ``tmp/``, where the next start removes it.

The file is unlinked whole, never truncated first (as RocksDB frees large files, in
steps, to spread the file system's work): a truncation shrinks the file for every
descriptor open on it, so a fetch still streaming the dropped version would be cut
short, where after an unlink it reads to the end and the blocks go when it closes.

Bytes queued here are counted as free by the disk-space check of the file system they
are on: they are on their way out, and a store that replaces a large file on a nearly
full disk should not be refused for the space its own previous version is freeing. They
stop counting as the unlink starts, since the file system counts them from then on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from pathlib import Path

from ._threads import shared_pool

__all__ = ["RECLAIM_LATER_BYTES", "pending_bytes", "reclaim_later", "wait_reclaimed"]

# Files at least this large are removed in the background; smaller ones go at once, where
# a thread hop would cost more than the unlink.
RECLAIM_LATER_BYTES = 16 * 1024 * 1024

log = logging.getLogger("splitstore.storage")

_pool = shared_pool(1, "splitstore-reclaim")
_lock = threading.Lock()
_pending: dict[Path, tuple[int, int]] = {}  # queued, not yet being unlinked: (device, bytes)
_queued: set[concurrent.futures.Future[None]] = set()  # removals not yet ended


def reclaim_later(path: Path, size: int) -> None:
    """Unlink ``path`` (``size`` bytes, moved out of every folder a reader looks in) soon.
    Raises RuntimeError if no thread can take it (the interpreter is shutting down)."""
    device = os.stat(path.parent).st_dev  # as the space check stats a folder
    with _lock:
        _pending[path] = (device, size)
        try:
            future = _pool().submit(_unlink, path)
        except BaseException:
            del _pending[path]
            raise
        _queued.add(future)
    future.add_done_callback(_ended)


def pending_bytes(device: int) -> int:
    """Bytes of files on ``device`` (an ``st_dev``) queued for removal, not yet removed."""
    with _lock:
        return sum(size for dev, size in _pending.values() if dev == device)


def wait_reclaimed() -> None:
    """Block until every removal queued so far has ended."""
    with _lock:
        queued = list(_queued)
    concurrent.futures.wait(queued)


def _unlink(path: Path) -> None:
    with _lock:  # from here on the file system counts the bytes it frees as free
        _pending.pop(path, None)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError as exc:  # left in tmp/, which the next start empties
        log.warning("could not remove %s: %s", path.name, exc.strerror)


def _ended(future: concurrent.futures.Future[None]) -> None:
    with _lock:
        _queued.discard(future)
