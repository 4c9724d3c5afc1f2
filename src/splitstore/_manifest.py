"""The manifest: the small document that makes a stored version exist.

A manifest says everything needed to rebuild and check a file: its name, size, chunk
size, the servers in order with the length and digest of each one's stripe, and the
whole file's SHA-256. Writing it to both servers is the commit point of a store. Its
byte layout (canonical JSON) is specified in docs/format.md.

Format 3, the one written now, names each stripe's digest with its algorithm
(``_digest``: BLAKE3 for new stripes), and says in ``encryption`` whether the file is
stored as it is or encrypted; an encrypted one adds the version's random file key and the
padded size, and is only ever stored sealed (``_crypto.seal_manifest``), so servers never
see it. Formats 1 (stored as it is) and 2 (encrypted), written before, gave each stripe a
bare SHA-256; they are still read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from ._config import MAX_CHUNK_SIZE
from ._crypto import KEY_SIZE, ciphertext_size
from ._digest import from_sha256_hex, is_digest
from ._errors import IntegrityError, InvalidNameError
from ._names import MAX_NAME_BYTES, is_version_id, validate_name
from ._stripes import stripe_lengths
from .scanning import ScanReport

__all__ = [
    "DIGEST_FORMAT",
    "ENCRYPTED_FORMAT",
    "MANIFEST_FORMAT",
    "MAX_MANIFEST_BYTES",
    "PAYLOAD_ENCRYPTION",
    "Manifest",
    "StripeInfo",
]

#: Older formats, still read: stripes with bare SHA-256s, unencrypted (1) or encrypted (2).
MANIFEST_FORMAT = 1
ENCRYPTED_FORMAT = 2
#: The format written now: stripes with named digests, either way.
DIGEST_FORMAT = 3
_FORMATS = (MANIFEST_FORMAT, ENCRYPTED_FORMAT, DIGEST_FORMAT)
#: The payload construction of an encrypted file (docs/format.md, "Encrypted stream").
PAYLOAD_ENCRYPTION = "aes-256-gcm-stream-64k"
# A name of MAX_NAME_BYTES escaped as JSON is at most 6x longer; the rest is a few hundred bytes.
# A name escaped as JSON is at most 2x longer (quotes and backslashes; control characters
# are refused), the scan record at most 12 KiB, the rest a few hundred bytes.
MAX_MANIFEST_BYTES = 8 * MAX_NAME_BYTES
# Sizes beyond 2**53 would not survive JSON readers in other languages.
MAX_FILE_SIZE = 2**53 - 1
# A regex, not set(value): listing many files checks four of these per manifest.
_LOWER_HEX = re.compile("[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class StripeInfo:
    """One server's share of a stored file."""

    server: str
    length: int
    #: ``ALGORITHM:HEX`` (``_digest``); ``sha256:HEX`` in formats 1 and 2.
    digest: str


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    size: int
    chunk_size: int
    sha256: str
    version_id: str
    created_ns: int
    stripes: tuple[StripeInfo, ...]
    encryption: str = "none"
    format: int = DIGEST_FORMAT
    #: Encrypted only: the plaintext size after padding, and the version's file key (hex).
    padded_size: int | None = None
    file_key: str | None = None
    #: What the malicious-file checks found when this version was stored (None: not scanned).
    scan: ScanReport | None = None

    @property
    def encrypted(self) -> bool:
        return self.encryption != "none"

    @property
    def stored_size(self) -> int:
        """Bytes of the stream cut into chunks: the file, or its ciphertext."""
        if self.padded_size is None:
            return self.size
        return ciphertext_size(self.padded_size)

    def __post_init__(self) -> None:
        # The one place every field's type and range is checked: from_bytes relies on it
        # rather than checking each field twice (listing 10,000 names parses 10,000 of these).
        validate_name(self.name)
        if not _is_uint(self.size) or self.size > MAX_FILE_SIZE:
            raise ValueError("size out of range")
        if not _is_uint(self.chunk_size) or not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            # Bounded: the client buffers a few chunks per server, so a huge chunk size
            # from a damaged or hostile manifest must not make it buffer whole stripes.
            raise ValueError("chunk_size out of range")
        if not _is_sha256(self.sha256) or not is_version_id(self.version_id):
            raise ValueError("bad hash or version id")
        if not _is_uint(self.created_ns):
            raise ValueError("bad creation time")
        if type(self.format) is not int or self.format not in _FORMATS:
            raise ValueError("unsupported manifest format")
        if self.encryption not in ("none", PAYLOAD_ENCRYPTION):
            raise ValueError("unsupported encryption")
        if (self.format, self.encrypted) in ((MANIFEST_FORMAT, True), (ENCRYPTED_FORMAT, False)):
            raise ValueError(f"format {self.format} says the other way of storing")
        if not self.encrypted:
            if (self.padded_size, self.file_key) != (None, None):
                raise ValueError("an unencrypted file has no padding or file key")
        else:
            padded = self.padded_size
            if not _is_uint(padded) or not self.size <= padded <= MAX_FILE_SIZE:
                raise ValueError("padded_size out of range")
            if not _is_hex(self.file_key, 2 * KEY_SIZE):
                raise ValueError("bad file key")
        if type(self.stripes) is not tuple or not self.stripes:
            raise ValueError("stripes must be a non-empty tuple")
        expected = stripe_lengths(self.stored_size, self.chunk_size, len(self.stripes))
        for s, length in zip(self.stripes, expected, strict=True):
            if type(s) is not StripeInfo or type(s.length) is not int:
                raise ValueError("bad stripe entry")
            if s.length != length:
                raise ValueError("stripe lengths do not match the size and chunk size")
            legacy = self.format != DIGEST_FORMAT
            if not is_digest(s.digest) or legacy != s.digest.startswith("sha256:"):
                raise ValueError("bad stripe digest")
            if type(s.server) is not str:
                raise ValueError("bad stripe entry")
        if self.scan is not None and not isinstance(self.scan, ScanReport):
            raise ValueError("bad scan record")

    def stripe_for(self, server: str) -> StripeInfo:
        for stripe in self.stripes:
            if stripe.server == server:
                return stripe
        raise KeyError(server)

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "sha256": self.sha256,
            "version_id": self.version_id,
            "created_ns": self.created_ns,
            "encryption": self.encryption,
            "stripes": [_stripe_entry(s, self.format) for s in self.stripes],
        }
        if self.encrypted:
            doc.update(padded_size=self.padded_size, file_key=self.file_key)
        if self.scan is not None:
            record = self.scan.bounded().to_json()
            del record["name"]  # the manifest's own
            doc["scan"] = record
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, server: str | None = None) -> Manifest:
        """Parse and check a manifest; anything malformed is an IntegrityError."""
        where = f" from the {server}" if server else ""
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"the manifest{where} is too large", server=server)
        try:
            doc = orjson.loads(data)  # UTF-8 only, no NaN; fast for listings
            if type(doc) is not dict:
                raise TypeError("not an object")
            fmt = doc["format"]
            if type(fmt) is not int:
                raise TypeError("'format' has the wrong type")
            if fmt not in _FORMATS:
                raise IntegrityError(
                    f"the manifest{where} has format {fmt!r}, which this version of "
                    "splitstore cannot read; upgrade splitstore",
                    server=server,
                )
            stripes, name = doc["stripes"], doc["name"]
            if type(stripes) is not list:
                raise TypeError("'stripes' has the wrong type")
            if type(name) is not str:  # before the scan record, which takes the name
                raise TypeError("'name' has the wrong type")
            encryption = doc["encryption"]
            encrypted = encryption != "none"
            # Only shapes are taken here; __post_init__ checks every value's type and range.
            return cls(
                name=name,
                size=doc["size"],
                chunk_size=doc["chunk_size"],
                sha256=doc["sha256"],
                version_id=doc["version_id"],
                created_ns=doc["created_ns"],
                encryption=encryption,
                stripes=tuple(_stripe_info(s, fmt) for s in stripes),
                format=fmt,
                padded_size=doc["padded_size"] if encrypted else None,
                file_key=doc["file_key"] if encrypted else None,
                scan=_scan_record(doc),
            )
        except IntegrityError:
            raise
        except (
            ValueError,
            TypeError,
            KeyError,
            UnicodeDecodeError,
            InvalidNameError,
            RecursionError,
        ) as exc:
            # A bad name inside a manifest is damage to the manifest, not a usage mistake;
            # so is a value nested deep enough to exhaust the stack when turned into text.
            raise IntegrityError(
                f"the manifest{where} is malformed ({exc})", server=server
            ) from exc


