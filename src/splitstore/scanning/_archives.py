"""The archive engine: checks zip, tar, gzip, bzip2, xz and 7z files, and hands their
members to the content engines, one level deeper each time.

The kind of archive is told from the first bytes fed, whatever the file is called; a file
that is not an archive costs nothing beyond keeping its first 512 bytes. Archives are read
from the complete file on disk in ``finish`` (a zip's central directory is at its end), so
a file that was only streamed (``finish(None)``) is reported ``not-scanned``.

What is checked, from metadata first, without extracting anything:

* bombs: an entry or an archive that declares more than ``max_ratio`` times its packed
  size ("declared-ratio"), zip entries whose data overlaps another's, as in David Fifield's
  non-recursive zip bomb ("overlapping-entries");
* member names that are absolute, carry a drive letter, or climb out with ``..`` (with
  ``/`` or ``\\`` as separator): "archive-path";
* links that reach out of the archive: a symbolic or hard link whose target is absolute
  or climbs above the archive's root, a member stored under a link (the two-step
  link-then-write trick), and any 7z symbolic link (py7zr does not give its target):
  "archive-link". Links between members, common in real tarballs (time-zone data, shared
  libraries), are not reported;
* encrypted members or 7z headers, which cannot be scanned: "archive-encrypted";
* archives that cannot be read to the end (truncated, bad headers, CRC errors, sizes that
  do not match): "archive-malformed".

Members are then decompressed in bounded steps, counting the bytes really produced (header
sizes are never trusted), into a temporary file in a private directory, handed to
``scan_member`` and deleted right away. Decompression is stopped at the per-member and
per-scan byte limits and at the time limit; what was stopped there is "not-scanned", or an
"archive-bomb" ("measured-ratio") when it had already expanded beyond ``max_ratio``. A
gzip, bzip2 or xz file is one member, its decompressed content, which recurses like any
member; but when that content is a tar, the tar is read as it decompresses (tarfile's
stream mode), so that a tarball larger than one member may be is still scanned member
by member; it takes a depth level of its own all the same. An archive found at
``max_depth`` is reported ("archive-nesting") and not opened.

The limits of one top-level scan (bytes, members, time) are shared by the archives nested
in it: the outermost archive session puts its budget in a context variable that the
sessions of nested archives, run inside its ``scan_member`` calls, pick up.

7z archives are read with py7zr: the (possibly compressed) header is sized before py7zr
decodes it, members are extracted through py7zr's writer-factory API, which streams each
member to our bounded writer in 1 MiB steps (py7zr's step size is set for that, see
``_bound_py7zr_steps``); memory is then flat but for the LZMA dictionary the file
declares, which fills as far as the output goes: blocks (and headers) that declare more
than 128 MiB are not decoded ("not-scanned"). Members that follow an over-limit member
in the same solid block are not extracted (py7zr would have to decode the big one to
reach them). Names py7zr refuses to extract (absolute, ``..``) are reported and their
content is not scanned.

Old v7 tar files (without the "ustar" magic) are not recognised.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import dataclasses
import io
import lzma
import os
import re
import stat
import struct
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from ._engine import Finding, Head

__all__ = ["ArchiveEngine", "ArchiveLimits", "MemberScan"]

#: ``scan_member(display_path, extracted_file, depth)``: what every engine finds in one
#: extracted member, ``depth`` being the member's own depth (the archive's plus one).
MemberScan = Callable[[str, Path, int], list[Finding]]

_KiB = 1024
_MiB = 1024 * _KiB
_HEAD = 512  # bytes kept from the stream: enough for every magic (tar's is at 257)
_OUT_STEP = 1 * _MiB  # decompressed bytes produced per step
_IN_STEP = 64 * _KiB  # compressed bytes read per step: keeps the measured ratio honest
_ENGINE = "archive"


@dataclass(frozen=True)
class ArchiveLimits:
    """How much work one scan may do. When a limit is hit, what was not read is reported
    ``not-scanned``: a limit never makes a file look clean."""

    #: An archive at this depth is not opened ("archive-nesting"); the scanned file is
    #: depth 0, its members depth 1. A compressed tarball takes two levels (gzip, tar).
    max_depth: int = 5
    #: Archive entries looked at in one top-level scan, nested archives included.
    max_members: int = 10_000
    #: Decompressed bytes of one member; a larger member is not scanned.
    max_member_bytes: int = 64 * _MiB
    #: Decompressed bytes in one top-level scan, nested archives included.
    max_total_bytes: int = 512 * _MiB
    #: Expansion (unpacked / packed) beyond which an archive is a bomb...
    max_ratio: float = 100.0
    #: ...once it has expanded to at least this much (small files compress absurdly well).
    ratio_min_bytes: int = 8 * _MiB
    #: Wall-clock seconds for one top-level scan.
    max_seconds: float = 30.0
    #: Largest 7z header (decoded) or tar extended header (pax, GNU long name) read.
    max_header_bytes: int = 16 * _MiB
    #: Findings of one kind listed per archive; the rest are counted in one more finding.
    max_listed: int = 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"ArchiveLimits.{f.name} must not be negative")

    def summary(self) -> str:
        return (
            f"depth {self.max_depth}, {self.max_members} members, "
            f"{self.max_member_bytes // _MiB} MiB per member, "
            f"{self.max_total_bytes // _MiB} MiB in all, ratio {self.max_ratio:g}x over "
            f"{self.ratio_min_bytes // _MiB} MiB, {self.max_seconds:g} s"
        )


class ArchiveEngine:
    """Looks into archives; see the module docstring for what it checks."""

    name = _ENGINE

    def __init__(
        self,
        limits: ArchiveLimits = ArchiveLimits(),  # frozen: sharing is safe
        scan_member: MemberScan | None = None,
        depth: int = 0,
    ) -> None:
        self.limits = limits
        self.scan_member = scan_member
        self.depth = depth

    def describe(self) -> dict[str, str]:
        return {"version": "1", "limits": self.limits.summary()}

    def session(self, name: str, size: int | None) -> _ArchiveSession:
        return _ArchiveSession(self, name)


class _ArchiveSession:
    def __init__(self, engine: ArchiveEngine, name: str) -> None:
        self._engine = engine
        self._name = name
        self._head = Head(_HEAD)

    def feed(self, block: memoryview) -> None:
        self._head.take(block)

    def reads_file(self) -> bool:
        """Only an archive is read again, to open its members."""
        return len(self._head) < _HEAD or sniff(self._head.bytes()) is not None

    def finish(self, path: Path | None) -> list[Finding]:
        kind = sniff(self._head.bytes())
        if kind is None:
            return []
        engine = self._engine
        if engine.depth >= engine.limits.max_depth:
            detail = f"a {kind} archive nested {engine.depth} deep was not opened"
            return [Finding(_ENGINE, "archive-nesting", "too-deep", detail)]
        if path is None:
            detail = f"a {kind} archive can only be read from a file on disk"
            return [Finding(_ENGINE, "not-scanned", "streamed-only", detail)]
        with _shared_budget(engine.limits) as budget:
            scan = _Scan(engine, budget, self._name)
            return scan.run(kind, path)


def sniff(head: bytes) -> str | None:
    """The kind of archive these first bytes start, or None."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if (
        head.startswith(b"BZh")
        and head[3:4].isdigit()
        and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")  # a block, or the end of an empty one
    ):
        return "bzip2"
    if head[257:262] == b"ustar":
        return "tar"
    return None


