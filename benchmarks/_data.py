"""Test files of random (incompressible) bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["make_file", "make_small_files"]

_BLOCK = 16 * 1024 * 1024


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    """Write ``size`` random bytes to ``path``, a block at a time (memory stays flat)."""
    rng = np.random.default_rng(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, _BLOCK)
            f.write(rng.bytes(n))
            left -= n
    return path


def make_small_files(folder: Path, count: int, size: int, seed: int = 2) -> Path:
    """``count`` files of ``size`` random bytes each in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"f{i:06d}.bin").write_bytes(rng.bytes(size))
    return folder
