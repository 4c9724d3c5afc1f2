"""A real clamd for tests, loading only splitstore's shipped signatures (starts in well
under a second).

``start_clamd`` writes a clamd.conf in a work folder (local socket only, no TCP, no
freshclam), starts clamd in the foreground and waits until it answers PING. The
session fixtures ``clamd_process``, ``clamd_socket`` and ``clamd_address`` share one such
clamd; import them into a conftest or a test module to use them. Without clamd installed
(Debian's clamav-daemon) the tests that need it are skipped, except under CI (the CI
variable set), where they fail: CI must really run them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from splitstore.scanning._clamd import shipped_database_dir

__all__ = [
    "ClamdProcess",
    "clamd_address",
    "clamd_binary",
    "clamd_process",
    "clamd_socket",
    "ping",
    "require_clamd",
    "start_clamd",
]

STARTUP_TIMEOUT = 30.0
#: sun_path holds 108 bytes; a longer socket path goes to a short temporary folder.
MAX_SOCKET_PATH = 100


def clamd_binary() -> str | None:
    found = shutil.which("clamd")
    if found is None and os.access("/usr/sbin/clamd", os.X_OK):
        found = "/usr/sbin/clamd"
    return found


def require_clamd() -> str:
    """clamd's path; skip the test without it (fail under CI, which must run it)."""
    binary = clamd_binary()
    if binary is None:
        reason = "clamd is not installed (Debian: apt-get install clamav-daemon)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the clamd tests", pytrace=False)
        pytest.skip(reason)
    return binary


@dataclass
class ClamdProcess:
    """A running clamd; ``stop`` (or leaving the ``with`` block) ends it."""

    process: subprocess.Popen[bytes]
    workdir: Path
    socket_path: Path
    #: A short temporary folder holding the socket, removed on stop, if one was needed.
    socket_dir: Path | None = None
    startup_seconds: float = field(default=0.0)

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "clamd.log"

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.log_path, self.workdir / "clamd.out"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(clamd wrote no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> ClamdProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_clamd(
    workdir: Path,
    *,
    stream_max_length: str = "25M",
    database_dir: Path | None = None,
    options: Mapping[str, str] | None = None,
) -> ClamdProcess:
    """Start clamd with its files in ``workdir`` and wait until it answers PING.

    MaxFileSize and MaxScanSize are set to ``stream_max_length`` too, so the stream limit
    is the one a large file meets; ``options`` adds or overrides clamd.conf lines.
    ``database_dir`` defaults to the shipped signatures (clamd only reads it).
    """
    binary = require_clamd()
    workdir.mkdir(parents=True, exist_ok=True)
    socket_dir = None
    socket_path = workdir / "clamd.sock"
    if len(str(socket_path)) > MAX_SOCKET_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="clamd-"))
        socket_path = socket_dir / "clamd.sock"
    config = {
        "Foreground": "yes",
        "LocalSocket": str(socket_path),
        "LocalSocketMode": "600",
        "FixStaleSocket": "yes",
        "DatabaseDirectory": str(database_dir or shipped_database_dir()),
        "TemporaryDirectory": str(workdir),
        "LogFile": str(workdir / "clamd.log"),
        "LogTime": "yes",
        "StreamMaxLength": stream_max_length,
        "MaxFileSize": stream_max_length,
        "MaxScanSize": stream_max_length,
        # Report, rather than silently pass, a file skipped for exceeding a limit.
        "AlertExceedsMax": "yes",
        "MaxThreads": "4",
        "ReadTimeout": "10",
        "CommandReadTimeout": "5",
        **(options or {}),
    }
    conf = workdir / "clamd.conf"
    conf.write_text("".join(f"{key} {value}\n" for key, value in config.items()))
    started = time.monotonic()
    with (workdir / "clamd.out").open("wb") as out:
        process = subprocess.Popen(
            [binary, "--config-file", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    clamd = ClamdProcess(process, workdir, socket_path, socket_dir)
    try:
        _wait_for_pong(clamd)
    except BaseException:
        clamd.stop()
        raise
    clamd.startup_seconds = time.monotonic() - started
    return clamd


def _wait_for_pong(clamd: ClamdProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if clamd.process.poll() is not None:
            raise RuntimeError(
                f"clamd exited with status {clamd.process.returncode} while starting:\n"
                + clamd.log_tail()
            )
        if ping(clamd.socket_path):
            return
        time.sleep(0.02)
    raise RuntimeError(
        f"clamd did not answer PING within {STARTUP_TIMEOUT:g} s:\n" + clamd.log_tail()
    )


def ping(socket_path: Path, timeout: float = 1.0) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(b"zPING\0")
            return sock.recv(16) == b"PONG\0"
    except OSError:
        return False


@pytest.fixture(scope="session")
def clamd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdProcess]:
    """One clamd for the whole test session, with the shipped signatures."""
    with start_clamd(tmp_path_factory.mktemp("clamd")) as clamd:
        yield clamd


@pytest.fixture(scope="session")
def clamd_socket(clamd_process: ClamdProcess) -> Path:
    return clamd_process.socket_path


@pytest.fixture(scope="session")
def clamd_address(clamd_process: ClamdProcess) -> str:
    """The session clamd's address for ``ClamdEngine``: ``"unix:/…/clamd.sock"``."""
    return clamd_process.address
