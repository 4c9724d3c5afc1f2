"""A large file through real server processes, with the memory of every process measured.

Marked slow (skip with ``-m "not slow"``); CI runs it. Memory, unlike time, is stable
enough to bound in a test: a design that buffered the file would need over 256 MiB.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitstore._setup import free_loopback_port as free_port
from splitstore._setup import init_setup

SIZE = 256 * 1024 * 1024 + 12_345  # not a whole number of chunks, on purpose
# Far below the file's size: flat memory is the point. Python, numpy, aiohttp and
# `cryptography` alone take ~60 MiB.
CLIENT_LIMIT_MIB = 150
SERVER_LIMIT_MIB = 150


# Runs the CLI and reports its own peak RSS (VmHWM) on exit. ru_maxrss of a child is no
# use here: Linux carries the forking parent's peak across exec, and pytest's is large.
_MEASURED_CLI = """
import atexit, sys
from pathlib import Path
out = Path(sys.argv[1])
def report():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            out.write_text(line.split()[1])
atexit.register(report)
from splitstore._cli import main
sys.argv = ["splitstore", *sys.argv[2:]]
sys.exit(main())  # as the program: it sets up its own process (BLAS threads, malloc)
"""


def run_measured(args: list[str], cwd: Path) -> tuple[int, float, str]:
    """Run the CLI; return its exit code, its own peak RSS in MiB, and stderr."""
    report = cwd / "peak-rss.txt"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI, str(report), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, int(report.read_text()) / 1024, proc.stderr


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for memory")
def test_large_file_flat_memory(tmp_path: Path) -> None:
    https_port, tcp_port = free_port(), free_port()
    paths = init_setup(tmp_path / "setup", https_port=https_port, tcp_port=tcp_port)
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with source.open("wb") as f:
        for _ in range(SIZE // (4 << 20)):
            block = os.urandom(4 << 20)
            digest.update(block)
            f.write(block)
        tail = os.urandom(SIZE % (4 << 20))
        digest.update(tail)
        f.write(tail)

    cli = [sys.executable, "-m", "splitstore"]
    server = subprocess.Popen(
        [*cli, "serve", "--config", str(paths.config), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(https_port)
        wait_for_port(tcp_port)
        started = time.monotonic()
        code, put_mib, err = run_measured(
            ["put", str(source), "--config", str(paths.config), "-q"], tmp_path
        )
        put_seconds = time.monotonic() - started
        assert code == 0, err
        started = time.monotonic()
        out = tmp_path / "out.bin"
        code, get_mib, err = run_measured(
            ["get", "big.bin", "-o", str(out), "--config", str(paths.config), "-q"],
            tmp_path,
        )
        get_seconds = time.monotonic() - started
        assert code == 0, err
        # Each server runs in a process of its own under serve: the largest of them.
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        server_mib = max(peak_rss_mib(pid) for pid in [server.pid, *map(int, children)])
    finally:
        server.terminate()
        server.wait(20)

    with out.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest.hexdigest()
    mb = SIZE / 1e6
    print(
        f"\n256 MiB: put {mb / put_seconds:.0f} MB/s, peak {put_mib:.0f} MiB; "
        f"get {mb / get_seconds:.0f} MB/s, peak {get_mib:.0f} MiB; "
        f"largest server process peak {server_mib:.0f} MiB"
    )
    assert put_mib < CLIENT_LIMIT_MIB
    assert get_mib < CLIENT_LIMIT_MIB
    assert server_mib < SERVER_LIMIT_MIB
