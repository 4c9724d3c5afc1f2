#!/usr/bin/env python3
"""Set up and run splitstore from a fresh checkout, with only Python 3.11+ and pip.

    python3 dev.py demo     store and fetch a sample file through two local servers
    python3 dev.py test     lint, type-check and run the whole test suite
    python3 dev.py bench    run the benchmarks (pass --quick for a short run)
    python3 dev.py setup    only create .venv and install the project into it

Each command creates .venv and installs the project (pinned by constraints.txt) first,
if that was not done already for the current pyproject.toml and constraints.txt.
`test` also installs clamd and libmagic (Debian's clamav-daemon and libmagic1) with
apt-get when they are missing and it runs as root; elsewhere the clamd tests are skipped.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".splitstore-installed"


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py may be run by an older python3)
        sys.exit(f"splitstore needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    inputs = b"".join((ROOT / f).read_bytes() for f in ("pyproject.toml", "constraints.txt"))
    wanted = hashlib.sha256(inputs).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing splitstore and its tools into .venv", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-c", "constraints.txt", "-e", ".[dev]"], cwd=ROOT, check=True)
    STAMP.write_text(wanted + "\n")


def ensure_system_packages() -> None:
    """Install clamd and libmagic (for the scanner's tests) with apt-get if missing and we
    may; otherwise say that the clamd tests will be skipped, and carry on."""
    missing = [] if shutil.which("clamd") or Path("/usr/sbin/clamd").exists() else ["clamd"]
    if ctypes.util.find_library("magic") is None:
        missing.append("libmagic")
    if not missing:
        return
    names = " and ".join(missing)
    if shutil.which("apt-get") is None or sys.platform == "win32" or os.geteuid() != 0:
        print(
            f"dev.py: no {names} (installing needs root and apt-get); clamd tests will be skipped",
            flush=True,
        )
        return
    packages = ("clamav-daemon", "libmagic1")
    print(f"dev.py: installing {' '.join(packages)} with apt-get for {names}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt_get(*args: str) -> bool:
        cmd = ["apt-get", "-q", "-o", "Dpkg::Options::=--force-confold", *args]
        try:  # stdin closed and a time limit: nothing may wait for an answer forever
            done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=1200)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    # The packages' scripts would start clamd and freshclam, daemons that stay behind (or
    # hang a container without an init system); a policy-rc.d that says no keeps them off.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# dev.py: start no services during apt-get\nexit 101\n")
        policy.chmod(0o755)
    try:
        install = ("install", "-y", "--no-install-recommends", *packages)
        installed = apt_get(*install) or (apt_get("update") and apt_get(*install))
    finally:
        if ours:
            policy.unlink(missing_ok=True)
    if not installed:
        print(f"dev.py: apt-get could not install {names}; clamd tests will be skipped", flush=True)


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in ("help", "-h", "--help"):
        print(__doc__)
        return
    setup()
    if command == "setup":
        return
    if command == "demo":
        run(str(BIN / "splitstore"), "demo", *rest)
    elif command == "test":
        ensure_system_packages()
        run(str(BIN / "ruff"), "check", ".")
        run(str(BIN / "ruff"), "format", "--check", ".")
        run(str(BIN / "mypy"))
        run(str(PY), "-m", "pytest", *rest)
    elif command == "bench":
        run(str(PY), "-m", "benchmarks", *rest)
    else:
        sys.exit(f"dev.py: unknown command {command!r}; try: demo, test, bench, setup")


if __name__ == "__main__":
    main(sys.argv[1:])