# --- the budget of one top-level scan ------------------------------------------------


@dataclass
class _Budget:
    deadline: float
    seconds: float
    bytes_left: int
    members_left: int


_BUDGET: ContextVar[_Budget | None] = ContextVar("splitstore_archive_budget", default=None)


@contextlib.contextmanager
def _shared_budget(limits: ArchiveLimits) -> Iterator[_Budget]:
    """The budget of the top-level scan in progress, or a new one if this is it."""
    current = _BUDGET.get()
    if current is not None:
        yield current
        return
    budget = _Budget(
        time.monotonic() + limits.max_seconds,
        limits.max_seconds,
        limits.max_total_bytes,
        limits.max_members,
    )
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


class _Corrupt(Exception):
    """The archive's data cannot be read: an archive-malformed finding."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


class _Stop(Exception):
    """A limit of the whole scan was reached: the rest is not scanned."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule
        self.detail = detail


class _Full(Exception):
    """One member produced more than it may."""

    def __init__(self, whole_scan: bool) -> None:
        super().__init__("member over its byte limit")
        self.whole_scan = whole_scan


class _Done(Exception):
    """The archive is a bomb: nothing more needs to be read from it."""


# --- sources of member bytes -----------------------------------------------------------


class _Source(Protocol):
    @property
    def consumed(self) -> int:
        """Packed bytes read so far (for the measured expansion ratio)."""

    def __iter__(self) -> Iterator[bytes]: ...


class _Raw:
    """Stored bytes, read in steps from ``read``; ``expected`` bytes unless None."""

    def __init__(self, read: Callable[[int], bytes], expected: int | None) -> None:
        self._read = read
        self._expected = expected
        self.consumed = 0

    def read(self, n: int) -> bytes:
        if self._expected is not None:
            n = min(n, self._expected - self.consumed)
        if n <= 0:
            return b""
        try:
            data = self._read(n)
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise _Corrupt("truncated", f"member data cannot be read: {exc}") from exc
        self.consumed += len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read(_OUT_STEP):
            yield data
        if self._expected is not None and self.consumed < self._expected:
            raise _Corrupt("truncated", "member data ends before its declared size")


def _range_reader(f: BinaryIO, start: int) -> Callable[[int], bytes]:
    """Reads a file sequentially from ``start``, whoever else moves its position."""
    pos = start

    def read(n: int) -> bytes:
        nonlocal pos
        f.seek(pos)
        data = f.read(n)
        pos += len(data)
        return data

    return read


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...


class _Inflate:
    """The decompressed output of ``raw``, at most ``_OUT_STEP`` bytes at a time.

    ``restart`` is the magic of a next stream (gzip, bzip2 and xz files may hold several
    concatenated streams); ``end_at`` the declared output size of a stream that may lack an
    end marker (LZMA in zip)."""

    def __init__(
        self,
        raw: _Raw,
        new: Callable[[], _Decompressor],
        *,
        zlib_style: bool = False,
        restart: bytes | None = None,
        end_at: int | None = None,
    ) -> None:
        self._raw = raw
        self._new = new
        self._zlib = zlib_style
        self._restart = restart
        self._end_at = end_at

    @property
    def consumed(self) -> int:
        return self._raw.consumed

    def __iter__(self) -> Iterator[bytes]:
        dec = self._new()
        pending = b""
        produced = 0
        full = False  # the last step filled its output: more may be waiting inside
        idle = 0  # steps in a row that neither took input nor gave output
        while True:
            if dec.eof:
                nxt = self._next_stream(dec.unused_data)
                if nxt is None:
                    return
                dec, pending = self._new(), nxt
            elif not pending and not full and not self._has_input(dec):
                pending = self._raw.read(_IN_STEP)
                if not pending:
                    if self._end_at is not None and produced == self._end_at:
                        return
                    raise _Corrupt("truncated", "compressed data ends before its end marker")
            out = self._step(dec, pending)
            idle = 0 if (out or pending) else idle + 1
            if idle > 2:
                raise _Corrupt("corrupt", "the decompressor makes no progress")
            pending = b""
            full = len(out) >= _OUT_STEP
            produced += len(out)
            if out:
                yield out

    def _has_input(self, dec: _Decompressor) -> bool:
        if self._zlib:
            return bool(getattr(dec, "unconsumed_tail", b""))
        return not getattr(dec, "needs_input", True)

    def _step(self, dec: _Decompressor, data: bytes) -> bytes:
        try:
            if self._zlib:
                tail: bytes = getattr(dec, "unconsumed_tail", b"")
                return dec.decompress(tail + data, _OUT_STEP)
            return dec.decompress(data, _OUT_STEP)
        except lzma.LZMAError as exc:
            if "memory" in str(exc).lower():
                raise _Stop("memory-limit", f"decompressing needs too much memory: {exc}") from exc
            raise _Corrupt("corrupt", f"compressed data is corrupt: {exc}") from exc
        except (zlib.error, OSError, EOFError, ValueError) as exc:
            raise _Corrupt("corrupt", f"compressed data is corrupt: {exc}") from exc

    def _next_stream(self, rest: bytes) -> bytes | None:
        if self._restart is None:
            return None
        if len(rest) < _HEAD:
            rest += self._raw.read(_IN_STEP)
        if self._restart == _XZ_MAGIC:
            rest = rest.lstrip(b"\0")  # xz stream padding
        # Anything else after the last stream is ignored, as gzip(1) does: it is not part
        # of the content, and the outer file's bytes were scanned anyway.
        return rest if rest.startswith(self._restart) else None


_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
#: The largest LZMA dictionary a decoder may use: enough for "xz -9e" and 7-Zip's "ultra"
#: (64 MiB), not for a crafted 1.5 GiB (the dictionary fills as far as the output goes).
_MAX_DICTIONARY = 128 * _MiB
# 7-Zip's PPMd at its strongest (-mx=9) takes 192 MiB of model (older versions 256).
_MAX_PPMD_MODEL = 256 * _MiB
# Path components of link members kept to see whether a member lies under a link: ample
# for any real archive (a name of 4,096 bytes has at most 2,048), bounded for a crafted one.
_MAX_LINK_NODES = 200_000
_XZ_MEMLIMIT = _MAX_DICTIONARY + 8 * _MiB


