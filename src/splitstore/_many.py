"""Many files at once: ``store_many`` and ``fetch_many`` of ``AsyncClient``.

Each file goes through the single ``store`` or ``fetch``, with all its checks. Small
files run many at a time, so that their requests share batches (``_coalesce``); large
ones move one at a time, since each already keeps both servers busy and holds its own
buffers. One file's failure does not stop the others: all are tried, and then a
BatchError lists each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._coalesce import BATCHED_STRIPE_BYTES
from ._errors import BatchError, InvalidNameError, LocalFileError, SplitStoreError
from ._names import validate_name

if TYPE_CHECKING:
    from ._client import AsyncClient, FileInfo
    from .scanning import ScanReport

__all__ = ["FileCallback", "FileSpec", "ManyScanCallback", "fetch_many", "store_many"]

#: A local file, or (local file, name to store it under).
FileSpec = str | os.PathLike[str] | tuple[str | os.PathLike[str], str]
#: Told of each file as it ends: its index in the given order, and its outcome (what the
#: single operation returned, or the SplitStoreError it raised).
FileCallback = Callable[[int, Any], None]
#: fetch_many's ``on_scan``: the stored name, its scan now, and the one made at store time.
ManyScanCallback = Callable[[str, "ScanReport", "ScanReport | None"], None]

#: Files up to this size are moved many at a time (each of their two stripes fits a batch).
SMALL_FILE_BYTES = 2 * BATCHED_STRIPE_BYTES
#: Files in progress at once: enough to fill batches, few enough to stay light (measured
#: on 2 cores, 64 gave fuller batches and less CPU per file than 32).
AT_ONCE = 64
# A fetch learns its file's size only from the manifest: fetch_many sets this for its
# files, and a fetch of a large one waits for it (one at a time, as store_many does), so
# that memory stays flat however many large files a call names.
_LARGE_READS: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar(
    "splitstore_large_reads", default=None
)


def large_read_turn(stored_size: int) -> contextlib.AbstractAsyncContextManager[Any]:
    """What a fetch of ``stored_size`` bytes holds while it reads: within fetch_many, the
    turn of large files; otherwise (or for a small file) nothing."""
    gate = _LARGE_READS.get()
    if gate is None or stored_size <= SMALL_FILE_BYTES:
        return contextlib.nullcontext()
    return gate


T = TypeVar("T")


async def store_many(
    client: AsyncClient,
    files: Iterable[FileSpec],
    *,
    allow_unsafe: bool = False,
    on_file: FileCallback | None = None,
) -> list[FileInfo]:
    jobs: list[tuple[Path, str]] = []
    for spec in files:
        path, name = (Path(spec[0]), spec[1]) if isinstance(spec, tuple) else (Path(spec), None)
        jobs.append((path, validate_name(path.name if name is None else name)))
    _refuse_repeats([name for _, name in jobs], "name", InvalidNameError)
    small, large = asyncio.Semaphore(AT_ONCE), asyncio.Semaphore(1)

    async def one(path: Path, name: str) -> FileInfo:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0  # store itself says what is wrong with the file
        async with small if size <= SMALL_FILE_BYTES else large:
            return await client.store(path, name, allow_unsafe=allow_unsafe)

    return await _all([one(path, name) for path, name in jobs], "stored", on_file)


async def fetch_many(
    client: AsyncClient,
    names: Iterable[str],
    folder: str | os.PathLike[str],
    *,
    force: bool = False,
    allow_unsafe: bool = False,
    on_file: FileCallback | None = None,
    on_scan: ManyScanCallback | None = None,
) -> list[Path]:
    target = Path(folder)
    if not target.is_dir():
        raise LocalFileError(f"{target} is not a folder")
    wanted = [validate_name(name) for name in names]
    _refuse_repeats([name.rsplit("/", 1)[-1] for name in wanted], "file name", LocalFileError)
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(name: str) -> Path:
        def scanned(report: ScanReport, at_store: ScanReport | None) -> None:
            if on_scan is not None:
                on_scan(name, report, at_store)

        async with gate:
            return await client.fetch(
                name, target, force=force, allow_unsafe=allow_unsafe, on_scan=scanned
            )

    turn = _LARGE_READS.set(asyncio.Semaphore(1))  # the files' tasks start with it set
    try:
        return await _all([one(name) for name in wanted], "fetched", on_file)
    finally:
        _LARGE_READS.reset(turn)


def _refuse_repeats(values: Sequence[str], what: str, error: type[SplitStoreError]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise error(f"the {what} {value!r} appears more than once; nothing was done")
        seen.add(value)


async def _all(work: list[Awaitable[T]], done: str, on_file: FileCallback | None) -> list[T]:
    """Run every file's operation to its end; raise BatchError if any failed."""

    async def reported(index: int, job: Awaitable[T]) -> T:
        try:
            outcome = await job
        except SplitStoreError as exc:
            if on_file is not None:
                on_file(index, exc)
            raise
        if on_file is not None:
            on_file(index, outcome)
        return outcome

    jobs = [reported(i, job) for i, job in enumerate(work)]
    outcomes = await asyncio.gather(*jobs, return_exceptions=True)
    for outcome in outcomes:  # anything but a SplitStoreError is not a file's failure
        if isinstance(outcome, BaseException) and not isinstance(outcome, SplitStoreError):
            raise outcome
    failed = [o for o in outcomes if isinstance(o, SplitStoreError)]
    if failed:
        raise BatchError(
            f"{len(failed)} of {len(outcomes)} files were not {done}; the first: {failed[0]}",
            list(outcomes),
        )
    return list(outcomes)  # type: ignore[arg-type]
