"""The whole run: each phase in turn, in one temporary folder that is removed at the end."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitstore import __version__
from splitstore._config import ENCRYPTION_ON
from splitstore._setup import SetupPaths

from ._budget import cpu_budget
from ._cache import CAN_EVICT, evict
from ._data import make_file, make_small_files
from ._measure import ClientRunner, Run, summarise
from ._proc import ToolFailed, run_measured
from ._reference import Rclone, Restic, Tools, find_tools
from ._runner import FILL_CONCURRENCY
from ._scan import false_positives
from ._servers import ServerProcess
from ._stats import MIB
from ._tls_copy import tls_copy

__all__ = ["Options", "run_suite"]

SMALL_FILE_BYTES = 4096
# How the small files go: the label each way is printed with.
SMALL_MODES = {"many": "store_many/fetch_many", "one": "one at a time"}
# Bytes each step of the CPU budget is timed over (each of a few tries).
BUDGET_BYTES = 256 * MIB
LISTED_FILE_BYTES = 64
MB = 1e6  # rates are in MB/s, 10^6 bytes a second, as dd and most tools print them

NOTES = [
    "the test file was just written, so its reads are likely served from the page cache "
    "(dropping the cache needs privileges and is not attempted)",
    "splitstore fsyncs (the servers every stripe, the client every fetched file); restic "
    "and rclone may not",
    "each setup's two servers run under one 'splitstore serve --config', each in a process "
    "of its own, on the client's machine and cores (server MiB: the larger of the two; "
    "server CPU: both); the large file goes in rounds: each round runs every setup (taking "
    "turns at going first), then the TLS copy, restic and rclone once each, so that a host "
    "whose speed drifts tilts the ratios less",
    "client times cover the operation inside its process (start-up and imports excluded); "
    "restic and rclone times include their start-up",
    "the TLS copy is memory to memory, in this process; restic backs up into a new local "
    "repository each run, rclone copies to a local crypt remote; the 4 KiB files are "
    "stored, then fetched, through one Client session (peaks and CPU cover both); ls lists "
    "those, the large files and tiny files stored to make up the count",
    "MiB: peak RSS (VmHWM) of the process; CPU: its user + system seconds",
    "before each large-file fetch, restic restore and rclone copy back, what the tool "
    "stored is synced and dropped from the page cache (POSIX_FADV_DONTNEED), so each reads "
    "it from disk as a restore from backup does"
    + ("" if CAN_EVICT else " (not on this system: the data stays cached)"),
]


@dataclass(frozen=True)
class Options:
    size: int
    runs: int
    small_files: int
    ls_names: int
    references: bool
    quick: bool
    #: Ordinary files scanned to count false positives.
    fp_files: int = 3000


def say(message: str) -> None:
    print(message, flush=True)


def run_suite(options: Options) -> dict[str, Any]:
    """Run every benchmark; return the results as a JSON-ready dict."""
    if options.references:
        tools = find_tools(install=True)
    else:
        tools = Tools(notes=["restic and rclone left out (--skip-reference)"])
    with tempfile.TemporaryDirectory(prefix="splitstore-bench-", ignore_cleanup_errors=True) as tmp:
        return _Suite(options, Path(tmp), tools).run()


class _Suite:
    def __init__(self, options: Options, work: Path, tools: Tools) -> None:
        self.o, self.work, self.tools = options, work, tools
        self.runner = ClientRunner(work)
        self.ops: dict[str, dict[str, Any]] = {}
        self.notes = [*NOTES, *tools.notes]
        self.phases: dict[str, float] = {}
        self.tls = ""
        self.fp: dict[str, Any] = {}
        self.budget: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
        mib = f"{self.o.size / MIB:g} MiB"
        with self._phase("test file", f"writing {mib} of random bytes in {self.work}"):
            big = make_file(self.work / "big.bin", self.o.size)
        with contextlib.ExitStack() as stack:
            setups = {
                mode: stack.enter_context(ServerProcess(self.work / f"setup-{mode}", encryption=e))
                for mode, e in {"encrypted": ENCRYPTION_ON, "plain": "none"}.items()
            }
            self._large_file(setups, big, mib)
            encrypted = setups["encrypted"]
            with self._phase("scan", f"scan {mib} with the built-in engines"):
                self._scan_speed(encrypted, big)
            with self._phase("cpu budget", "each step of a store and fetch alone, on one core"):
                amount = min(self.o.size, BUDGET_BYTES)
                self.budget = cpu_budget(encrypted.paths, big, self.work, amount)
            n = self.o.small_files
            with self._phase("small files", f"store, then fetch, {n} files of 4 KiB"):
                self._small_files(encrypted)
            # The listing reuses what is stored already: the large files (encrypted and
            # scanned) and the small ones.
            stored = 2 + 2 * self.o.runs * self.o.small_files
            more = max(0, self.o.ls_names - stored)
            with self._phase("ls fill", f"store {more} more names, {FILL_CONCURRENCY} at a time"):
                self._fill(encrypted, more)
            with self._phase("ls", f"ls of {stored + more} names"):
                self._listing(encrypted, stored + more)
            for servers in setups.values():
                self._check_peak(servers)
        n = self.o.fp_files
        with self._phase("false positives", f"scan {n} ordinary files at the default policy"):
            self.fp = false_positives(n)
            say(f"  {len(self.fp['flagged'])} of {self.fp['files']} files not clean")
        meta = self._meta(started, time.perf_counter() - clock)
        return {
            "meta": meta,
            "operations": self.ops,
            "ratios": ratios(self.ops),
            "targets": targets(self.ops),
            "cpu_budget": with_measured(self.budget, self.ops, self.o.size),
            "false_positives": self.fp,
            "notes": self.notes,
        }

    @contextlib.contextmanager
    def _phase(self, key: str, message: str) -> Iterator[None]:
        say(f"benchmarks: {message}")
        with self._timed(key):
            yield

    @contextlib.contextmanager
    def _timed(self, key: str) -> Iterator[None]:
        """Add the time taken to ``key``'s (a phase's rounds are timed one by one)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[key] = self.phases.get(key, 0.0) + time.perf_counter() - start

    # -- phases --------------------------------------------------------------------------

    def _large_file(self, setups: dict[str, ServerProcess], big: Path, mib: str) -> None:
        """Rounds of runs: each round stores and fetches with every setup, then runs the
        loopback TLS copy, restic and rclone once each, so that a machine whose speed
        drifts (this one's does, over minutes) tilts the ratios between them less than
        if each ran as a phase of its own. The setups take turns at going first, and
        each step starts with the disk idle (``os.sync``): a tool's freed or dirty
        pages are not left for the next step's writes to wait on."""
        references = self._start_references()
        beside = ", ".join(["the loopback TLS copy", *references])
        say(f"benchmarks: store and fetch {mib} with each setup, then {beside}, in rounds")
        amount = self.o.size / MB
        runs: dict[str, list[Run]] = {}
        # "scanned": the encrypted setup with scanning on, as a default setup is.
        modes = [*setups.items(), ("scanned", setups["encrypted"])]
        for i in range(self.o.runs):
            done = f"  run {i + 1}/{self.o.runs}"
            turn = i % len(modes)
            for mode, servers in modes[turn:] + modes[:turn]:
                os.sync()
                with self._timed("large file"):
                    self._store_and_fetch(servers, mode, big, runs)
                up, down = (amount / runs[f"{op}_{mode}"][-1].seconds for op in ("store", "fetch"))
                say(f"{done}, {mode}: store {up:.0f} MB/s, fetch {down:.0f} MB/s")
            with self._timed("tls copy"):
                runs.setdefault("tls_copy", []).append(self._tls_copy(setups["encrypted"].paths))
                say(f"{done}, loopback TLS copy: {amount / runs['tls_copy'][-1].seconds:.0f} MB/s")
            for name, tool in list(references.items()):
                os.sync()
                with self._timed(name):
                    if not self._reference_round(name, tool, big, i, runs):
                        del references[name]
        for key, key_runs in runs.items():
            self.ops[key] = summarise(LARGE_FILE_LABELS[key], key_runs, amount, "MB/s")

    def _store_and_fetch(
        self, servers: ServerProcess, mode: str, big: Path, runs: dict[str, list[Run]]
    ) -> None:
        """One store and one fetch of ``big`` in the setup ``mode``, into ``runs``."""
        dest = self.work / "fetched.bin"
        config = servers.scan_config if mode == "scanned" else None
        # A name per setup: the scanned runs share the encrypted setup's servers, and with
        # one name they would drop each other's versions (freed in the background, under a
        # later fetch) at other rounds than the plain setup does.
        name = f"bench/big-{mode}.bin"
        for op, args in (("store", (big, name)), ("fetch", (name, dest))):
            if op == "fetch":  # from disk, as restic's restore and rclone's copy back
                evict(servers.paths.https_data, servers.paths.tcp_data)
            run = self.runner.run(servers, op, *args, config=config)
            runs.setdefault(f"{op}_{mode}", []).append(run)
        if dest.stat().st_size != self.o.size:
            raise RuntimeError(f"the fetched file has {dest.stat().st_size} bytes")
        dest.unlink()

    def _scan_speed(self, servers: ServerProcess, big: Path) -> None:
        runs = [self.runner.run(servers, "scan", big) for _ in range(self.o.runs)]
        for i, run in enumerate(runs):
            rate = self.o.size / MB / run.extra["scan_seconds"]
            say(f"  run {i + 1}/{self.o.runs}: {rate:.0f} MB/s, {run.extra['verdict']}")
        seconds = [r.extra["scan_seconds"] for r in runs]
        label = "scan, built-in engines"
        self.ops["scan"] = summarise(label, runs, self.o.size / MB, "MB/s", seconds=seconds)

    def _tls_copy(self, paths: SetupPaths) -> Run:
        cpu = _own_cpu()
        copy = tls_copy(paths, self.o.size)
        self.tls = f"{copy.version} {copy.cipher}"
        return Run(copy.seconds, None, _own_cpu() - cpu)

    def _small_files(self, servers: ServerProcess) -> None:
        """1,000 files of 4 KiB through one session: in batches, and one after another."""
        n = self.o.small_files
        source = make_small_files(self.work / "small", n, SMALL_FILE_BYTES)
        dest = self.work / "small-fetched"
        runs: dict[str, list[Run]] = {"many": [], "one": []}
        for i in range(self.o.runs):
            # Alternating, so that a machine that slows down midway tilts neither.
            for mode in ("many", "one"):
                dest.mkdir()
                run = self.runner.run(servers, "small", source, dest, f"small-{mode}/{i}", mode)
                runs[mode].append(run)
                shutil.rmtree(dest)
                up, down = (n / run.extra[f"{op}_seconds"] for op in ("store", "fetch"))
                say(
                    f"  run {i + 1}/{self.o.runs}, {SMALL_MODES[mode]}: store {up:.0f} "
                    f"files/s, fetch {down:.0f} files/s"
                )
        for mode, suffix in (("many", ""), ("one", "_one")):
            for op in ("store", "fetch"):
                seconds = [r.extra[f"{op}_seconds"] for r in runs[mode]]
                label = f"{op} {n} x 4 KiB, {SMALL_MODES[mode]}"
                self.ops[f"small_{op}{suffix}"] = summarise(
                    label, runs[mode], n, "files/s", seconds=seconds
                )

    def _fill(self, servers: ServerProcess, n: int) -> None:
        if n == 0:
            return
        source = make_file(self.work / "listed.bin", LISTED_FILE_BYTES)
        fill = self.runner.run(servers, "fill", source, str(n), "names")
        say(f"  {n / fill.seconds:.0f} files/s")
        label = f"store {n} names, {FILL_CONCURRENCY} at once"
        self.ops["ls_fill"] = summarise(label, [fill], n, "files/s")

    def _listing(self, servers: ServerProcess, n: int) -> None:
        runs = []
        for i in range(self.o.runs):
            runs.append(self.runner.run(servers, "ls"))
            if runs[-1].extra["names"] != n:
                raise RuntimeError(f"ls listed {runs[-1].extra['names']} names, not {n}")
            say(f"  run {i + 1}/{self.o.runs}: {runs[-1].seconds:.2f} s")
        self.ops["ls"] = summarise(f"ls of {n} names", runs, n, "names/s")
        # What a user waits for: the command, its start-up and printing included.
        command = [sys.executable, "-m", "splitstore", "ls", "--config", str(servers.config)]
        runs = []
        for i in range(self.o.runs):
            servers.mark()
            done = run_measured(command, log=self.work / "ls-command.log")
            peak, cpu = servers.usage()
            runs.append(Run(done.seconds, done.peak_bytes or None, done.cpu_seconds, peak, cpu))
            say(f"  run {i + 1}/{self.o.runs}, the splitstore ls command: {done.seconds:.2f} s")
        label = f"splitstore ls of {n} names (start-up included)"
        self.ops["ls_command"] = summarise(label, runs, n, "names/s")

    def _start_references(self) -> dict[str, Restic | Rclone]:
        """restic's and rclone's runners, for those found and ready to run."""
        started: dict[str, Restic | Rclone] = {}
        for name, exe in self.tools.paths.items():
            if exe is None:
                continue
            try:
                started[name] = (Restic if name == "restic" else Rclone)(exe, self.work / name)
            except (OSError, subprocess.CalledProcessError) as exc:
                self._reference_failed(name, exc)
        return started

    def _reference_round(
        self, name: str, tool: Restic | Rclone, big: Path, i: int, runs: dict[str, list[Run]]
    ) -> bool:
        """Round ``i`` of ``name`` into ``runs``; False if it failed, and then the runs
        of its earlier rounds are taken out too (its comparison is left out)."""
        (up_key, up_label), (down_key, down_label) = REFERENCE_KEYS[name]
        try:
            up, down = tool.run(big, i)
        except (ToolFailed, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            self._reference_failed(f"{name} (round {i + 1})", exc)
            runs.pop(up_key, None)
            runs.pop(down_key, None)
            return False
        runs.setdefault(up_key, []).append(Run.of_tool(up))
        runs.setdefault(down_key, []).append(Run.of_tool(down))
        amount = self.o.size / MB
        rates = f"{amount / up.seconds:.0f} MB/s, {amount / down.seconds:.0f} MB/s"
        say(f"  run {i + 1}/{self.o.runs}, {up_label} and {down_label}: {rates}")
        return True

    def _reference_failed(self, name: str, exc: Exception) -> None:
        self.notes.append(f"{name} failed, so its comparison is left out: {exc}")
        say(f"  {name} failed: {exc}")

    # -- the rest ------------------------------------------------------------------------

    def _check_peak(self, servers: ServerProcess) -> None:
        note = "the servers' peak memory could not be reset per operation: it is the peak so far"
        if not servers.peak_resettable and note not in self.notes:
            self.notes.append(note)

    def _meta(self, started: dt.datetime, seconds: float) -> dict[str, Any]:
        return {
            "started": started.isoformat(timespec="seconds"),
            "seconds": seconds,
            "quick": self.o.quick,
            "runs": self.o.runs,
            "size_bytes": self.o.size,
            "small_files": self.o.small_files,
            "small_file_bytes": SMALL_FILE_BYTES,
            "ls_names": self.o.ls_names,
            "cpus": os.cpu_count(),
            "memory_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MIB,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "splitstore": __version__,
            "commit": _commit(),
            "tls": self.tls,
            "tools": self.tools.versions,
            "phase_seconds": self.phases,
        }


def _commit() -> str | None:
    """The checkout's commit, with "+changes" if src/ differs from it; None without git."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return head + ("+changes" if git("status", "--porcelain", "--", "src") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The operations each tool's two steps are reported as: (key, label).
REFERENCE_KEYS = {
    "restic": (("restic_backup", "restic backup"), ("restic_restore", "restic restore")),
    "rclone": (
        ("rclone_copy_to", "rclone copy to crypt"),
        ("rclone_copy_back", "rclone copy back"),
    ),
}

# What each large-file operation is called in the report, by its key.
LARGE_FILE_LABELS = {
    "tls_copy": "loopback TLS copy",
    **{
        f"{op}_{mode}": f"{op}, {what}"
        for op in ("store", "fetch")
        for mode, what in (
            ("encrypted", "encrypted"),
            ("plain", "not encrypted"),
            ("scanned", "encrypted, scanned"),
        )
    },
    **dict(pair for pairs in REFERENCE_KEYS.values() for pair in pairs),
}

# (name, numerator, denominator, target): the targets, shown for information.
RATIOS: list[tuple[str, str, str, float | None]] = [
    ("store: encryption on / off", "store_encrypted", "store_plain", 0.8),
    ("fetch: encryption on / off", "fetch_encrypted", "fetch_plain", 0.8),
    ("store / loopback TLS copy", "store_encrypted", "tls_copy", 0.5),
    ("fetch / loopback TLS copy", "fetch_encrypted", "tls_copy", None),
    ("store / restic backup", "store_encrypted", "restic_backup", 3.0),
    ("store / rclone copy to crypt", "store_encrypted", "rclone_copy_to", None),
    ("fetch / rclone copy back", "fetch_encrypted", "rclone_copy_back", 1.0),
    ("fetch / restic restore", "fetch_encrypted", "restic_restore", 1.5),
    ("store: scanning on / off", "store_scanned", "store_encrypted", None),
    ("fetch: scanning on / off", "fetch_scanned", "fetch_encrypted", None),
]


def ratios(ops: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of median rates (encrypted splitstore against the others), with targets,
    and the ratio within each round (``rounds``: the runs of both were made side by side,
    so a host whose speed drifts moves these less)."""
    out = []
    for name, top, bottom, target in RATIOS:
        value = None
        rounds: list[float] = []
        if top in ops and bottom in ops:
            value = ops[top]["rate"]["median"] / ops[bottom]["rate"]["median"]
            rounds = _round_ratios(ops[top], ops[bottom])
        meets = None if value is None or target is None else value >= target
        out.append(
            {
                "name": name,
                "of": [top, bottom],
                "value": value,
                "rounds": rounds,
                "target": target,
                "meets": meets,
            }
        )
    return out


def _round_ratios(top: dict[str, Any], bottom: dict[str, Any]) -> list[float]:
    """``top``'s rate over ``bottom``'s, run by run: the runs of one round each. (From
    each run's own time: no operation in RATIOS has its times overridden in
    ``summarise``.)"""
    if len(top["runs"]) != len(bottom["runs"]):
        raise ValueError(f"{top['label']} and {bottom['label']} ran a different number of rounds")
    return [
        (top["amount"] / t["seconds"]) / (bottom["amount"] / b["seconds"])
        for t, b in zip(top["runs"], bottom["runs"], strict=True)
    ]


# (name, operation, figure, target, "min" or "max"): the targets in absolute terms.
LIMITS: list[tuple[str, str, str, float, str]] = [
    ("4 KiB files stored, files/s", "small_store", "rate", 300, "min"),
    ("4 KiB files fetched, files/s", "small_fetch", "rate", 300, "min"),
    ("ls through the API, seconds", "ls", "seconds", 2.0, "max"),
    ("the splitstore ls command, seconds", "ls_command", "seconds", 2.0, "max"),
    ("client peak MiB, store", "store_encrypted", "client_peak_mib", 150, "max"),
    ("client peak MiB, fetch", "fetch_encrypted", "client_peak_mib", 150, "max"),
    # The larger of the two server processes' peaks: the target is per server.
    ("each server's peak MiB, store", "store_encrypted", "server_peak_mib", 100, "max"),
    ("each server's peak MiB, fetch", "fetch_encrypted", "server_peak_mib", 100, "max"),
]


def targets(ops: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The absolute targets: rates and times by their median, peaks by their largest."""
    out = []
    for name, key, figure, target, kind in LIMITS:
        value = None
        if key in ops:
            found = ops[key][figure]
            value = found["median"] if isinstance(found, dict) else found
        meets = None
        if value is not None:
            meets = value >= target if kind == "min" else value < target
        out.append(
            {
                "name": name,
                "of": key,
                "value": value,
                "target": target,
                "kind": kind,
                "meets": meets,
            }
        )
    return out


def with_measured(
    budget: dict[str, Any], ops: dict[str, dict[str, Any]], size: int
) -> dict[str, Any]:
    """The budget, with what the encrypted runs used per GiB and the ceiling it implies:
    the rate if only the essential steps ran, spread perfectly over every core."""
    if not budget:
        return budget
    cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    out = {**budget, "cores": cores}
    for op in ("store", "fetch"):
        entry = dict(budget[op])
        run = ops.get(f"{op}_encrypted")
        if run is not None:
            used = run["client_cpu_seconds"] + (run["server_cpu_seconds"] or 0.0)
            entry["measured_cpu_seconds_per_gib"] = used * 2**30 / size
        entry["ceiling_mb_s"] = cores * 2**30 / entry["cpu_seconds_per_gib"] / MB
        out[op] = entry
    return out