# --- one scan of one archive -----------------------------------------------------------


class _Collector:
    """Findings in order, without duplicates, at most ``cap`` of each kind listed."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._found: list[Finding] = []
        self._seen: set[Finding] = set()
        self._counts: dict[tuple[str, str, str], int] = {}

    def add(self, finding: Finding) -> None:
        if finding in self._seen:
            return
        self._seen.add(finding)
        key = (finding.engine, finding.category, finding.rule)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._counts[key] <= self._cap:
            self._found.append(finding)

    def result(self) -> list[Finding]:
        found = list(self._found)
        for (engine, category, rule), count in self._counts.items():
            if count > self._cap:
                detail = f"{count - self._cap} more findings like this are not listed"
                found.append(Finding(engine, category, rule, detail))
        return found


@dataclass
class _Sink:
    """Where one member's bytes go while they are counted."""

    path: Path | None
    cap: int
    whole_scan_cap: bool
    size: int = 0
    crc: int = 0
    _file: BinaryIO | None = field(default=None, repr=False)

    def open(self) -> None:
        if self.path is not None:
            self._file = self.path.open("xb")

    def write(self, data: bytes | bytearray) -> None:
        if self.size + len(data) > self.cap:
            self.size += len(data)
            raise _Full(self.whole_scan_cap)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self._file is not None:
            self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _TempFiles:
    """A private directory (mode 0700, made on first use) for extracted members."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._serial = 0

    def new_path(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="splitstore-scan-")
        self._serial += 1
        return Path(self._dir.name) / f"member-{self._serial}"

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class _Scan:
    """One archive's scan: findings, limits, and the private directory for members."""

    def __init__(self, engine: ArchiveEngine, budget: _Budget, name: str) -> None:
        self.limits = engine.limits
        self.depth = engine.depth
        self.scan_member = engine.scan_member
        self.budget = budget
        self.name = name
        self.found = _Collector(self.limits.max_listed)
        self.expanded = 0
        self.links = _LinkTree()
        self.files = _TempFiles()
        #: Set in the view of an archive streamed inside this one (a tar in a gzip):
        #: that archive's display path, and its bytes are already counted as they stream.
        self.prefix: str | None = None
        self.counted = True

    def streamed(self, display: str) -> _Scan:
        """A view of this scan for the archive that is ``display``, read as it streams."""
        view = copy.copy(self)
        view.depth = self.depth + 1
        view.prefix = self.path_of(display)
        view.counted = False
        view.links = _LinkTree()
        return view

    def path_of(self, display: str) -> str:
        return display if self.prefix is None else f"{self.prefix}/{display}"

    # -- running and reporting

    def run(self, kind: str, path: Path) -> list[Finding]:
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                _WALKERS[kind](self, f, size)
                self._check_total(size)
        except _Corrupt as exc:
            self.add("archive-malformed", exc.rule, exc.detail)
        except _Stop as exc:
            self.add("not-scanned", exc.rule, exc.detail)
        except _Done:
            pass
        except OSError as exc:
            self.add("not-scanned", "unreadable", f"the archive cannot be read: {exc}")
        except Exception as exc:  # a decoder's own error on crafted data, say
            # Reported here, with what was found before it: an error escaping would take
            # every finding with it (one bad member must not hide another's malware).
            detail = f"the archive could not be read to its end: {type(exc).__name__}: {exc}"
            self.add("not-scanned", "engine-error", detail[:500])
        finally:
            self.files.cleanup()
        return self.found.result()

    def add(self, category: str, rule: str, detail: str, member: str | None = None) -> None:
        where = self.prefix if member is None else self.path_of(member)
        self.found.add(Finding(_ENGINE, category, rule, detail, member=where))

    def bomb(self, rule: str, detail: str, member: str | None = None) -> None:
        """Report a bomb and stop reading this archive."""
        self.add("archive-bomb", rule, detail, member)
        raise _Done

    def _check_total(self, size: int) -> None:
        lim = self.limits
        if self.expanded >= lim.ratio_min_bytes and self.expanded > lim.max_ratio * max(size, 1):
            self.bomb("measured-ratio", f"expands {self.expanded // max(size, 1)}x its size")

    # -- limits

    def check_time(self) -> None:
        if time.monotonic() > self.budget.deadline:
            detail = f"the {self.budget.seconds:g} s limit was reached; the rest was not scanned"
            raise _Stop("time-limit", detail)

    def count_member(self) -> bool:
        """Count one more entry against the scan's limit; False when over it."""
        if self.budget.members_left <= 0:
            detail = f"over {self.limits.max_members} members; the rest were not scanned"
            self.add("not-scanned", "member-limit", detail)
            return False
        self.budget.members_left -= 1
        return True

    def declared(self, display: str, unpacked: int, packed: int) -> None:
        """Bomb check on sizes an archive declares for one member."""
        lim = self.limits
        if unpacked >= lim.ratio_min_bytes and unpacked > lim.max_ratio * max(packed, 1):
            detail = f"declares {unpacked} bytes packed into {packed}"
            self.bomb("declared-ratio", detail, display)

    def check_name(self, name: str, display: str) -> None:
        problem = name_problem(name)
        if problem is not None:
            self.add("archive-path", problem[0], problem[1], display)
        link = self.links.under_link(_parts(name))
        if link is not None:
            detail = f"member is stored under the link {display_name(link)}"
            self.add("archive-link", "through-link", detail, display)

    def link(self, name: str, display: str, target: str | None, hard: bool) -> None:
        """A link member: reported when its target reaches out of the archive."""
        self.links.add(_parts(name))
        kind = "hard" if hard else "symbolic"
        if target is None:
            detail = f"member is a {kind} link to a target that cannot be read"
        else:
            problem = link_problem(name, target, hard)
            if problem is None:
                return
            detail = f"member is a {kind} link to {display_name(target)}, {problem}"
        self.add("archive-link", "hardlink" if hard else "symlink", detail, display)

    # -- members

    def take(
        self,
        display: str,
        source: _Source,
        *,
        declared: int | None = None,
        crc: int | None = None,
    ) -> None:
        """Read one member from ``source`` under the limits and scan it."""
        sink = self.sink(display, declared)
        if sink is None:
            return
        try:
            for chunk in source:
                sink.write(chunk)
                self.check_time()
        except _Corrupt as exc:
            # What could be read is scanned: a broken tail must not hide a payload.
            self.add("archive-malformed", exc.rule, exc.detail, display)
            self.done(display, sink, source.consumed)
            return
        except _Full as exc:
            sink.discard()
            self.over_limit(display, sink, source.consumed, exc.whole_scan)
            return
        except BaseException:
            sink.discard()
            raise
        if crc is not None and sink.crc != crc:
            self.add("archive-malformed", "crc-mismatch", "member data fails its CRC", display)
        if declared is not None and sink.size != declared:
            detail = f"member has {sink.size} bytes, not the {declared} declared"
            self.add("archive-malformed", "size-mismatch", detail, display)
        self.done(display, sink, source.consumed)

    def sink(self, display: str, declared: int | None) -> _Sink | None:
        """A new sink for a member, or None (reported) when it is not to be read."""
        self.check_time()
        lim = self.limits
        if declared is not None and declared > lim.max_member_bytes:
            self.too_large(display)
            return None
        if self.budget.bytes_left <= 0:
            self.total_limit()
        cap = lim.max_member_bytes
        if self.counted:
            cap = min(cap, self.budget.bytes_left)
        path = self.files.new_path() if self.scan_member is not None else None
        sink = _Sink(path, cap, cap < lim.max_member_bytes)
        sink.open()
        return sink

    def too_large(self, display: str) -> None:
        detail = f"member over the {self.limits.max_member_bytes // _MiB} MiB limit"
        self.add("not-scanned", "member-too-large", detail, display)

    def total_limit(self) -> None:
        detail = f"the {self.limits.max_total_bytes // _MiB} MiB limit was reached"
        raise _Stop("total-bytes-limit", detail + "; the rest was not scanned")

    def measured(self, display: str, produced: int, consumed: int | None, stopped: bool) -> None:
        """Bomb check on what a member really expanded to (``consumed`` None: unknown)."""
        lim = self.limits
        if consumed is None or produced < lim.ratio_min_bytes:
            return
        if produced > lim.max_ratio * max(consumed, 1):
            ratio = produced // max(consumed, 1)
            when = " before it was stopped" if stopped else ""
            self.bomb("measured-ratio", f"expanded {ratio}x{when}", display)

    def over_limit(self, display: str, sink: _Sink, consumed: int | None, whole_scan: bool) -> None:
        if self.counted:
            self.budget.bytes_left -= min(sink.size, sink.cap)
            self.expanded += sink.size
        self.measured(display, sink.size, consumed, stopped=True)
        if whole_scan:
            self.total_limit()
        self.too_large(display)

    def done(self, display: str, sink: _Sink, consumed: int | None) -> None:
        """A member was read to its end: check its expansion, then scan it."""
        sink.close()
        if self.counted:
            self.budget.bytes_left -= sink.size
            self.expanded += sink.size
        try:
            self.measured(display, sink.size, consumed, stopped=False)
            if self.scan_member is not None and sink.path is not None:
                where = self.path_of(display)
                for finding in self.scan_member(where, sink.path, self.depth + 1):
                    self.found.add(_relabel(finding, where))
        finally:
            sink.discard()


