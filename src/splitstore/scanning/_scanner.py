"""The scanner: runs every engine over a file in one streamed read and applies the policy.

``scan_path`` reads a local file once, in blocks, handing each block to every engine's
session; ``stream`` gives the same to a caller that already has the bytes passing by (a
fetch writing the reassembled file), so the file is not read a second time. Archive
members are scanned by the same content engines, one level deeper each time, through the
archive engine's ``scan_member`` callback; clamd is only given the outer file (it unpacks
archives itself).

An engine that fails, whatever the reason, is reported as ``not-scanned`` for that file:
a broken engine never makes a file look clean.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._digest import Hasher, from_sha256_hex
from .._errors import LocalFileError
from .._localfile import open_regular_file
from .._threads import shared_pool, wait_through
from ._engine import Engine, EngineSession, Finding
from ._policy import Policy
from ._report import Reason, ScanReport

__all__ = ["BLOCK_SIZE", "ScanSettings", "ScanStream", "Scanner"]

BLOCK_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class ScanSettings:
    """The ``[scan]`` section of the config."""

    enabled: bool = True
    #: Files of SHA-256 lines of known-bad files, added to the shipped list.
    hash_lists: tuple[Path, ...] = ()
    #: YARA rule files, added to the shipped rules.
    yara_rules: tuple[Path, ...] = ()
    #: clamd's address, "unix:/path/to/socket" or "tcp:HOST:PORT"; no ClamAV when None.
    clamd: str | None = None
    clamd_timeout: float = 30.0
    policy: Policy = field(default_factory=Policy)


class Scanner:
    """The engines a setup uses, built once (rules compiled once) and reused per file."""

    def __init__(
        self,
        settings: ScanSettings | None = None,
        *,
        engines: Sequence[Engine] | None = None,
        member_engines: Sequence[Engine] | None = None,
    ) -> None:
        self.settings = settings or ScanSettings()
        self.policy = self.settings.policy
        self._archives: dict[int, Engine] = {}
        self._lock = threading.Lock()
        self._described: dict[str, dict[str, str]] | None = None
        if engines is None:
            content, whole_file = self._default_engines()
        else:
            content, whole_file = list(engines), []
        #: Engines that see every file and every archive member.
        self._content = content if member_engines is None else list(member_engines)
        self._engines: list[Engine] = [*content, self._archive_engine(0), *whole_file]

    def _default_engines(self) -> tuple[list[Engine], list[Engine]]:
        # Imported here: yara and libmagic load only when something is scanned.
        from ._filetype import FileTypeEngine
        from ._signatures import SignatureEngine
        from ._yara import YaraEngine

        s = self.settings
        content: list[Engine] = [
            SignatureEngine(s.hash_lists),
            YaraEngine(s.yara_rules),
            FileTypeEngine(s.policy.blocked_types),
        ]
        whole_file: list[Engine] = []
        if s.clamd is not None:
            from ._clamd import ClamdEngine

            whole_file.append(ClamdEngine(s.clamd, timeout=s.clamd_timeout))
        return content, whole_file

    def _archive_engine(self, depth: int) -> Engine:
        with self._lock:
            engine = self._archives.get(depth)
            if engine is None:
                from ._archives import ArchiveEngine

                engine = ArchiveEngine(scan_member=self._scan_member, depth=depth)
                self._archives[depth] = engine
            return engine

    def describe(self) -> dict[str, dict[str, str]]:
        """Each engine's name, version and rules, as recorded with every report."""
        if self._described is None:
            described = {}
            for engine in self._engines:
                try:
                    described[engine.name] = dict(engine.describe())
                except Exception as exc:
                    described[engine.name] = {"version": f"unknown ({exc})"}
            self._described = described
        return self._described

    def stream(self, name: str, size: int | None = None) -> ScanStream:
        """Start a scan of ``name`` whose bytes the caller will feed in order."""
        return ScanStream(self, name, size, self._engines)

    def scan_path(self, path: str | os.PathLike[str], name: str | None = None) -> ScanReport:
        """Scan a local file (``name``, default its base name, decides extension checks)."""
        source = Path(path)
        with open_regular_file(source) as f:
            return self.scan_open_file(f, source, name or source.name)

    def scan_open_file(
        self, f: io.BufferedIOBase, path: Path, name: str, *, also: Hasher | None = None
    ) -> ScanReport:
        """Scan an open file from where it is to its end; ``path`` is where it lies (for
        the engines that need random access), ``name`` decides extension checks. ``also``
        is updated with every byte read (``ScanStream.also_hash``)."""
        try:
            size: int | None = os.fstat(f.fileno()).st_size
        except (OSError, io.UnsupportedOperation):
            size = None
        stream = self.stream(name, size)
        if also is not None:
            stream.also_hash(also)
        try:
            stream.feed_file(f)
        except OSError as exc:
            raise LocalFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return stream.finish(path)

    def _scan_member(self, member: str, path: Path, depth: int) -> list[Finding]:
        """What the content engines find in one extracted archive member."""
        engines = [*self._content, self._archive_engine(depth)]
        stream = ScanStream(self, member.rsplit("/", 1)[-1], None, engines)
        try:
            with path.open("rb") as f:
                stream.feed_file(f)
        except OSError as exc:
            return [Finding("archive", "not-scanned", "member-unreadable", str(exc), member=member)]
        return stream.findings(path)


