"""A throwaway setup and its two servers, run by ``splitstore serve`` in a subprocess.

The servers live in their own processes (``serve`` runs each server in a child of its
own) so that their CPU time and peak memory are measured apart from the client's.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from splitstore._setup import SetupPaths, free_loopback_port, init_setup

from ._proc import children, cpu_seconds, die_with_parent, peak_rss, reset_peak, stop_process

__all__ = ["ServerProcess"]

START_TIMEOUT = 30.0


class ServerProcess:
    """``init_setup`` in ``root``, then both servers of it, under one ``splitstore serve``.

    Use as a context manager: the servers are stopped on the way out, error or not.
    """

    def __init__(self, root: Path, *, encryption: str) -> None:
        self.ports = (free_loopback_port(), free_loopback_port())
        self.paths: SetupPaths = init_setup(
            root, https_port=self.ports[0], tcp_port=self.ports[1], encryption=encryption
        )
        # The transfer figures are the pipeline's own: scanning is off in the main config,
        # and measured apart, with this one, which scans as a default setup does.
        self.scan_config = self.paths.config.with_name("scan-on.toml")
        self.scan_config.write_text(self.paths.config.read_text())
        with self.paths.config.open("a") as f:
            f.write("\n[scan]\nenabled = false\n")
        self.log = root / "serve.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._cpu_mark = 0.0
        self._pids: list[int] = []
        #: False if this kernel does not let us reset the peak: it then covers all so far.
        self.peak_resettable = True

    @property
    def config(self) -> Path:
        return self.paths.config

    @property
    def pid(self) -> int:
        assert self._proc is not None, "the servers are not running"
        return self._proc.pid

    def __enter__(self) -> ServerProcess:
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "splitstore", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,  # safe: no other threads run here yet
            )
        try:
            self._wait_until_listening()
            self._find_servers()
        except BaseException:
            stop_process(self._proc)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is not None:
            stop_process(self._proc)

    def _wait_until_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(self.ports)
        while waiting:
            if self._proc.poll() is not None:
                raise RuntimeError(f"splitstore serve exited early:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"splitstore serve did not start in {START_TIMEOUT:.0f} s")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.05)

    def _find_servers(self) -> None:
        """``serve`` and the server processes it started (each server runs in one of its
        own; multiprocessing's resource tracker, which does nothing here, is left out)."""
        servers = [
            pid
            for pid in children(self.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        self._pids = [self.pid, *servers]

    def mark(self) -> None:
        """Start measuring one operation: peak memory from now, CPU time from now."""
        for pid in self._pids:
            self.peak_resettable = reset_peak(pid) and self.peak_resettable
        self._cpu_mark = sum(cpu_seconds(pid) for pid in self._pids)

    def usage(self) -> tuple[int, float]:
        """The largest peak RSS (bytes) of one server process, and the CPU seconds of
        all of them, since ``mark``. A server that is gone fails the run, loudly."""
        if any(not Path(f"/proc/{pid}").exists() for pid in self._pids):
            raise RuntimeError(f"a server process ended during the run:\n{self.log.read_text()}")
        peak = max(peak_rss(pid) for pid in self._pids)
        return peak, sum(cpu_seconds(pid) for pid in self._pids) - self._cpu_mark
