"""The crypto module: round trips, binding to place, and one failure for every tamper."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._crypto import (
    SEGMENT_SIZE,
    TAG_SIZE,
    DecryptionFailed,
    PayloadCipher,
    ciphertext_size,
    derive_key,
    key_id,
    manifest_key_id,
    new_file_key,
    object_id,
    open_manifest,
    plaintext_size,
    seal_manifest,
)

MASTER = bytes(range(32))
OID, OID2 = "1" * 64, "2" * 64
VID, VID2 = "a" * 32, "b" * 32


def test_subkeys_differ_by_purpose_and_context() -> None:
    keys = {derive_key(MASTER, "a"), derive_key(MASTER, "b"), derive_key(MASTER, "a", b"x")}
    assert len(keys) == 3
    assert derive_key(MASTER, "a") == derive_key(MASTER, "a")


def test_object_ids_are_keyed() -> None:
    a = object_id(derive_key(MASTER, "id"), "photos/x.jpg")
    b = object_id(derive_key(bytes(32), "id"), "photos/x.jpg")
    assert len(a) == 64
    assert a != b


def test_segments_roundtrip_and_bind_to_place() -> None:
    key = new_file_key()
    cipher = PayloadCipher(key, OID, VID)
    sealed = cipher.seal(3, b"hello", last=False)
    assert len(sealed) == 5 + TAG_SIZE
    assert cipher.open(3, sealed, last=False) == b"hello"
    for index, last, other in [
        (4, False, cipher),  # reordered
        (3, True, cipher),  # claimed last: truncation detection
        (3, False, PayloadCipher(key, OID2, VID)),  # another object
        (3, False, PayloadCipher(key, OID, VID2)),  # another version
        (3, False, PayloadCipher(new_file_key(), OID, VID)),  # another key
    ]:
        with pytest.raises(DecryptionFailed):
            other.open(index, sealed, last=last)
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(DecryptionFailed):
        cipher.open(3, flipped, last=False)


def test_manifest_envelope() -> None:
    sealed = seal_manifest(MASTER, OID, b'{"name": "x"}')
    assert manifest_key_id(sealed) == key_id(MASTER)
    assert open_manifest(MASTER, OID, sealed) == b'{"name": "x"}'
    assert seal_manifest(MASTER, OID, b"m") != seal_manifest(MASTER, OID, b"m")  # fresh salt
    with pytest.raises(DecryptionFailed):
        open_manifest(MASTER, OID2, sealed)  # moved to another object
    with pytest.raises(DecryptionFailed):
        open_manifest(bytes(32), OID, sealed)  # wrong key
    with pytest.raises(DecryptionFailed):
        open_manifest(MASTER, OID, sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(DecryptionFailed):
        open_manifest(MASTER, OID, b"{}")
    assert manifest_key_id(b"{}") is None


@settings(max_examples=300)
@given(st.integers(0, 10 * SEGMENT_SIZE + 5))
def test_sizes_invert(size: int) -> None:
    assert plaintext_size(ciphertext_size(size)) == size


def test_sizes_of_edges() -> None:
    assert ciphertext_size(0) == TAG_SIZE  # an empty file still has its last segment
    assert ciphertext_size(SEGMENT_SIZE) == SEGMENT_SIZE + TAG_SIZE
    assert ciphertext_size(SEGMENT_SIZE + 1) == SEGMENT_SIZE + 1 + 2 * TAG_SIZE
    for bad in (0, 5, SEGMENT_SIZE + TAG_SIZE + 3):
        with pytest.raises(ValueError, match="ciphertext"):
            plaintext_size(bad)