def _scan_record(doc: dict[str, Any]) -> ScanReport | None:
    record = doc.get("scan")
    if record is None:
        return None
    if not isinstance(record, dict):
        raise TypeError("'scan' has the wrong type")
    return ScanReport.from_json({**record, "name": doc["name"]})


def _stripe_info(entry: object, fmt: int) -> StripeInfo:
    if type(entry) is not dict:
        raise TypeError("a stripe entry is not an object")
    # Formats 1 and 2 held a bare SHA-256.
    # (A bad value is refused by StripeInfo's owner, Manifest.__post_init__.)
    digest = entry["digest"] if fmt == DIGEST_FORMAT else from_sha256_hex(entry["sha256"]) or ""
    return StripeInfo(server=entry["server"], length=entry["length"], digest=digest)


def _stripe_entry(s: StripeInfo, fmt: int) -> dict[str, Any]:
    if fmt == DIGEST_FORMAT:
        return {"server": s.server, "length": s.length, "digest": s.digest}
    return {"server": s.server, "length": s.length, "sha256": s.digest.partition(":")[2]}


def _is_uint(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0  # not bool, which is an int


def _is_sha256(value: object) -> bool:
    return _is_hex(value, 64)


def _is_hex(value: object, length: int) -> bool:
    return type(value) is str and len(value) == length and _LOWER_HEX.fullmatch(value) is not None