def _relabel(finding: Finding, display: str) -> Finding:
    """Put the member's path in front of where a nested scan says a finding is."""
    inner = finding.member
    # The scanner names a member it could not read with our own display path.
    member = display if inner is None or inner == display else f"{display}/{inner}"
    return dataclasses.replace(finding, member=member)


_DRIVE = re.compile(r"^[A-Za-z]:")


def name_problem(name: str) -> tuple[str, str] | None:
    """(rule, detail) when a member name would land outside the extraction directory."""
    if name.startswith(("/", "\\")):
        return "absolute-path", "member name is an absolute path"
    if _DRIVE.match(name):
        return "drive-letter", "member name starts with a drive letter"
    if ".." in re.split(r"[\\/]", name):
        return "parent-directory", "member name climbs out with '..'"
    return None


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]


def link_problem(name: str, target: str, hard: bool) -> str | None:
    """How a link's target reaches out of the archive, or None when it stays inside.

    A symbolic link's target is relative to the link's directory, a hard link's to the
    archive's root. This is lexical; chains of links are caught by "through-link"."""
    if target.startswith(("/", "\\")) or _DRIVE.match(target):
        return "an absolute path"
    where = [] if hard else _parts(name)[:-1]
    for part in _parts(target):
        if part != "..":
            where.append(part)
        elif not where:
            return "outside the archive"
        else:
            where.pop()
    return None


class _LinkTree:
    """The link members seen so far, as a tree of path components: at most
    ``_MAX_LINK_NODES`` of them (a node costs some 150 bytes, and a name can have
    millions of components), past which the scan stops."""

    _MARK = ""  # never a component

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}
        self._nodes = 0

    def add(self, parts: list[str]) -> None:
        node = self._root
        for part in parts:
            child = node.get(part)
            if child is None:
                self._nodes += 1
                if self._nodes > _MAX_LINK_NODES:
                    raise _Stop("too-many-links", "its links' names are too many or too deep")
                child = node[part] = {}
            node = child
        node[self._MARK] = {}

    def under_link(self, parts: list[str]) -> str | None:
        """The link that a member with these components would be written through."""
        node = self._root
        for i, part in enumerate(parts[:-1]):
            node = node.get(part, {})
            if not node:
                return None
            if self._MARK in node:
                return "/".join(parts[: i + 1])
        return None


def display_name(name: str) -> str:
    """A member name safe to show: control characters escaped, length bounded."""
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in name[:1000])
    return (shown + "...") if len(name) > 1000 else (shown or "(no name)")


# --- zip ----------------------------------------------------------------------------------

_CD_SIG = b"PK\x01\x02"
_LOCAL_SIG = b"PK\x03\x04"
_EOCD_SIG = b"PK\x05\x06"
_EOCD64_SIG = b"PK\x06\x06"
_LOC64_SIG = b"PK\x06\x07"
_CD_FIXED = struct.Struct("<4s4H2H3I5HII")
_LOCAL_FIXED = struct.Struct("<4s5H3I2H")
_EOCD = struct.Struct("<4s4HIIH")
_EOCD64 = struct.Struct("<4sQ2H2I4Q")
_LOC64 = struct.Struct("<4sIQI")
_ZIP_METHODS = {0: "stored", 8: "deflate", 12: "bzip2", 14: "lzma"}


@dataclass(slots=True)
class _ZipEntry:
    raw_name: bytes
    name: str
    flags: int
    method: int
    crc: int
    packed: int
    unpacked: int
    offset: int
    mode: int
    unix: bool
    data_start: int = 0

    @property
    def is_dir(self) -> bool:
        return self.name.endswith(("/", "\\")) and self.unpacked == 0

    @property
    def is_symlink(self) -> bool:
        return self.unix and stat.S_ISLNK(self.mode)


