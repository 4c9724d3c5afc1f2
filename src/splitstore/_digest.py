"""Stripe digests: the hash a server and the client each take of a stripe's bytes.

A digest is written ``ALGORITHM:HEX``, as OCI content digests are, so every place that
keeps one (a server's answer, its ``.meta`` file, a record, a manifest) says how it was
made. New stripes are hashed with BLAKE3, a cryptographic hash about four times faster
than SHA-256 here (one core, with SHA-NI against AVX-512): a store hashes every byte of
ciphertext twice, once in the client and once in the server that receives it, so this
choice is a fifth of a store's CPU. Stripes stored by splitstore before 0.2 carry SHA-256
digests (``sha256:HEX``, written as a bare ``sha256`` field then); they are still read,
checked and verified with SHA-256. The whole file's hash in a manifest stays SHA-256: it
is what users compare with ``sha256sum`` and what the scanner's signature lists use.
A scanned store also hashes the file twice with BLAKE3 (``new_check_hasher``), in its
scan and in its upload, to tell that it sent the bytes it scanned.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Final, Protocol

from blake3 import blake3

__all__ = [
    "STRIPE_ALGORITHM",
    "Hasher",
    "from_sha256_hex",
    "hasher_for",
    "is_digest",
    "is_new_digest",
    "new_check_hasher",
    "new_stripe_hasher",
    "stripe_digest",
]

#: The algorithm of every stripe digest this version writes.
STRIPE_ALGORITHM: Final = "blake3"
_DIGEST = re.compile(r"(blake3|sha256):[0-9a-f]{64}")


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


_FACTORIES: dict[str, Callable[[], Hasher]] = {"blake3": blake3, "sha256": hashlib.sha256}


class _Named:
    """A hasher that remembers its algorithm, so its digest can name it."""

    __slots__ = ("_h", "algorithm")

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        # blake3's own threads stay off: a store already keeps every core busy.
        self._h: Hasher = _FACTORIES[algorithm]()

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        self._h.update(data)

    def digest(self) -> str:
        hex_digest: str = self._h.hexdigest()
        return f"{self.algorithm}:{hex_digest}"


def new_check_hasher() -> Hasher:
    """A hasher to tell whether two reads of a file gave the same bytes (BLAKE3: about
    four times SHA-256's speed, with the same collision strength)."""
    return blake3()


def new_stripe_hasher() -> _Named:
    """A hasher for a new stripe; ``digest()`` gives ``blake3:HEX``."""
    return _Named(STRIPE_ALGORITHM)


def hasher_for(digest: str) -> _Named:
    """A hasher of the algorithm ``digest`` was made with, to check stored bytes against it."""
    if not is_digest(digest):
        raise ValueError(f"not a stripe digest: {digest!r}")
    return _Named(digest.partition(":")[0])


def stripe_digest(data: bytes | bytearray | memoryview) -> str:
    """The digest of a whole stripe held in memory (small stripes, batches)."""
    h = new_stripe_hasher()
    h.update(data)
    return h.digest()


def from_sha256_hex(value: object) -> str | None:
    """A digest from the bare SHA-256 hex of older records, metas and manifests; None if
    ``value`` is not 64 lowercase hex digits."""
    if not isinstance(value, str):
        return None
    digest = "sha256:" + value
    return digest if is_digest(digest) else None


def is_digest(value: object) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def is_new_digest(value: object) -> bool:
    """A digest of the algorithm new stripes are hashed with."""
    return is_digest(value) and str(value).startswith(STRIPE_ALGORITHM + ":")
