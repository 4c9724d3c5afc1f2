"""One client operation in a process of its own, so its peak memory is its own.

    python -m benchmarks._runner OUT store CONFIG FILE NAME
    python -m benchmarks._runner OUT fetch CONFIG NAME DEST
    python -m benchmarks._runner OUT small CONFIG SOURCE_DIR DEST_DIR PREFIX
    python -m benchmarks._runner OUT fill CONFIG FILE COUNT PREFIX
    python -m benchmarks._runner OUT ls CONFIG
    python -m benchmarks._runner OUT scan CONFIG FILE

Everything goes through the public API (``splitstore.Client``, ``AsyncClient``). The
result goes to the file OUT as JSON: the operation's seconds (the session is opened
before the clock starts, so interpreter start-up and imports are not counted; connecting
is), its CPU seconds, this process's peak RSS (VmHWM), and what else the op reports.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from splitstore import AsyncClient, Client

from ._proc import current_rss, peak_rss

# Stores in flight at once while filling a listing: enough to keep both servers busy.
FILL_CONCURRENCY = 8


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _store(client: Client, source: str, name: str) -> dict[str, Any]:
    info = client.store(source, name)
    return {"bytes": info.size}


def _fetch(client: Client, name: str, dest: str) -> dict[str, Any]:
    path = client.fetch(name, dest, force=True)  # fsyncs, and checks every hash
    return {"bytes": path.stat().st_size}


def _small(
    client: Client, source_dir: str, dest_dir: str, prefix: str, mode: str
) -> dict[str, Any]:
    """Store every file of ``source_dir``, then fetch them all: one session for both.

    ``mode`` "many": through store_many and fetch_many (their requests share batches);
    "one": one store, then one fetch, after another.
    """
    files = sorted(Path(source_dir).iterdir())
    names = [f"{prefix}/{f.name}" for f in files]
    start = time.perf_counter()
    if mode == "many":
        client.store_many(list(zip(files, names, strict=True)))
    else:
        for f, name in zip(files, names, strict=True):
            client.store(f, name)
    stored = time.perf_counter()
    if mode == "many":
        client.fetch_many(names, dest_dir)
    else:
        for f, name in zip(files, names, strict=True):
            client.fetch(name, Path(dest_dir) / f.name)
    fetched = time.perf_counter()
    return {
        "files": len(files),
        "store_seconds": stored - start,
        "fetch_seconds": fetched - stored,
    }


def _scan(client: Client, source: str) -> dict[str, Any]:
    """The built-in engines over one file, as ``put`` runs them."""
    from splitstore.scanning import Scanner, ScanSettings

    scanner = Scanner(ScanSettings(policy=client.config.scan.policy))
    scanner.describe()  # rules compiled and libmagic loaded once per session, not per file
    report = scanner.scan_path(source)
    return {"bytes": report.size, "verdict": report.verdict, "scan_seconds": report.seconds}


async def _fill(config: str, source: str, count: int, prefix: str) -> None:
    """Store ``source`` under ``count`` names, a bounded number at a time."""
    slots = asyncio.Semaphore(FILL_CONCURRENCY)
    async with AsyncClient(config) as client:

        async def one(i: int) -> None:
            async with slots:
                await client.store(source, f"{prefix}/{i:06d}")

        await asyncio.gather(*(one(i) for i in range(count)))


def main(argv: list[str]) -> int:
    out, op, config, *args = argv
    result: dict[str, Any]
    if op == "fill":
        source, count, prefix = args
        start, cpu = time.perf_counter(), _cpu()
        asyncio.run(_fill(config, source, int(count), prefix))
        result = {"names": int(count), "seconds": time.perf_counter() - start}
    else:
        with Client(config) as client:
            baseline = current_rss()
            start, cpu = time.perf_counter(), _cpu()
            if op == "store":
                result = _store(client, *args)
            elif op == "fetch":
                result = _fetch(client, *args)
            elif op == "small":
                result = _small(client, *args)
            elif op == "ls":
                result = {"names": len(client.list())}
            elif op == "scan":
                result = _scan(client, *args)
            else:
                raise SystemExit(f"unknown operation {op!r}")
            result["seconds"] = time.perf_counter() - start
        result["baseline_bytes"] = baseline
    result["cpu_seconds"] = _cpu() - cpu
    result["peak_bytes"] = peak_rss()
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
