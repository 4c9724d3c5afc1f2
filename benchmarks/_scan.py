"""The malicious-file checks: engine speed, and a false-positive run.

Speed is measured by scanning the large random test file with the built-in engines
(signatures, YARA, file type, archives; no clamd) in a child process, so its peak memory
is its own. The false-positive run scans ordinary files this machine has (the Python
standard library with its tests, documentation and images under /usr/share) and lists
every file the default policy does not call clean.
"""

from __future__ import annotations

import os
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from splitstore.scanning import Scanner

__all__ = ["ORDINARY_ROOTS", "false_positives", "ordinary_files"]

ORDINARY_ROOTS = [
    Path(sysconfig.get_paths()["stdlib"]),
    Path("/usr/share/doc"),
    Path("/usr/share/pixmaps"),
    Path("/usr/share/icons"),
    Path("/usr/share/common-licenses"),
]
# Files larger than this are skipped: the run is about variety, not volume.
MAX_FILE_BYTES = 16 * 1024 * 1024


def ordinary_files(limit: int, roots: list[Path] | None = None) -> Iterator[Path]:
    """Up to ``limit`` regular files under ``roots``, spread over them in turn."""
    walkers = [_walk(r) for r in (roots or ORDINARY_ROOTS) if r.is_dir()]
    given = 0
    while walkers and given < limit:
        for walker in list(walkers):
            path = next(walker, None)
            if path is None:
                walkers.remove(walker)
            elif given < limit:
                given += 1
                yield path


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_file() and not path.is_symlink() and 0 < st.st_size <= MAX_FILE_BYTES:
                yield path


def false_positives(limit: int) -> dict[str, Any]:
    """Scan up to ``limit`` ordinary files at the default policy; report what is not clean."""
    scanner = Scanner()
    scanned = size = 0
    flagged: list[dict[str, Any]] = []
    kinds: dict[str, int] = {}
    start = time.perf_counter()
    for path in ordinary_files(limit):
        try:
            report = scanner.scan_path(path)
        except OSError:
            continue
        scanned += 1
        size += report.size
        suffix = path.suffix.lower() or "(none)"
        kinds[suffix] = kinds.get(suffix, 0) + 1
        if report.verdict != "clean":
            flagged.append({"path": str(path), "verdict": report.verdict, "why": report.summary()})
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:12]
    return {
        "files": scanned,
        "bytes": size,
        "seconds": time.perf_counter() - start,
        "flagged": flagged,
        "extensions": dict(top),
    }
