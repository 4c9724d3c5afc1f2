"""Stored data pushed out of the page cache, so that every fetch and restore reads it from disk.

A restore from backup reads what was stored long before, not what the cache still holds
from a moment ago. splitstore's servers keep no large stripe in the page cache (they
write and read them with O_DIRECT); restic's repository and rclone's crypt remote would
be read from memory if nothing were done. So before each fetch, restore or copy back, what
each tool stored is written out (``os.sync``) and dropped from the cache, file by file
(``POSIX_FADV_DONTNEED``: advice for one's own files, no privileges needed, unlike
``/proc/sys/vm/drop_caches``). Where the advice does not exist the data stays cached, and
the suite's notes say so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["CAN_EVICT", "evict"]

CAN_EVICT = hasattr(os, "posix_fadvise")


def evict(*folders: Path) -> None:
    """Write out, then drop from the page cache, every file under ``folders``."""
    if not CAN_EVICT:
        return
    os.sync()  # only clean pages can be dropped
    for folder in folders:
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):  # a file gone meanwhile, a socket, ...
                if not path.is_file() or path.is_symlink():
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
