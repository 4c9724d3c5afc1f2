"""``put`` and ``get`` of several files at once: through store_many and fetch_many.

Each file gets one line as it ends (its errors on stderr, naming it), then a summary;
the exit status is the first failure's, as that file's own put or get would give.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from ._cli_output import print_json, size_text
from ._cli_scan import stored_scan_line, warn_about
from ._client import AsyncClient, FileInfo
from ._errors import BatchError, LocalFileError, SplitStoreError, UsageError
from .scanning import ScanReport

__all__ = ["get_many", "put_many"]

Runner = Callable[[argparse.Namespace, Callable[[AsyncClient], Coroutine[Any, Any, int]]], int]


def put_many(args: argparse.Namespace, with_client: Runner) -> int:
    if args.name is not None:
        raise UsageError("--name gives one file its name: use it with a single FILE")
    sources = [Path(f) for f in args.files]

    def done(index: int, outcome: FileInfo | SplitStoreError) -> None:
        if isinstance(outcome, SplitStoreError):
            _error(f"{args.files[index]}: {outcome}")
            return
        if outcome.scan is not None:
            warn_about(outcome.scan, outcome.name, overridden=outcome.scan.verdict == "malicious")
        if not (args.quiet or args.json):
            print(f"stored {outcome.name!r}: {size_text(outcome.size)}")

    async def job(client: AsyncClient) -> int:
        work = client.store_many(sources, allow_unsafe=args.allow_unsafe, on_file=done)
        return await _reported(args, work, "stored")

    return with_client(args, job)


def get_many(args: argparse.Namespace, with_client: Runner) -> int:
    folder = Path(args.output) if args.output is not None else Path.cwd()
    if not folder.is_dir():
        raise LocalFileError(f"{folder} is not a folder: with several names, -o names one")

    def scanned(name: str, report: ScanReport, at_store: ScanReport | None) -> None:
        warn_about(report, name, overridden=report.verdict == "malicious")
        if report.verdict != "clean" and not args.quiet:
            print(f"  {name!r} scan when stored: {stored_scan_line(at_store)}")

    def done(index: int, outcome: Path | SplitStoreError) -> None:
        name = args.names[index]
        if isinstance(outcome, SplitStoreError):
            _error(f"{name}: {outcome}")
        elif not args.quiet:
            print(f"fetched {name!r} into {outcome}")

    async def job(client: AsyncClient) -> int:
        work = client.fetch_many(
            args.names,
            folder,
            force=args.force,
            allow_unsafe=args.allow_unsafe,
            on_file=done,
            on_scan=scanned,
        )
        return await _reported(args, work, "fetched")

    return with_client(args, job)


async def _reported(args: argparse.Namespace, work: Awaitable[list[Any]], verb: str) -> int:
    """Await the files' work, then sum it up; a BatchError is restated for the CLI."""
    started = time.monotonic()
    try:
        results = await work
    except BatchError as exc:
        _summary(args, exc.results, verb, started)
        failed = sum(isinstance(r, SplitStoreError) for r in exc.results)
        raise BatchError(
            f"{failed} of {len(exc.results)} files were not {verb} (each is named above)",
            exc.results,
        ) from None
    _summary(args, results, verb, started)
    return 0


def _summary(args: argparse.Namespace, results: list[Any], verb: str, started: float) -> None:
    good = [r for r in results if not isinstance(r, SplitStoreError)]
    if getattr(args, "json", False):
        print_json(
            [
                {"file": str(spec), "error": str(r)}
                if isinstance(r, SplitStoreError)
                else r.to_json()
                for spec, r in zip(args.files, results, strict=True)
            ]
        )
        return
    if args.quiet:
        return
    seconds = time.monotonic() - started
    if verb == "stored":
        size = f" ({size_text(sum(r.size for r in good))})"
        note = ", every file split between both servers"
    else:
        size, note = "", ", every hash checked"
    print(f"{verb} {len(good)} of {len(results)} files{size} in {seconds:.2f} s{note}")


def _error(message: str) -> None:
    print(f"splitstore: error: {message}", file=sys.stderr)