class _RangeReader:
    """Bytes [start, end) of a file, taken in small pieces through a bounded buffer."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        self._read = _range_reader(f, start)
        self._left = end - start
        self._buf = b""

    def remaining(self) -> int:
        return self._left + len(self._buf)

    def take(self, n: int) -> bytes:
        while len(self._buf) < n and self._left > 0:
            data = self._read(min(self._left, max(_IN_STEP, n)))
            if not data:
                break
            self._left -= len(data)
            self._buf += data
        if len(self._buf) < n:
            raise _Corrupt("bad-central-directory", "the central directory is cut short")
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _find_central_directory(f: BinaryIO, size: int) -> tuple[int, int]:
    """(offset, length) of a zip's central directory, from its end records."""
    tail_len = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(_EOCD_SIG)
    while pos >= 0 and pos + _EOCD.size > len(tail):
        pos = tail.rfind(_EOCD_SIG, 0, pos)
    if pos < 0:
        raise _Corrupt("truncated", "no end-of-central-directory record: the zip is cut short")
    _, disk, cd_disk, _, _, cd_len, cd_off, _ = _EOCD.unpack_from(tail, pos)
    eocd_at = size - tail_len + pos
    end = eocd_at
    if eocd_at >= _LOC64.size:
        f.seek(eocd_at - _LOC64.size)
        loc = f.read(_LOC64.size)
        if loc[:4] == _LOC64_SIG:
            _, disk, eocd64_at, _ = _LOC64.unpack(loc)
            f.seek(eocd64_at)
            rec = f.read(_EOCD64.size)
            if len(rec) < _EOCD64.size or rec[:4] != _EOCD64_SIG:
                raise _Corrupt("bad-central-directory", "the zip64 end record is missing")
            _, _, _, _, disk, cd_disk, _, _, cd_len, cd_off = _EOCD64.unpack(rec)
            end = eocd64_at
    if disk not in (0, 0xFFFF) or cd_disk not in (0, 0xFFFF):
        raise _Stop("multi-volume", "a part of a multi-volume zip cannot be scanned alone")
    if cd_off + cd_len > end:
        raise _Corrupt("bad-central-directory", "the central directory lies outside the file")
    return cd_off, cd_len


