"""A progress bar on stderr for transfers, shown only to a person at a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["TransferProgress"]

# A transfer faster than this never shows a bar: it would only flicker.
SHOW_AFTER_SECONDS = 0.5


class TransferProgress:
    """Use as a context manager; pass ``update`` as the client's progress callback.

    ``enabled=None`` draws only when the output is a terminal. ``console`` is where to
    draw (default: stderr).
    """

    def __init__(
        self, description: str, *, enabled: bool | None = None, console: Console | None = None
    ) -> None:
        if enabled is None:
            enabled = console.is_terminal if console is not None else sys.stderr.isatty()
        self._enabled = enabled
        self._console = console
        self._description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._started = time.monotonic()

    def __enter__(self) -> TransferProgress:
        self._started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._progress is None:
            if time.monotonic() - self._started < SHOW_AFTER_SECONDS or done >= total:
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self._console or Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=total)
        if self._task is not None:
            self._progress.update(self._task, completed=done, total=total)
