"""The signature engine: known-bad files by SHA-256, and the EICAR test file.

Each file costs one streamed SHA-256 (hashlib, in C) and a copy of its first 129 bytes:
no Python work per byte. The digest is looked up in the shipped list
``data/known-bad.sha256`` plus the user's own lists (``[scan] hash_lists``). The EICAR test
file is recognised by its official definition: the 68-byte EICAR string at the start,
then only whitespace (space, tab, CR, LF, Ctrl-Z), 128 bytes at most in all. (The YARA
engine finds the string embedded anywhere; this is the exact test file.)

A hash list has one SHA-256 a line (64 hex digits, either case), optionally followed by
whitespace and a name that findings show; blank lines and ``#`` comments are allowed,
and so is ``sha256sum`` output (``HASH  name`` or ``HASH *name``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path

from .._digest import Hasher
from .._errors import ConfigError
from ._engine import Finding

__all__ = ["SignatureEngine", "load_hash_list"]

#: The EICAR test string, in hex so that this source file is not itself a test file to
#: antivirus software. Never write it out literally anywhere in the project.
_EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d24"
    "45494341522d5354414e444152442d414e544956495255532d544553542d46494c452124482b482a"
)
#: The official definition: at most 128 bytes, the string then only these bytes.
_EICAR_MAX_SIZE = 128
_EICAR_PADDING = frozenset(b" \t\r\n\x1a")

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def load_hash_list(lines: Iterable[bytes], source: str) -> dict[str, str]:
    """Parse a hash list: ``{lowercase hex digest: name or ""}``.

    ``source`` names the file in errors: a bad line raises ``ConfigError`` naming it and
    the line number.
    """
    hashes: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{source}, line {number}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        digest, *rest = line.split(None, 1)
        if not _HEX_SHA256.fullmatch(digest):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ConfigError(
                f"{source}, line {number}: expected a SHA-256 (64 hex digits), "
                f"optionally followed by a name, not {shown!r}"
            )
        # sha256sum marks binary mode with "*" before the name.
        name = rest[0].removeprefix("*").strip() if rest else ""
        hashes.setdefault(digest.lower(), name)
    return hashes


class SignatureEngine:
    """Known-bad SHA-256 digests (shipped and the user's) and the EICAR test file."""

    name = "signatures"

    def __init__(self, extra_hash_files: Sequence[Path] = ()) -> None:
        shipped = files("splitstore.scanning") / "data" / "known-bad.sha256"
        #: digest -> (name or "", the list it came from)
        self._known: dict[str, tuple[str, str]] = {}
        self._add(load_hash_list(shipped.read_bytes().splitlines(), "known-bad.sha256"), "")
        for path in extra_hash_files:
            path = Path(path)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read hash list {path}: {exc.strerror or exc}") from exc
            self._add(load_hash_list(data.splitlines(), str(path)), str(path))
        listed = "".join(f"{d} {n}\n" for d, (n, _) in sorted(self._known.items()))
        self._digest = hashlib.sha256(listed.encode()).hexdigest()

    def _add(self, hashes: dict[str, str], source: str) -> None:
        for digest, name in hashes.items():
            # The first list that names a digest wins: the shipped list comes first.
            self._known.setdefault(digest, (name, source))

    def describe(self) -> dict[str, str]:
        return {"version": "1", "hashes": str(len(self._known)), "rules": self._digest}

    def session(self, name: str, size: int | None) -> _SignatureSession:
        return _SignatureSession(self._known)


class _SignatureSession:
    def __init__(self, known: dict[str, tuple[str, str]]) -> None:
        self._known = known
        self._sha256: Hasher = hashlib.sha256()
        self._shared = False
        self._head = bytearray()
        self._size = 0

    def share_sha256(self, sha256: Hasher) -> None:
        """Use the scanner's hash of the file, which it updates itself, instead of ours."""
        self._sha256, self._shared = sha256, True

    def feed(self, block: memoryview) -> None:
        if not self._shared:
            self._sha256.update(block)
        if self._size <= _EICAR_MAX_SIZE:
            # One byte past the limit is enough to know the file is too long.
            self._head += block[: _EICAR_MAX_SIZE + 1 - len(self._head)]
        self._size += len(block)

    def finish(self, path: Path | None) -> list[Finding]:
        found: list[Finding] = []
        if _is_eicar_file(self._head, self._size):
            found.append(
                Finding(
                    "signatures",
                    "test-signature",
                    "EICAR-Test-File",
                    "the EICAR anti-malware test file",
                    offset=0,
                )
            )
        digest = self._sha256.hexdigest()
        known = self._known.get(digest)
        if known is not None:
            name, source = known
            listed = f"the list {source}" if source else "the shipped known-bad list"
            found.append(
                Finding(
                    "signatures",
                    "known-bad",
                    name or f"sha256:{digest}",
                    f"SHA-256 {digest} is on {listed}",
                )
            )
        return found


def _is_eicar_file(head: bytes | bytearray, size: int) -> bool:
    return (
        size <= _EICAR_MAX_SIZE
        and head.startswith(_EICAR)
        and all(b in _EICAR_PADDING for b in head[len(_EICAR) :])
    )
