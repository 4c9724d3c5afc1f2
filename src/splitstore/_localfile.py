"""Opening a local file the user named, safely: only regular files, never a hang."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from ._errors import LocalFileError

__all__ = ["open_regular_file"]

_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)


def open_regular_file(path: Path) -> io.BufferedReader:
    """Open ``path`` for reading, or raise LocalFileError saying why not in one line."""
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer
        # forever (and a device such as /dev/zero never ends): only regular files pass.
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK)
    except FileNotFoundError:
        raise LocalFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise LocalFileError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise LocalFileError(f"{path} cannot be read (permission denied)") from None
    except OSError as exc:
        raise LocalFileError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise LocalFileError(f"{path} is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise LocalFileError(f"{path} is not a regular file")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
