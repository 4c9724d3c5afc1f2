"""Archive samples for the archive engine's tests, built from bytes at test time.

Bombs are streamed to disk from a small repeated deflate block, so making one costs a
few MB of writes and no memory; the hostile zips (overlapping entries, flags set by hand,
lying sizes) are laid out byte by byte with ``raw_zip``.
"""

from __future__ import annotations

import functools
import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RawEntry",
    "deflate_zeros",
    "nested_zip",
    "overlap_bomb",
    "raw_zip",
    "tar_of",
    "zeros_crc",
    "zeros_gzip",
    "zeros_zip",
    "zip_of",
]

MiB = 1 << 20


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def nested_zip(levels: int, payload: bytes, name: str = "payload.txt") -> bytes:
    """``payload`` inside ``levels`` zips: level1.zip holds level2.zip ... holds payload."""
    data = zip_of({name: payload})
    for level in range(levels - 1, 0, -1):
        data = zip_of({f"level{level + 1}.zip": data})
    return data


def tar_of(
    members: Sequence[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# --- zeros, streamed ---------------------------------------------------------------------


@functools.cache
def _zero_block() -> bytes:
    """Raw deflate of 1 MiB of zeros, ending in a full flush: self-contained, so any
    number of copies in a row is valid deflate data for that many MiB of zeros."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)


_FINAL_BLOCK = b"\x03\x00"  # an empty final fixed-Huffman block


def deflate_zeros(mib: int) -> tuple[int, list[bytes]]:
    """(length, pieces) of a raw deflate stream of ``mib`` MiB of zeros."""
    block = _zero_block()
    return len(block) * mib + len(_FINAL_BLOCK), [block] * mib + [_FINAL_BLOCK]


@functools.cache
def zeros_crc(mib: int) -> int:
    crc = 0
    zeros = bytes(MiB)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return crc


def zeros_gzip(path: Path, mib: int) -> None:
    """A gzip file of ``mib`` MiB of zeros (1 GiB takes about 1 MB)."""
    _, pieces = deflate_zeros(mib)
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")
        for piece in pieces:
            f.write(piece)
        f.write(struct.pack("<II", zeros_crc(mib), (mib * MiB) & 0xFFFFFFFF))


def zeros_zip(path: Path, mib: int, declared: int | None = None, name: str = "zeros.bin") -> None:
    """A zip of one deflated member of ``mib`` MiB of zeros; ``declared`` makes it lie
    about its uncompressed size (and then its CRC is that of the declared zeros)."""
    length, pieces = deflate_zeros(mib)
    size = mib * MiB if declared is None else declared
    crc = zeros_crc(mib) if declared is None else zlib.crc32(bytes(declared))
    entry = RawEntry(name.encode(), b"", method=8, crc=crc, unpacked=size, packed=length)
    with path.open("wb") as f:
        f.write(entry.local_header())
        for piece in pieces:
            f.write(piece)
        cd = entry.central_header(0)
        f.write(cd)
        f.write(_eocd(1, len(cd), entry.local_size() + length))


# --- zips laid out by hand -------------------------------------------------------------


@dataclass
class RawEntry:
    """One zip entry with every field under the test's control."""

    name: bytes
    data: bytes
    method: int = 0
    flags: int = 0
    crc: int | None = None
    unpacked: int | None = None
    packed: int | None = None
    made_by: int = 20  # high byte 0: MS-DOS; 3 << 8: Unix
    external: int = 0
    local_name: bytes | None = None

    def _sizes(self) -> tuple[int, int, int]:
        crc = zlib.crc32(self.data) if self.crc is None else self.crc
        packed = len(self.data) if self.packed is None else self.packed
        unpacked = len(self.data) if self.unpacked is None else self.unpacked
        return crc, packed, unpacked

    def local_header(self) -> bytes:
        crc, packed, unpacked = self._sizes()
        name = self.name if self.local_name is None else self.local_name
        return struct.pack(
            "<4s5H3I2H", b"PK\x03\x04", 20, self.flags, self.method, 0, 0x21,
            crc, packed, unpacked, len(name), 0,
        ) + name  # fmt: skip

    def local_size(self) -> int:
        return len(self.local_header())

    def central_header(self, offset: int) -> bytes:
        crc, packed, unpacked = self._sizes()
        return struct.pack(
            "<4s4H2H3I5HII", b"PK\x01\x02", self.made_by, 20, self.flags, self.method, 0,
            0x21, crc, packed, unpacked, len(self.name), 0, 0, 0, 0, self.external, offset,
        ) + self.name  # fmt: skip


def _eocd(count: int, cd_len: int, cd_off: int) -> bytes:
    return struct.pack("<4s4HIIH", b"PK\x05\x06", 0, 0, count, count, cd_len, cd_off, 0)


def raw_zip(entries: Sequence[RawEntry], offsets: Sequence[int] | None = None) -> bytes:
    """A zip of ``entries`` written in order; ``offsets`` overrides where the central
    directory says each entry's local header is."""
    out = bytearray()
    real: list[int] = []
    for e in entries:
        real.append(len(out))
        out += e.local_header() + e.data
    cd_off = len(out)
    for e, off in zip(entries, offsets or real, strict=True):
        out += e.central_header(off)
    out += _eocd(len(entries), len(out) - cd_off, cd_off)
    return bytes(out)


def overlap_bomb(entries: int, kernel_mib: int) -> bytes:
    """A non-recursive zip bomb after David Fifield: one kernel of ``kernel_mib`` MiB of
    deflated zeros, and ``entries`` central-directory records whose local headers are
    quoted in each other's data, so every entry's data runs to the end of the kernel."""
    length, pieces = deflate_zeros(kernel_mib)
    kernel = b"".join(pieces)
    crc = zeros_crc(kernel_mib)
    names = [f"{i:04d}".encode() for i in range(entries)]
    header_len = 30 + 4
    out = bytearray()
    cd = bytearray()
    for i, name in enumerate(names):
        # The rest of the headers and the kernel, all of it counted as this entry's data.
        packed = (entries - i - 1) * header_len + length
        e = RawEntry(name, b"", method=8, crc=crc, unpacked=kernel_mib * MiB, packed=packed)
        cd += e.central_header(len(out))
        out += e.local_header()
    out += kernel
    cd_off = len(out)
    out += cd + _eocd(entries, len(cd), cd_off)
    return bytes(out)
