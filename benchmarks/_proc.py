"""Child processes and what Linux's /proc says about them: peak memory and CPU time."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Finished",
    "ToolFailed",
    "children",
    "cpu_seconds",
    "current_rss",
    "die_with_parent",
    "peak_rss",
    "reset_peak",
    "run_measured",
    "stop_process",
]

_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.02


class ToolFailed(RuntimeError):
    """A measured command exited with an error; the message ends with its log's tail."""


@dataclass(frozen=True)
class Finished:
    """A command that ran to its end: wall time, peak memory and CPU time of that child.

    ``peak_bytes`` is 0 when not sampled, or for a program too short-lived to be.
    """

    seconds: float
    peak_bytes: int
    cpu_seconds: float


def run_measured(
    cmd: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    sample_peak: bool = True,
) -> Finished:
    """Run ``cmd`` with its output in ``log``; raise ToolFailed unless it exits with 0.

    CPU time comes from ``os.wait4``, for exactly this child. Peak memory does not: the
    kernel counts the memory of the forked copy of this process into the child's
    ru_maxrss, so VmHWM is sampled from /proc instead, once the program runs (it only
    grows, so the last sample is the peak but for the last few milliseconds). Without
    ``sample_peak`` (for a child that reports its own), this waits without polling.
    """
    program = Path(cmd[0]).name[:15]  # as /proc/<pid>/comm holds it
    peak = 0
    with log.open("ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG if sample_peak else 0)
                if pid:
                    break
                peak = max(peak, _program_peak(proc.pid, program))
                time.sleep(SAMPLE_SECONDS)
        except BaseException:  # Ctrl-C or a signal: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise ToolFailed(
            f"{' '.join(cmd[:3])} ... exited with {proc.returncode}:\n  " + "\n  ".join(tail)
        )
    return Finished(seconds, peak, usage.ru_utime + usage.ru_stime)


def _program_peak(pid: int, program: str) -> int:
    """VmHWM of ``pid`` if it runs ``program`` by now (not the copy of us before exec)."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != program:
            return 0
        return peak_rss(pid)
    except (OSError, LookupError):  # it has just exited
        return 0


def _status_field(pid: int | str, field: str) -> int:
    """A ``VmXXX`` line of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    raise LookupError(f"/proc/{pid}/status has no {field}")


def peak_rss(pid: int | str = "self") -> int:
    """The process's peak resident memory (VmHWM) in bytes."""
    return _status_field(pid, "VmHWM")


def current_rss(pid: int | str = "self") -> int:
    """The process's resident memory now (VmRSS) in bytes."""
    return _status_field(pid, "VmRSS")


def reset_peak(pid: int) -> bool:
    """Start VmHWM again from the current RSS (Linux 4.0+); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name in (...) may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that are still running (Linux 3.5+)."""
    try:
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in listed]


def die_with_parent() -> None:
    """For ``preexec_fn``: the kernel sends this child SIGTERM if the parent dies, so a
    server outlives a killed benchmark by no more than its shutdown."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
