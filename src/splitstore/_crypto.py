"""All of splitstore's cryptography, on top of the ``cryptography`` package.

This module is the only importer of ``cryptography``'s primitives (certificates aside).
It offers a handful of calls and one failure, ``DecryptionFailed``:

- ``derive_key``: HKDF-SHA256 subkeys of the master key, one per purpose.
- ``object_id``: the keyed id a server stores a name under (HMAC-SHA256).
- ``PayloadCipher``: AES-256-GCM over 64 KiB segments of a file, STREAM-style nonces
  (11-byte big-endian segment counter and a last-segment flag byte, as in age), with a
  fresh random key per stored version, bound to the object id and version id.
- ``seal_manifest`` / ``open_manifest``: AES-256-GCM envelope of a manifest, bound to its
  object id, naming the master key it was sealed with.

The formats are specified in docs/format.md; the reasoning in docs/security.md.
"""

from __future__ import annotations

import hmac
import os
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_SIZE",
    "SEGMENT_SIZE",
    "TAG_SIZE",
    "DecryptionFailed",
    "PayloadCipher",
    "ciphertext_size",
    "derive_key",
    "key_id",
    "manifest_key_id",
    "new_file_key",
    "object_id",
    "open_manifest",
    "padme",
    "plaintext_size",
    "seal_manifest",
    "segment_count",
]

KEY_SIZE = 32
# 64 KiB segments, as age and rclone use: the AEAD overhead is 0.02%, and one damaged
# segment names a 64 KiB range of the file.
SEGMENT_SIZE = 64 * 1024
TAG_SIZE = 16
NONCE_SIZE = 12
# The counter leaves room for 2**88 segments; a file is limited to 2**53 bytes anyway.
_COUNTER_BYTES = 11
MANIFEST_MAGIC = b"SSM\x02"
KEY_ID_SIZE = 8
# Each envelope gets its own key from a random salt, so no (key, nonce) pair can repeat
# however many manifests a master key seals.
SALT_SIZE = 16
_ZERO_NONCE = bytes(NONCE_SIZE)
_MANIFEST_HEADER = len(MANIFEST_MAGIC) + KEY_ID_SIZE + SALT_SIZE


class DecryptionFailed(Exception):
    """The ciphertext is not what was sealed with this key for this place (or the key is wrong)."""


def derive_key(master: bytes, purpose: str, context: bytes = b"") -> bytes:
    """A 32-byte subkey of ``master`` for one purpose; different purposes never share keys."""
    info = b"splitstore/v1/" + purpose.encode() + b"\x00" + context
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(master)


def key_id(master: bytes) -> bytes:
    """A short public fingerprint of a master key, so a wrong key is named, not guessed at."""
    return derive_key(master, "key-id")[:KEY_ID_SIZE]


def object_id(id_key: bytes, name: str) -> str:
    """The id a server stores ``name`` under: says nothing of the name without the key."""
    return hmac.new(id_key, name.encode("utf-8"), sha256).hexdigest()


def new_file_key() -> bytes:
    """A fresh random key for one stored version; never reused across files or versions."""
    return os.urandom(KEY_SIZE)


def segment_count(size: int) -> int:
    """Segments of a ``size``-byte plaintext; an empty one still has its (empty) last segment."""
    return max(1, -(-size // SEGMENT_SIZE))


def ciphertext_size(size: int) -> int:
    return size + TAG_SIZE * segment_count(size)


def plaintext_size(cipher_size: int) -> int:
    """Inverse of ciphertext_size; ValueError for a size no plaintext encrypts to."""
    full, rest = divmod(cipher_size, SEGMENT_SIZE + TAG_SIZE)
    if rest == 0 and full > 0:
        return full * SEGMENT_SIZE
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise ValueError("not a valid ciphertext size")
    return full * SEGMENT_SIZE + rest - TAG_SIZE


def padme(size: int) -> int:
    """``size`` rounded up by Padme (PURBs, Nikitin et al. 2019): at most ~12% larger, and
    a padded size reveals only O(log log size) bits of the real one."""
    if size < 2:
        return size
    exponent = size.bit_length() - 1  # floor(log2(size))
    mantissa_bits = exponent.bit_length()  # floor(log2(exponent)) + 1
    mask = (1 << (exponent - mantissa_bits)) - 1
    return (size + mask) & ~mask


class PayloadCipher:
    """Seals and opens the segments of one stored version of one object."""

    def __init__(self, file_key: bytes, object_id: str, version_id: str) -> None:
        context = bytes.fromhex(object_id) + bytes.fromhex(version_id)
        self._aead = AESGCM(derive_key(file_key, "payload", context))

    @staticmethod
    def _nonce(index: int, last: bool) -> bytes:
        return index.to_bytes(_COUNTER_BYTES, "big") + (b"\x01" if last else b"\x00")

    def seal(self, index: int, plaintext: bytes | memoryview, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, last), plaintext, None)

    def open(self, index: int, ciphertext: bytes | memoryview, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise DecryptionFailed(f"segment {index} does not authenticate") from None

    # The _into forms write into a caller's buffer (len(plaintext) + TAG_SIZE bytes, or
    # len(ciphertext) - TAG_SIZE): streaming then allocates nothing per segment.

    def seal_into(self, index: int, plaintext: memoryview, last: bool, out: memoryview) -> None:
        self._aead.encrypt_into(self._nonce(index, last), plaintext, None, out)

    def open_into(self, index: int, ciphertext: memoryview, last: bool, out: memoryview) -> None:
        """Open into ``out``; on DecryptionFailed, what ``out`` holds must not be used."""
        try:
            self._aead.decrypt_into(self._nonce(index, last), ciphertext, None, out)
        except InvalidTag:
            raise DecryptionFailed(f"segment {index} does not authenticate") from None


def seal_manifest(master: bytes, object_id: str, manifest: bytes) -> bytes:
    """MAGIC || key_id || salt || AES-GCM(manifest), the header and object id as AAD."""
    header = MANIFEST_MAGIC + key_id(master) + os.urandom(SALT_SIZE)
    aead = AESGCM(derive_key(master, "manifest", header[-SALT_SIZE:]))
    return header + aead.encrypt(_ZERO_NONCE, manifest, header + bytes.fromhex(object_id))


def manifest_key_id(envelope: bytes) -> bytes | None:
    """The key id an envelope names, or None if it is not a sealed manifest."""
    if len(envelope) < _MANIFEST_HEADER + TAG_SIZE or not envelope.startswith(MANIFEST_MAGIC):
        return None
    return envelope[len(MANIFEST_MAGIC) : len(MANIFEST_MAGIC) + KEY_ID_SIZE]


def open_manifest(master: bytes, object_id: str, envelope: bytes) -> bytes:
    if manifest_key_id(envelope) is None:
        raise DecryptionFailed("not a sealed manifest")
    header, body = envelope[:_MANIFEST_HEADER], envelope[_MANIFEST_HEADER:]
    aead = AESGCM(derive_key(master, "manifest", header[-SALT_SIZE:]))
    try:
        return aead.decrypt(_ZERO_NONCE, body, header + bytes.fromhex(object_id))
    except InvalidTag:
        raise DecryptionFailed("the manifest does not authenticate") from None
