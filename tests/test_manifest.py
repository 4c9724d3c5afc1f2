"""The manifest and names: strict parsing, since servers may hand back anything."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitstore import IntegrityError, InvalidNameError
from splitstore._crypto import ciphertext_size
from splitstore._manifest import ENCRYPTED_FORMAT, PAYLOAD_ENCRYPTION, Manifest, StripeInfo
from splitstore._names import is_object_id, object_id_for, validate_name
from splitstore._stripes import stripe_lengths

H = "ab" * 32


def sample(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "a/b.txt",
        "size": 3000,
        "chunk_size": 1024,
        "sha256": H,
        "version_id": "c" * 32,
        "created_ns": 1,
        "stripes": (StripeInfo("https", 1976, H), StripeInfo("tcp", 1024, H)),
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
        lambda d: d.update(stripes=[["https", 1976, H], *d["stripes"][1:]]),
        lambda d: d["stripes"][0].update(length=1976.0),
        lambda d: d["stripes"][0].update(length=True),
        lambda d: d["stripes"][0].update(server=5),
        lambda d: d["stripes"][0].update(sha256=5),
        lambda d: d["stripes"][0].pop("sha256"),
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
    doc["format"] = 3
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
        format=ENCRYPTED_FORMAT,
        encryption=PAYLOAD_ENCRYPTION,
        padded_size=size,
        file_key="11" * 32,
        stripes=tuple(
            StripeInfo(kind, length, H)
            for kind, length in zip(("https", "tcp"), stripe_lengths(stored, 1024, 2), strict=True)
        ),
    )


def test_encrypted_manifest_roundtrips() -> None:
    m = encrypted_sample()
    assert Manifest.from_bytes(m.to_bytes()) == m


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
