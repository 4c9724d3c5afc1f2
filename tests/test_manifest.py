"""The manifest and names: strict parsing, since servers may hand back anything."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitstore import IntegrityError, InvalidNameError
from splitstore._crypto import ciphertext_size
from splitstore._manifest import (
    ENCRYPTED_FORMAT,
    MANIFEST_FORMAT,
    PAYLOAD_ENCRYPTION,
    Manifest,
    StripeInfo,
)
from splitstore._names import is_object_id, object_id_for, validate_name
from splitstore._stripes import stripe_lengths

H = "ab" * 32
D = "blake3:" + "cd" * 32  # a stripe digest


def sample(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "a/b.txt",
        "size": 3000,
        "chunk_size": 1024,
        "sha256": H,
        "version_id": "c" * 32,
        "created_ns": 1,
        "stripes": (StripeInfo("https", 1976, D), StripeInfo("tcp", 1024, D)),
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_roundtrip_is_canonical() -> None:
    m = sample()
    raw = m.to_bytes()
    assert Manifest.from_bytes(raw) == m
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()


@given(
    st.text(min_size=1, max_size=200).filter(
        lambda s: all(ord(c) >= 32 and not 0x7F <= ord(c) <= 0x9F for c in s)
    )
)
def test_any_printable_name_roundtrips(name: str) -> None:
    m = sample(name=name)
    assert Manifest.from_bytes(m.to_bytes()).name == name
    assert is_object_id(object_id_for(name))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(size=-1),
        lambda d: d.update(size="3000"),
        lambda d: d.update(size=True),
        lambda d: d.update(sha256="xyz"),
        lambda d: d.update(version_id="../x"),
        lambda d: d.update(encryption="rot13"),
        lambda d: d.pop("name"),
        lambda d: d["stripes"].pop(),
        lambda d: d["stripes"][0].update(length=5),
        # Each field's type, now checked in one place (Manifest.__post_init__).
        lambda d: d.update(format=True),
        lambda d: d.update(format=1.0),
        lambda d: d.update(name=5),
        lambda d: d.update(name="a\x00b"),
        lambda d: d.update(chunk_size="1024"),
        lambda d: d.update(created_ns=1.5),
        lambda d: d.update(encryption=None),
        lambda d: d.update(stripes={"https": 1}),
        lambda d: d.update(stripes=[["https", 1976, D], *d["stripes"][1:]]),
        lambda d: d["stripes"][0].update(length=1976.0),
        lambda d: d["stripes"][0].update(length=True),
        lambda d: d["stripes"][0].update(server=5),
        lambda d: d["stripes"][0].update(digest=5),
        lambda d: d["stripes"][0].pop("digest"),
        lambda d: d["stripes"][0].update(digest="cd" * 32),  # no algorithm
        lambda d: d["stripes"][0].update(digest="blake3:" + "CD" * 32),
        lambda d: d["stripes"][0].update(digest="blake3:" + "cd" * 31),
        lambda d: d["stripes"][0].update(digest="md5:" + "cd" * 32),
        # Format 3 stripes are BLAKE3; SHA-256 ones belong to formats 1 and 2 only.
        lambda d: d["stripes"][0].update(digest="sha256:" + H),
        lambda d: d.update(format=1),  # format 1 has bare SHA-256s, not digests
        lambda d: d.update(scan=[]),
    ],
)
def test_malformed_manifests_are_integrity_errors(mutate: object) -> None:
    doc = json.loads(sample().to_bytes())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(json.dumps(doc).encode(), server="tcp server at x")


def test_unknown_format_asks_for_an_upgrade() -> None:
    doc = json.loads(sample().to_bytes())
    doc["format"] = 4
    with pytest.raises(IntegrityError, match="upgrade"):
        Manifest.from_bytes(json.dumps(doc).encode())


@pytest.mark.parametrize("raw", [b"", b"[]", b"\xff\xfe", b"{" * 10, b"x" * 100_000])
def test_garbage_is_an_integrity_error(raw: bytes) -> None:
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(raw)


@pytest.mark.parametrize("name", ["", "a\x00b", "line\nbreak", "x" * 4097, "é" * 2049])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("name", ["/", "..", "../../etc/passwd", "a b", "ü" * 1000, "x" * 4096])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    assert object_id_for(name) != object_id_for(name[:-1] + "~")


def encrypted_sample() -> Manifest:
    size = 3000
    stored = ciphertext_size(size)
    return sample(
        size=size,
        encryption=PAYLOAD_ENCRYPTION,
        padded_size=size,
        file_key="11" * 32,
        stripes=tuple(
            StripeInfo(kind, length, D)
            for kind, length in zip(("https", "tcp"), stripe_lengths(stored, 1024, 2), strict=True)
        ),
    )


def test_encrypted_manifest_roundtrips() -> None:
    m = encrypted_sample()
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert m.encrypted
    assert json.loads(m.to_bytes())["format"] == 3


@pytest.mark.parametrize("fmt", [MANIFEST_FORMAT, ENCRYPTED_FORMAT])
def test_older_formats_with_bare_sha256_stripes_are_read(fmt: int) -> None:
    """Manifests written before stripe digests (formats 1 and 2) still open, their
    stripes' SHA-256s read as sha256: digests, and are written back byte for byte."""
    base = encrypted_sample() if fmt == ENCRYPTED_FORMAT else sample()
    doc = json.loads(base.to_bytes())
    doc["format"] = fmt
    for entry in doc["stripes"]:
        entry["sha256"] = H
        del entry["digest"]
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    m = Manifest.from_bytes(raw)
    assert (m.format, m.encrypted) == (fmt, fmt == ENCRYPTED_FORMAT)
    assert [s.digest for s in m.stripes] == ["sha256:" + H] * 2
    assert m.to_bytes() == raw
    for bad in ({"digest": D}, {"sha256": "sha256:" + H}, {"sha256": "xyz"}):
        broken = json.loads(raw)
        del broken["stripes"][0]["sha256"]
        broken["stripes"][0].update(bad)
        with pytest.raises(IntegrityError):
            Manifest.from_bytes(json.dumps(broken).encode())
    other = json.loads(raw)
    other["encryption"] = PAYLOAD_ENCRYPTION if fmt == MANIFEST_FORMAT else "none"
    with pytest.raises(IntegrityError):  # each old format stands for one way of storing
        Manifest.from_bytes(json.dumps(other).encode())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(padded_size="3000"),
        lambda d: d.update(padded_size=2999),  # smaller than the file
        lambda d: d.update(padded_size=None),
        lambda d: d.pop("padded_size"),
        lambda d: d.update(file_key="11" * 31),
        lambda d: d.update(file_key=None),
        lambda d: d.pop("file_key"),
        lambda d: d.update(encryption="none"),
    ],
)
def test_malformed_encrypted_manifests_are_integrity_errors(mutate: object) -> None:
    doc = json.loads(encrypted_sample().to_bytes())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(json.dumps(doc).encode())


DEEP = "[" * 1000 + "]" * 1000  # nested deep enough to exhaust the stack when printed
SCAN = {"verdict": "clean", "findings": [], "engines": {}, "size": 3000, "sha256": H}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(name="DEEP", scan=SCAN),
        lambda d: d.update(format="DEEP"),
        lambda d: d.update(scan={**SCAN, "verdict": "DEEP"}),
        lambda d: d.update(stripes=[]),
    ],
    ids=["deep name with a scan record", "deep format", "deep verdict", "no stripes"],
)
def test_hostile_manifests_are_integrity_errors(mutate: object) -> None:
    doc = json.loads(sample().to_bytes())
    mutate(doc)  # type: ignore[operator]
    raw = json.dumps(doc).replace('"DEEP"', DEEP).encode()
    with pytest.raises(IntegrityError):
        Manifest.from_bytes(raw)


def test_a_format_of_the_wrong_type_is_malformed_not_newer() -> None:
    doc = json.loads(sample().to_bytes())
    doc["format"] = True
    with pytest.raises(IntegrityError, match="malformed"):
        Manifest.from_bytes(json.dumps(doc).encode())