def _zip64_fields(extra: bytes, unpacked: int, packed: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if tag != 1:
            continue
        values = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
        if unpacked == 0xFFFFFFFF and values:
            unpacked = values.pop(0)
        if packed == 0xFFFFFFFF and values:
            packed = values.pop(0)
        if offset == 0xFFFFFFFF and values:
            offset = values.pop(0)
    return unpacked, packed, offset


def _central_directory(scan: _Scan, f: BinaryIO, start: int, length: int) -> list[_ZipEntry]:
    reader = _RangeReader(f, start, start + length)
    entries: list[_ZipEntry] = []
    while reader.remaining() > 0:
        if len(entries) % 256 == 0:
            scan.check_time()
        fields = _CD_FIXED.unpack(reader.take(_CD_FIXED.size))
        sig, made, _, flags, method, _, _, crc, packed, unpacked, nlen, elen, clen = fields[:13]
        mode, offset = fields[15] >> 16, fields[16]
        if sig != _CD_SIG:
            raise _Corrupt("bad-central-directory", "a central directory record is damaged")
        raw_name = reader.take(nlen)
        extra = reader.take(elen)
        reader.take(clen)
        unpacked, packed, offset = _zip64_fields(extra, unpacked, packed, offset)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if not scan.count_member():
            break
        entries.append(
            _ZipEntry(raw_name, name, flags, method, crc, packed, unpacked, offset, mode,
                      made >> 8 == 3)
        )  # fmt: skip
    return entries


def _locate_data(scan: _Scan, f: BinaryIO, entries: list[_ZipEntry], limit: int) -> None:
    """Read each entry's local header: where its data starts, and whether it is sound."""
    for i, e in enumerate(entries):
        if i % 256 == 0:
            scan.check_time()
        display = display_name(e.name)
        f.seek(e.offset)
        fixed = f.read(_LOCAL_FIXED.size)
        if len(fixed) < _LOCAL_FIXED.size or fixed[:4] != _LOCAL_SIG:
            detail = "the member's local header is missing or damaged"
            scan.add("archive-malformed", "bad-local-header", detail, display)
            e.data_start = -1
            continue
        nlen, elen = _LOCAL_FIXED.unpack(fixed)[9:11]
        if f.read(nlen) != e.raw_name:
            detail = "the local header names another member than the central directory"
            scan.add("archive-malformed", "name-mismatch", detail, display)
        e.data_start = e.offset + _LOCAL_FIXED.size + nlen + elen
        if e.data_start + e.packed > limit:
            detail = "the member's data runs past the end of the archive's data"
            scan.add("archive-malformed", "entry-out-of-range", detail, display)
            e.data_start = -1


def _check_overlaps(scan: _Scan, entries: list[_ZipEntry]) -> None:
    spans = sorted((e.offset, e.data_start + e.packed) for e in entries if e.data_start >= 0)
    overlaps = 0
    reach = -1
    for start, end in spans:
        if start < reach:
            overlaps += 1
        reach = max(reach, end)
    if overlaps:
        detail = f"{overlaps} entries share data with others (a non-recursive zip bomb)"
        scan.bomb("overlapping-entries", detail)


def _walk_zip(scan: _Scan, f: BinaryIO, size: int) -> None:
    cd_off, cd_len = _find_central_directory(f, size)
    entries = _central_directory(scan, f, cd_off, cd_len)
    _locate_data(scan, f, entries, cd_off)
    _check_overlaps(scan, entries)
    declared = 0
    readable: list[_ZipEntry] = []
    for e in entries:
        display = display_name(e.name)
        scan.check_name(e.name, display)
        declared += e.unpacked
        if e.data_start < 0 or e.is_dir:
            continue
        if e.is_symlink:
            scan.link(e.name, display, _zip_link_target(f, e), hard=False)
        elif e.flags & 0x41:  # traditional or strong encryption
            scan.add("archive-encrypted", "encrypted-member", "member is encrypted", display)
        elif e.method not in _ZIP_METHODS:
            detail = f"compression method {e.method} is not supported"
            scan.add("not-scanned", "unsupported-method", detail, display)
        else:
            scan.declared(display, e.unpacked, e.packed)
            readable.append(e)
    if declared >= scan.limits.ratio_min_bytes and declared > scan.limits.max_ratio * size:
        scan.bomb("declared-ratio", f"declares {declared} bytes in a {size}-byte archive")
    for e in readable:
        scan.take(display_name(e.name), _zip_source(f, e), declared=e.unpacked, crc=e.crc)


def _zip_link_target(f: BinaryIO, e: _ZipEntry) -> str | None:
    """A zip symlink's target: its data (read no further than a path can be long)."""
    if e.flags & 0x41 or e.method not in _ZIP_METHODS:
        return None
    try:
        chunk = next(iter(_zip_source(f, e)), b"")
    except _Corrupt:
        return None
    return chunk[:4096].decode("utf-8", errors="replace")


def _zip_source(f: BinaryIO, e: _ZipEntry) -> _Source:
    raw = _Raw(_range_reader(f, e.data_start), e.packed)
    if e.method == 8:
        return _Inflate(raw, lambda: zlib.decompressobj(-15), zlib_style=True)
    if e.method == 12:
        return _Inflate(raw, bz2.BZ2Decompressor)
    if e.method == 14:
        return _ZipLzma(raw, e.unpacked)
    return raw


class _ZipLzma:
    """LZMA in zip: a 4-byte version and size, the LZMA1 properties, then raw data."""

    def __init__(self, raw: _Raw, unpacked: int) -> None:
        self._raw = raw
        self._unpacked = unpacked

    @property
    def consumed(self) -> int:
        return self._raw.consumed

    def __iter__(self) -> Iterator[bytes]:
        head = self._raw.read(4)
        if len(head) < 4:
            raise _Corrupt("truncated", "LZMA member ends in its header")
        props = self._raw.read(struct.unpack_from("<H", head, 2)[0])
        if len(props) < 5:
            raise _Corrupt("corrupt", "LZMA member has bad properties")
        lc_lp_pb, dict_size = props[0], struct.unpack_from("<I", props, 1)[0]
        if lc_lp_pb >= 9 * 5 * 5:
            raise _Corrupt("corrupt", "LZMA member has bad properties")
        # The dictionary is reserved up front. Output never goes past the member limit,
        # so neither can any match distance: a smaller one than declared decodes the same.
        dict_size = max(4096, min(dict_size, _MAX_DICTIONARY))
        filters = [
            {
                "id": lzma.FILTER_LZMA1,
                "dict_size": dict_size,
                "lc": lc_lp_pb % 9,
                "lp": (lc_lp_pb // 9) % 5,
                "pb": lc_lp_pb // 45,
            }
        ]

        def new() -> _Decompressor:
            return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)

        yield from _Inflate(self._raw, new, end_at=self._unpacked)


# --- tar ------------------------------------------------------------------------------------

_EXTENDED_TYPES = {
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
}


class _OversizedHeader(tarfile.HeaderError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads pax and GNU long-name headers whole into memory: bound them."""

    #: Set per scan, before the archive is opened (tarfile gives no other way in).
    max_extended = 1 * _MiB

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _BoundedTarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENDED_TYPES and info.size > cls.max_extended:
            raise _OversizedHeader(f"an extended header of {info.size} bytes")
        return info

    def _proc_sparse(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        """An old GNU sparse member's map: tarfile reads every extension block of it at
        once, keeping an entry per region (some 11 bytes of memory per byte of map). Its
        blocks are read here through a counter, up to the extended headers' bound."""
        source = archive.fileobj
        limit = self.max_extended // _SPARSE_MAP_SHARE
        archive.fileobj = cast(Any, _CountedReads(source, limit, "a sparse map"))
        try:
            read: tarfile.TarInfo = super()._proc_sparse(archive)  # type: ignore[misc]
            return read
        finally:
            archive.fileobj = source


# A sparse map costs some ten times its bytes as tarfile's tuples (a map of 1 MiB, the
# default bound's share, is about 10 MiB): it gets a 16th of the extended headers' bound.
_SPARSE_MAP_SHARE = 16


class _CountedReads:
    """A file whose reads stop with _OversizedHeader past ``limit`` bytes."""

    def __init__(self, source: Any, limit: int, what: str) -> None:
        self._source, self._left, self._what = source, limit, what

    def read(self, n: int) -> bytes:
        self._left -= n
        if self._left < 0:
            raise _OversizedHeader(f"{self._what} of more than its bound")
        data: bytes = self._source.read(n)
        return data

    def tell(self) -> int:
        where: int = self._source.tell()
        return where


#: tarfile.open, untyped: its overloads want the mode as a literal.
_TAR_OPEN: Any = tarfile.open


def _open_tar(scan: _Scan, f: BinaryIO | io.RawIOBase, mode: str) -> tarfile.TarFile:
    tarinfo = type("_TarInfo", (_BoundedTarInfo,), {"max_extended": scan.limits.max_header_bytes})
    try:
        opened: tarfile.TarFile = _TAR_OPEN(fileobj=f, mode=mode, tarinfo=tarinfo)
        return opened
    except _OversizedHeader as exc:
        raise _Stop("header-too-large", f"{exc} was not read") from exc
    except (
        tarfile.TarError, EOFError, UnicodeError, ValueError, OverflowError, IndexError
    ) as exc:  # fmt: skip
        raise _Corrupt("bad-header", f"the tar header cannot be read: {exc}") from exc


def _check_tar_end(block: bytes | None, offset: int) -> None:
    """tarfile stops silently at a damaged header: only zeros (or nothing) may follow."""
    if block is None or not block.strip(b"\0"):
        return
    if len(block) < tarfile.BLOCKSIZE:
        raise _Corrupt("truncated", f"the tar is cut short in a header at {offset}")
    raise _Corrupt("bad-header", f"a damaged tar header at offset {offset}")


def _walk_tar(scan: _Scan, f: BinaryIO, size: int) -> None:
    with _open_tar(scan, f, "r:") as tf:
        for member in _tar_members(scan, tf):
            _tar_member(scan, tf, member)
        f.seek(tf.offset)
        _check_tar_end(f.read(tarfile.BLOCKSIZE), tf.offset)


def _tar_members(scan: _Scan, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        scan.check_time()
        try:
            member = tf.next()
        except _OversizedHeader as exc:
            raise _Stop("header-too-large", f"{exc} was not read") from exc
        except (
            tarfile.TarError, EOFError, UnicodeError, ValueError, OverflowError, IndexError
        ) as exc:  # IndexError: a sparse header cut short  # fmt: skip
            rule = "truncated" if "unexpected end" in str(exc) else "bad-header"
            raise _Corrupt(rule, f"a tar header cannot be read: {exc}") from exc
        if member is None or not scan.count_member():
            return
        # tarfile keeps every header it reads; none is needed again (flat memory).
        members: list[tarfile.TarInfo] = getattr(tf, "members", [])
        members.clear()
        yield member


def _tar_member(scan: _Scan, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
    display = display_name(m.name)
    scan.check_name(m.name, display)
    if m.issym() or m.islnk():
        scan.link(m.name, display, m.linkname, hard=m.islnk())
        return
    if not m.isreg():
        return  # directories, devices, fifos: no content
    if m.size > scan.limits.max_member_bytes:
        scan.too_large(display)  # a tar's sizes are those of the data it holds
        return
    reader = tf.extractfile(m)
    if reader is None:
        return
    with reader:
        scan.take(display, _Raw(reader.read, m.size))


# --- gzip, bzip2, xz ----------------------------------------------------------------------

_STRIP = {
    ".gz": "",
    ".gzip": "",
    ".z": "",
    ".bz2": "",
    ".bz": "",
    ".xz": "",
    ".tgz": ".tar",
    ".taz": ".tar",
    ".tbz": ".tar",
    ".tbz2": ".tar",
    ".txz": ".tar",
}


def inner_name(name: str) -> str:
    """The name of a compressed file's content: ``x.tar.gz`` -> ``x.tar``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and stem:
        return stem + _STRIP.get("." + ext.lower(), "")
    return base or "content"


def _single_stream(
    new: Callable[[], _Decompressor], magic: bytes, zlib_style: bool = False
) -> Callable[[_Scan, BinaryIO, int], None]:
    def walk(scan: _Scan, f: BinaryIO, size: int) -> None:
        if not scan.count_member():
            return
        raw = _Raw(_range_reader(f, 0), None)
        stream = _Pulled(_Inflate(raw, new, zlib_style=zlib_style, restart=magic))
        display = display_name(inner_name(scan.name))
        if sniff(stream.head) == "tar" and scan.depth + 1 < scan.limits.max_depth:
            # A compressed tarball is read as it decompresses, so the tar may be far
            # larger than one member may be; its members are counted one by one.
            _stream_tar(scan, display, stream)
        else:
            scan.take(display, stream)

    return walk


class _Pulled:
    """A source whose first bytes (``head``, at least 512 unless shorter) are read."""

    def __init__(self, source: _Inflate) -> None:
        self._source = source
        self._chunks = iter(source)
        parts: list[bytes] = []
        while sum(map(len, parts)) < _HEAD and (chunk := next(self._chunks, None)) is not None:
            parts.append(chunk)
        self.head = b"".join(parts)

    @property
    def consumed(self) -> int:
        return self._source.consumed

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        yield from self._chunks


class _PullReader(io.RawIOBase):
    """A read-only, forward-only file over chunks (for tarfile's stream mode). It keeps
    the last ``_WINDOW`` bytes, so that the block where tarfile stopped can be checked."""

    _WINDOW = 64 * _KiB  # more than tarfile reads ahead (one 10 KiB record)

    def __init__(self, chunks: Iterator[bytes], count: Callable[[int], None]) -> None:
        super().__init__()
        self._chunks = chunks
        self._count = count
        self._current = memoryview(b"")
        self._window = b""
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._current and not self._pull():
            return 0
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def _pull(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._count(len(chunk))
        self.produced += len(chunk)
        self._current = memoryview(chunk)
        self._window = (self._window + chunk[-self._WINDOW :])[-self._WINDOW :]
        return True

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at ``offset`` (fewer at the end), if still in the window."""
        while self.produced < offset + tarfile.BLOCKSIZE and self._pull():
            self._current = memoryview(b"")
        start = offset - (self.produced - len(self._window))
        return self._window[start : start + tarfile.BLOCKSIZE] if start >= 0 else None

    def drain(self) -> None:
        while self._pull():
            self._current = memoryview(b"")


def _stream_tar(scan: _Scan, display: str, stream: _Pulled) -> None:
    view = scan.streamed(display)
    produced = 0

    def count(n: int) -> None:
        nonlocal produced
        produced += n
        scan.expanded += n
        scan.budget.bytes_left -= n
        scan.check_time()
        if scan.budget.bytes_left < 0:
            scan.measured(display, produced, stream.consumed, stopped=True)
            scan.total_limit()

    reader = _PullReader(iter(stream), count)
    try:
        tf = _open_tar(scan, reader, "r|")
        with tf:
            for member in _tar_members(view, tf):
                _tar_member(view, tf, member)
        _check_tar_end(reader.block_at(tf.offset), tf.offset)
        reader.drain()  # to the end of the compressed stream, which checks its CRC
    except _Corrupt as exc:
        view.add("archive-malformed", exc.rule, exc.detail)
    scan.measured(display, produced, stream.consumed, stopped=False)


# --- 7z -------------------------------------------------------------------------------------

_7Z_SIGNATURE = struct.Struct("<6s2BIQQI")
_7Z_AES = b"\x06\xf1\x07\x01"


def _walk_7z(scan: _Scan, f: BinaryIO, size: int) -> None:
    try:
        import py7zr
    except ImportError as exc:  # a broken install: say so rather than pass the file
        raise _Stop("unsupported", f"py7zr cannot be loaded: {exc}") from exc
    _bound_py7zr_steps()
    _check_7z_header(scan, f, size)
    f.seek(0)
    try:
        archive = py7zr.SevenZipFile(f)
    except py7zr.PasswordRequired as exc:
        scan.add("archive-encrypted", "encrypted-header", "the 7z header is encrypted")
        raise _Done from exc
    except Exception as exc:  # py7zr raises anything from struct.error to MemoryError
        raise _Corrupt("bad-header", f"the 7z header cannot be read: {exc}") from exc
    with archive:
        members = _7z_targets(scan, archive, size)
        if members:
            _7z_extract(scan, archive, members)


def _bound_py7zr_steps() -> None:
    """py7zr decodes a member in steps of ``get_memory_limit()`` bytes, up to 128 MB held
    at once: make that 1 MiB. It only sets a step size (py7zr's output is the same), for
    the whole process, as py7zr has no per-archive setting for it."""
    module = sys.modules.get("py7zr.py7zr")
    if module is not None and callable(getattr(module, "get_memory_limit", None)):
        vars(module)["get_memory_limit"] = _py7zr_step


def _py7zr_step() -> int:
    return _OUT_STEP


def _check_7z_header(scan: _Scan, f: BinaryIO, size: int) -> None:
    """Size the header before py7zr decodes it (it would accept up to 256 MiB)."""
    f.seek(0)
    sig = f.read(_7Z_SIGNATURE.size)
    if len(sig) < _7Z_SIGNATURE.size:
        raise _Corrupt("truncated", "the 7z signature header is cut short")
    _, _, _, _, offset, length, _ = _7Z_SIGNATURE.unpack(sig)
    if _7Z_SIGNATURE.size + offset + length > size:
        raise _Corrupt("truncated", "the 7z header lies past the end of the file")
    if length > scan.limits.max_header_bytes:
        raise _Stop("header-too-large", f"a 7z header of {length} bytes was not read")
    f.seek(_7Z_SIGNATURE.size + offset)
    header = f.read(min(length, 1))
    if header != b"\x17":  # a plain header: its size is what was just checked
        return
    f.seek(_7Z_SIGNATURE.size + offset + 1)
    streams = _7z_header_streams(f.read(length - 1))
    if streams is None:
        return  # py7zr changed: it still enforces its own limit
    unpacked, encrypted = streams
    if encrypted:
        scan.add("archive-encrypted", "encrypted-header", "the 7z header is encrypted")
        raise _Done
    if unpacked > scan.limits.max_header_bytes:
        raise _Stop("header-too-large", f"a 7z header of {unpacked} bytes was not decoded")


def _7z_header_streams(data: bytes) -> tuple[int, bool] | None:
    """(decoded size, encrypted) of an encoded 7z header, through py7zr's own parser."""
    try:
        from py7zr.archiveinfo import HeaderStreamsInfo

        streams = HeaderStreamsInfo.retrieve(io.BytesIO(data))
        folders = streams.unpackinfo.folders
        unpacked = 0
        encrypted = False
        for folder in folders:
            sizes = folder.unpacksizes
            unpacked += max(sizes) if isinstance(sizes, list | tuple) else int(sizes)
            encrypted |= _7z_encrypted(folder)
            if (costly := _7z_too_costly(folder)) is not None:
                unpacked = max(unpacked, costly[0])  # as costly as that
        return unpacked, encrypted
    except Exception:  # an internal API: a parse failure here is py7zr's to report
        return None


def _7z_encrypted(folder: Any) -> bool:
    return folder is not None and any(c.get("method") == _7Z_AES for c in folder.coders)


_7Z_LZMA = b"\x03\x01\x01"
_7Z_LZMA2 = b"\x21"
_7Z_PPMD = b"\x03\x04\x01"


def _7z_too_costly(folder: Any) -> tuple[int, str] | None:
    """What a 7z block's decoder would allocate past our bounds, as (bytes, what), or
    None: an LZMA dictionary over _MAX_DICTIONARY, or a PPMd model (allocated as declared,
    up to 4 GiB) over _MAX_PPMD_MODEL."""
    dictionary = model = 0
    for coder in getattr(folder, "coders", None) or ():
        props = coder.get("properties") or b""
        method = coder.get("method")
        if method == _7Z_LZMA2 and props:
            code = props[0]
            size = 0xFFFFFFFF if code >= 40 else (2 | (code & 1)) << (code // 2 + 11)
            dictionary = max(dictionary, size)
        elif method == _7Z_LZMA and len(props) >= 5:
            dictionary = max(dictionary, struct.unpack_from("<I", props, 1)[0])
        elif method == _7Z_PPMD and len(props) >= 5:  # the order, then the model's size
            model = max(model, struct.unpack_from("<I", props, 1)[0])
    if dictionary > _MAX_DICTIONARY:
        return dictionary, "dictionary"
    if model > _MAX_PPMD_MODEL:
        return model, "PPMd model"
    return None


def _7z_targets(scan: _Scan, archive: Any, size: int) -> list[Any]:
    """Check every member's metadata; the members to extract."""
    targets: list[Any] = []
    declared = 0
    blocked_folders: set[int] = set()  # solid blocks with an over-limit member
    for member in archive.files:
        if not scan.count_member():
            break
        display = display_name(member.filename)
        scan.check_name(member.filename, display)
        declared += member.uncompressed or 0
        folder = member.folder
        if member.is_directory or member.emptystream:
            continue
        if member.is_symlink:
            scan.link(member.filename, display, None, hard=False)
        elif _7z_encrypted(folder):
            scan.add("archive-encrypted", "encrypted-member", "member is encrypted", display)
        elif (costly := _7z_too_costly(folder)) is not None:
            detail = f"its block needs a {costly[0] // _MiB} MiB {costly[1]}"
            scan.add("not-scanned", "dictionary-too-large", detail, display)
        elif member.uncompressed > scan.limits.max_member_bytes:
            scan.too_large(display)
            blocked_folders.add(id(folder))
        elif id(folder) in blocked_folders:
            detail = "member follows an over-limit member in its solid block"
            scan.add("not-scanned", "member-too-large", detail, display)
        else:
            if member.compressed is not None:
                scan.declared(display, member.uncompressed, member.compressed)
            targets.append(member)
    if declared >= scan.limits.ratio_min_bytes and declared > scan.limits.max_ratio * size:
        scan.bomb("declared-ratio", f"declares {declared} bytes in a {size}-byte archive")
    return targets


def _7z_extract(scan: _Scan, archive: Any, members: list[Any]) -> None:
    from py7zr.helpers import get_sanitized_output_path

    with tempfile.TemporaryDirectory(prefix="splitstore-7z-") as tmp:
        workdir = Path(tmp).resolve()  # py7zr checks each name stays inside it
        targets = []
        for member in members:
            try:
                get_sanitized_output_path(member.filename, workdir)
            except Exception:
                detail = "py7zr refuses to extract this name"
                scan.add("not-scanned", "unsafe-name", detail, display_name(member.filename))
            else:
                targets.append(member.filename)
        if not targets:
            return
        factory = _SevenZipFactory(scan, workdir)
        archive.max_extract_size = max(scan.budget.bytes_left, 1)  # also caught when skipped
        try:
            archive.extract(path=workdir, targets=targets, factory=factory)
        except (_Stop, _Done, _Corrupt):
            raise
        except _Full as exc:  # raised by our writer, through py7zr
            factory.over_limit(exc)
        except Exception as exc:  # CRC errors, bad data, py7zr's own size limit...
            if type(exc).__name__ == "DecompressionBombError":
                scan.total_limit()
            scan.add("archive-malformed", "corrupt", f"7z data cannot be read: {exc}")
        finally:
            factory.abandon()


class _SevenZipWriter:
    """Takes one 7z member from py7zr (its Py7zIO interface) into a bounded sink."""

    def __init__(self, scan: _Scan, display: str) -> None:
        self._scan = scan
        self.display = display
        sink = scan.sink(display, None)
        assert sink is not None  # a sink without a declared size is never refused
        self.sink = sink
        self.closed = False

    def write(self, data: bytes | bytearray) -> int:
        self.sink.write(data)
        self._scan.check_time()
        return len(data)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self.sink.size

    def close(self) -> None:
        # py7zr closes a member when it is complete (its CRC is checked just after).
        if not self.closed:
            self.closed = True
            self._scan.done(self.display, self.sink, None)


class _SevenZipFactory:
    """py7zr's WriterFactory: one bounded writer per member, scanned when closed."""

    def __init__(self, scan: _Scan, workdir: Path) -> None:
        self._scan = scan
        self._workdir = workdir
        self.current: _SevenZipWriter | None = None

    def create(self, filename: str) -> _SevenZipWriter:
        # py7zr passes the member's path inside the extraction directory.
        name = os.path.relpath(filename, self._workdir)
        self.current = _SevenZipWriter(self._scan, display_name(name.replace(os.sep, "/")))
        return self.current

    def over_limit(self, exc: _Full) -> None:
        writer = self.current
        if writer is not None and not writer.closed:
            writer.closed = True
            writer.sink.discard()
            self._scan.over_limit(writer.display, writer.sink, None, exc.whole_scan)

    def abandon(self) -> None:
        if self.current is not None and not self.current.closed:
            self.current.closed = True
            self.current.sink.discard()


_WALKERS: dict[str, Callable[[_Scan, BinaryIO, int], None]] = {
    "zip": _walk_zip,
    "tar": _walk_tar,
    "gzip": _single_stream(lambda: zlib.decompressobj(31), _GZIP_MAGIC, zlib_style=True),
    "bzip2": _single_stream(bz2.BZ2Decompressor, _BZ2_MAGIC),
    "xz": _single_stream(
        lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT), _XZ_MAGIC
    ),
    "7z": _walk_7z,
}
