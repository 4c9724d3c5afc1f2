"""restic and rclone on the same file, for comparison: found, installed if need be, run.

restic backs up into a new local repository each run (so nothing is deduplicated
against an earlier run) and restores from it; rclone copies to a local ``crypt``
remote, configured by environment variables alone, and back. Their times include
their process start-up, which is small next to a large file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ._cache import evict
from ._proc import Finished, run_measured

__all__ = ["Rclone", "Restic", "Tools", "find_tools"]

TOOLS = ("restic", "rclone")
APT_TIMEOUT = 900.0
REMOTE = "benchcrypt"  # the rclone remote's name


@dataclass
class Tools:
    """Where restic and rclone are (None: not available), their versions, and why not."""

    paths: dict[str, str | None] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def find_tools(*, install: bool = True) -> Tools:
    """Look for restic and rclone; try ``apt-get install`` for missing ones when root."""
    tools = Tools()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and install:
        _apt_install(missing, tools.notes)
    for name in TOOLS:
        path = shutil.which(name)
        tools.paths[name] = path
        if path is None:
            tools.notes.append(f"{name} is not installed: its comparison is left out")
            continue
        out = subprocess.run([path, "version"], capture_output=True, text=True, check=False)
        tools.versions[name] = (out.stdout.strip().splitlines() or ["?"])[0]
    return tools


def _apt_install(names: list[str], notes: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append(
            f"{' and '.join(names)} not found, and apt-get cannot be used here (needs root)"
        )
        return
    print(f"benchmarks: {' and '.join(names)} not found; installing: apt-get install -y", *names)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> bool:
        try:
            done = subprocess.run(
                ["apt-get", *args], env=env, capture_output=True, timeout=APT_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    if apt("install", "-y", "-q", *names):
        return
    print("benchmarks: that failed; running apt-get update and trying again", flush=True)
    apt("update", "-q")
    for name in names:  # one at a time, so one unknown package does not stop the other
        if not apt("install", "-y", "-q", name):
            notes.append(f"apt-get install {name} failed")


class Restic:
    """``restic backup`` into a fresh local repository, then ``restic restore``."""

    def __init__(self, exe: str, work: Path) -> None:
        self.exe, self.work = exe, work
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "restic.log"
        self.env = {
            **os.environ,
            "RESTIC_PASSWORD": secrets.token_urlsafe(16),
            "RESTIC_CACHE_DIR": str(work / "cache"),
        }

    def run(self, source: Path, n: int) -> tuple[Finished, Finished]:
        repo, target = self.work / f"repo{n}", self.work / f"restored{n}"
        base = [self.exe, "--repo", str(repo)]
        run_measured([*base, "init"], log=self.log, env=self.env)
        try:
            backup = run_measured([*base, "backup", str(source)], log=self.log, env=self.env)
            evict(repo)  # restored from disk, as splitstore's fetch reads its stripes
            restore = run_measured(
                [*base, "restore", "latest", "--target", str(target)], log=self.log, env=self.env
            )
            # restic restores a file under its whole original path inside the target.
            _check_size(target / source.resolve().relative_to("/"), source)
        finally:
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
        return backup, restore


class Rclone:
    """``rclone copy`` to a local crypt remote and back, configured by environment only."""

    def __init__(self, exe: str, work: Path) -> None:
        self.exe, self.work = exe, work
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "rclone.log"
        self.store = work / "crypt-store"
        # Hex, not token_urlsafe: a password starting with "-" was taken for a flag (one
        # run in 64 measured no rclone at all).
        obscured = subprocess.run(
            [exe, "obscure", secrets.token_hex(16)], capture_output=True, text=True, check=True
        ).stdout.strip()
        config = work / "rclone.conf"
        config.touch()  # an empty config file: rclone reads nothing of the user's
        prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        self.env = {
            **os.environ,
            "RCLONE_CONFIG": str(config),
            prefix + "TYPE": "crypt",
            prefix + "REMOTE": str(self.store),
            prefix + "PASSWORD": obscured,
        }

    def run(self, source: Path, n: int) -> tuple[Finished, Finished]:
        back = self.work / f"back{n}"
        remote = f"{REMOTE}:run{n}"
        try:
            up = run_measured([self.exe, "copy", str(source), remote], log=self.log, env=self.env)
            evict(self.store)
            down = run_measured(
                [self.exe, "copy", f"{remote}/{source.name}", str(back)], log=self.log, env=self.env
            )
            _check_size(back / source.name, source)
        finally:
            shutil.rmtree(self.store, ignore_errors=True)
            shutil.rmtree(back, ignore_errors=True)
        return up, down


def _check_size(restored: Path, source: Path) -> None:
    if not restored.is_file() or restored.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"{restored} is missing or differs in size from {source}")
