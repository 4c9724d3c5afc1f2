"""The one interface every scanning engine implements, and what a finding says.

A scan is streamed: the scanner reads the file once, in order, and hands each block to
every engine's session (``feed``). When the last block is in, ``finish`` is called with
the path of the complete file on disk, for the engines that need random access (archives
read their central directory; nothing else should re-read the file). Engines never decide
whether a finding blocks a file: they give it a category, and the policy maps categories
to block, warn or ignore.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "CATEGORIES",
    "Engine",
    "EngineSession",
    "Finding",
    "Head",
]

#: Every category an engine may give a finding, with what it means. The policy's keys.
CATEGORIES: dict[str, str] = {
    "known-bad": "the file's SHA-256 is on a list of known-bad files",
    "test-signature": "an anti-malware test file or string (EICAR)",
    "malware": "a ClamAV signature matched",
    "executable": "a program (PE, ELF, Mach-O)",
    "disguised-executable": "a program under a name that says it is something else",
    "macro": "an Office document with macros",
    "script-dropper": "a script that downloads or runs code (PowerShell, WScript)",
    "type-mismatch": "the content's type does not match the name's extension",
    "blocked-type": "a file type the policy blocks",
    "archive-bomb": "an archive that expands far beyond its size, or overlaps itself",
    "archive-nesting": "archives nested deeper than the limit",
    "archive-path": "an archive member with an absolute path or '..'",
    "archive-link": "an archive member that is a symbolic or hard link",
    "archive-encrypted": "an encrypted archive member, which cannot be scanned",
    "archive-malformed": "an archive that cannot be read to the end",
    "custom-rule": "a rule from the user's own rule files matched",
    "not-scanned": "an engine could not scan the file (too large, timed out, down)",
}


@dataclass(frozen=True)
class Finding:
    """One thing an engine found: which engine, which rule, where, and why."""

    engine: str
    category: str
    rule: str
    detail: str
    #: Byte offset in the file (or in the archive member) where it was found, if known.
    offset: int | None = None
    #: The archive member it is in, as "outer.zip/inner.tar/evil.exe", if any.
    member: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown finding category {self.category!r}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        category, detail = str(data["category"]), str(data.get("detail", ""))
        if category not in CATEGORIES:
            # Recorded by a newer version: keep the record readable, and say what it was.
            category, detail = "custom-rule", f"[{category[:64]}] {detail}"
        return cls(
            engine=str(data["engine"]),
            category=category,
            rule=str(data["rule"]),
            detail=detail,
            offset=int(data["offset"]) if data.get("offset") is not None else None,
            member=str(data["member"]) if data.get("member") is not None else None,
        )


class EngineSession(Protocol):
    """One engine's scan of one file (or one archive member)."""

    def feed(self, block: memoryview) -> None:
        """Take the next block of the file, in order. Must not keep a reference to it."""

    def finish(self, path: Path | None) -> list[Finding]:
        """Return what was found. ``path`` is the complete file on disk, or ``None`` when
        the content was only streamed (an archive member): engines that need random access
        then work from what they were fed, or report ``not-scanned``."""


class Head:
    """The first ``limit`` bytes of a stream fed in blocks of any size (a copy: fed
    blocks must not be kept), for engines that judge a file by how it starts."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()

    def take(self, block: memoryview) -> None:
        if len(self._data) < self._limit:
            self._data += block[: self._limit - len(self._data)]

    def bytes(self) -> bytes:
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)


# A session may also offer ``share_sha256(hasher)``: the scanner then hands it the
# hasher it keeps for the file (updated with every block, or a digest the caller
# vouched for), so an engine that needs the file's SHA-256 does not hash the file a second
# time. It must not update the hasher, and may read it only in ``finish``: during ``feed``
# another thread may still be hashing (``ScanStream.feed_file``).
#
# A session whose ``finish(path)`` may read the file on disk again (the archive engine)
# offers ``reads_file() -> bool``: whether it will, judged from what it was fed so far
# (True while it cannot tell yet). A fetch keeps the file it writes in the page cache only
# while some session may read it again (``ScanStream.reads_file``); a session without the
# method is taken not to, which at worst makes its read come from disk.


class Engine(Protocol):
    #: Short name shown in findings and recorded in manifests ("yara", "clamav", ...).
    name: str

    def describe(self) -> dict[str, str]:
        """What this engine is, for the record kept in the manifest: at least a version
        and, for rule-based engines, a SHA-256 of the rules in use."""

    def session(self, name: str, size: int | None) -> EngineSession:
        """Start scanning one file. ``name`` is the file's name (its extension matters to
        some engines); ``size`` its length when known."""