class _FileDigest:
    """The file's SHA-256 for one scan: hashed from what is fed, unless vouched for."""

    def __init__(self) -> None:
        self._hasher: Hasher = hashlib.sha256()
        self._vouched: str | None = None

    @property
    def vouched(self) -> bool:
        return self._vouched is not None

    def vouch(self, hexdigest: str) -> None:
        self._vouched = hexdigest

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        if self._vouched is None:
            self._hasher.update(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest() if self._vouched is None else self._vouched


class ScanStream:
    """One file's scan in progress: ``feed`` its bytes in order, then ``finish``."""

    def __init__(
        self, scanner: Scanner, name: str, size: int | None, engines: Sequence[Engine]
    ) -> None:
        self._scanner = scanner
        self.name = name
        self._started = time.monotonic()
        self._fed = 0
        self._sha256 = _FileDigest()
        self._also: Hasher | None = None
        self._failed: list[Finding] = []
        self._sessions: list[tuple[str, EngineSession]] = []
        for engine in engines:
            try:
                session = engine.session(name, size)
                share = getattr(session, "share_sha256", None)
                if share is not None:
                    # It needs the file's SHA-256 too: one hash of the file, not two.
                    share(self._sha256)
                self._sessions.append((engine.name, session))
            except Exception as exc:
                self._fail(engine.name, exc)

    def vouch_sha256(self, hexdigest: str) -> None:
        """Take ``hexdigest`` as the file's SHA-256 instead of hashing what is fed.

        For a caller that has the file's digest from a source it trusts and checks the
        bytes against it some other way: a fetch takes the one in the manifest (sealed by
        the storing client when encrypted, every segment's tag checked; compared with
        the sink's own hash when not). Hashing the file again here would cost a scanned
        fetch about a sixth of its client's CPU and prove nothing more. The report and
        the known-bad lists then use this digest. Before the first ``feed`` only.
        """
        if self._fed:
            raise RuntimeError("vouch for the digest before feeding the file")
        if from_sha256_hex(hexdigest) is None:
            raise ValueError("a SHA-256 is 64 lowercase hex digits")
        self._sha256.vouch(hexdigest)

    def also_hash(self, hasher: Hasher) -> None:
        """Update ``hasher`` with every byte fed too, in order: a caller that reads the
        file again later can tell whether it read the bytes scanned. Before the first
        ``feed`` only."""
        if self._fed:
            raise RuntimeError("ask for another hash before feeding the file")
        self._also = hasher

    def feed(self, block: bytes | bytearray | memoryview) -> None:
        view = memoryview(block)
        if not view:
            return
        self._sha256.update(view)
        self._feed_engines(view)

    def feed_file(self, f: io.BufferedIOBase) -> None:
        """Feed what ``f`` holds from where it is to its end.

        The file's SHA-256 is the largest step of a scan (three fifths of its CPU on a
        large file, at about 1.6 GB/s) and one stream that cannot be split, so the
        engines read each block in a thread of their own while this one hashes it. (This
        way round, not the other: hashing lets go of the GIL at once, while the engines
        hold it for most of their work, so a hash waiting to start in another thread
        would wait for them.) A large file is scanned at about 1.1 GiB/s instead of 0.9
        (its hash alone runs at about 1.6 GB/s).
        """
        buffers = [memoryview(bytearray(BLOCK_SIZE))]
        turn = 0
        engines: concurrent.futures.Future[None] | None = None
        try:
            while n := f.readinto(buffers[turn]):
                view = buffers[turn][:n]
                if engines is not None:
                    engines.result()
                    engines = None
                threaded = n >= _ENGINES_IN_THREAD_MIN and not self._sha256.vouched
                if threaded:
                    engines = _engine_thread().submit(self._feed_engines, view)
                    if len(buffers) == 1:  # the next block is read while this one is scanned
                        buffers.append(memoryview(bytearray(BLOCK_SIZE)))
                self._sha256.update(view)
                if not threaded:
                    self._feed_engines(view)
                turn = (turn + 1) % len(buffers)
            if engines is not None:
                engines.result()
                engines = None
        finally:
            if engines is not None:  # an error on the way: the engines are done with it first
                wait_through(engines)

    def _feed_engines(self, view: memoryview) -> None:
        self._fed += len(view)
        if self._also is not None:
            self._also.update(view)
        for pair in list(self._sessions):
            try:
                pair[1].feed(view)
            except Exception as exc:
                self._sessions.remove(pair)
                self._fail(pair[0], exc)

    def reads_file(self) -> bool:
        """Whether ``finish`` may read the file on disk again (an archive's members), from
        what was fed so far; True while some engine cannot tell yet."""
        return any(_reads_file(session) for _, session in self._sessions)

    def findings(self, path: Path | None) -> list[Finding]:
        found = list(self._failed)
        for engine, session in self._sessions:
            try:
                found.extend(session.finish(path))
            except Exception as exc:
                self._fail(engine, exc)
                found.append(self._failed[-1])
        self._sessions = []
        return found

    def finish(self, path: Path | None) -> ScanReport:
        """The report for the whole file; ``path`` is the complete file on disk, if any."""
        policy = self._scanner.policy
        reasons = [Reason(f, policy.action(f)) for f in self.findings(path)]
        return ScanReport.build(
            self.name,
            reasons,
            self._scanner.describe(),
            self._fed,
            self._sha256.hexdigest(),
            time.monotonic() - self._started,
            time.time(),
        )

    def _fail(self, engine: str, exc: BaseException) -> None:
        # An engine's own failure (a bug, a library error): the file was not scanned by it.
        self._failed.append(
            Finding(engine, "not-scanned", "engine-error", f"{type(exc).__name__}: {exc}")
        )


def _reads_file(session: EngineSession) -> bool:
    reads = getattr(session, "reads_file", None)  # optional (_engine.py)
    try:
        return reads is not None and bool(reads())
    except Exception:  # an engine's bug: assume it reads (the file stays cached)
        return True


# Blocks at least this large go to the engines' threads (below that, a hop costs more than
# it saves). The threads are shared by every scan; each scan hands on a block only once its
# engines are done with the one before, so two threads let two large files be scanned at
# once, and each file's engines see its blocks in order. No engine may scan (an archive's
# members, through ``feed_file``) from its ``feed``, which runs on these threads: only from
# ``finish``, on the caller's thread. Waiting on the pool from inside it could deadlock.
_ENGINES_IN_THREAD_MIN = 256 * 1024
_engine_thread = shared_pool(2, "splitstore-scan")
