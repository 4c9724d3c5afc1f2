"""The signature engine: known-bad SHA-256 lists (shipped and the user's) and the EICAR
test file by its official definition, whatever the block sizes."""

from __future__ import annotations

import hashlib
import itertools
import os
from importlib.resources import files
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._errors import ConfigError
from splitstore.scanning import Finding
from splitstore.scanning._signatures import SignatureEngine, load_hash_list

from .samples_yara import eicar


def scan(engine: SignatureEngine, data: bytes, cuts: list[int] | None = None) -> list[Finding]:
    """Feed ``data`` in blocks split at ``cuts`` (one block if None)."""
    session = engine.session("sample", len(data))
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts or [])})
    for start, end in itertools.pairwise(bounds):
        session.feed(memoryview(data)[start:end])
    return session.finish(None)


def rules(found: list[Finding]) -> set[tuple[str, str]]:
    return {(f.category, f.rule) for f in found}


@pytest.fixture(scope="module")
def engine() -> SignatureEngine:
    return SignatureEngine()


def test_eicar_file_is_a_test_signature_and_known_bad(engine: SignatureEngine) -> None:
    found = scan(engine, eicar())
    assert rules(found) == {
        ("test-signature", "EICAR-Test-File"),
        ("known-bad", "EICAR-Test-File"),
    }
    test_sig = next(f for f in found if f.category == "test-signature")
    assert test_sig.offset == 0
    assert test_sig.engine == "signatures"
    known = next(f for f in found if f.category == "known-bad")
    assert hashlib.sha256(eicar()).hexdigest() in known.detail


@pytest.mark.parametrize("tail", [b"\r\n", b" ", b"\t\t", b"\x1a", b"\n" * 60, b" \t\r\n\x1a" * 12])
def test_eicar_with_trailing_whitespace_up_to_128_bytes(
    engine: SignatureEngine, tail: bytes
) -> None:
    data = eicar() + tail
    assert len(data) <= 128
    # Another file, so another hash: only the definition recognises it.
    assert rules(scan(engine, data)) == {("test-signature", "EICAR-Test-File")}


@pytest.mark.parametrize(
    "data",
    [
        eicar() + b" " * 61,  # 129 bytes: one too many
        eicar() + b"\r\nX",  # something other than whitespace follows
        eicar() + b"\0",
        b" " + eicar(),  # not at the start
        eicar()[:-1],
        eicar().lower(),
    ],
    ids=["too-long", "text-after", "nul-after", "not-at-start", "truncated", "lowercase"],
)
def test_not_the_eicar_file(engine: SignatureEngine, data: bytes) -> None:
    assert scan(engine, data) == []


def test_clean_files_have_no_findings(engine: SignatureEngine) -> None:
    assert scan(engine, b"") == []
    assert scan(engine, b"hello world\n") == []
    assert scan(engine, os.urandom(300_000), cuts=[1, 4096, 70_000]) == []


@settings(max_examples=60, deadline=None)
@given(
    tail=st.binary(max_size=80) | st.sampled_from([b"", b"\r\n", b" " * 60]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_same_result_whatever_the_block_sizes(tail: bytes, cuts: list[int]) -> None:
    engine = SignatureEngine()
    data = eicar() + tail
    assert scan(engine, data, cuts) == scan(engine, data)


def test_user_hash_list(tmp_path: Path) -> None:
    bad, worse, other = b"bad file\n", b"worse file\n", b"something else"
    listing = tmp_path / "bad.sha256"
    listing.write_text(
        "# my list\n"
        "\n"
        f"{hashlib.sha256(bad).hexdigest()}  Bad-Thing\n"
        f"  {hashlib.sha256(worse).hexdigest().upper()}\n"
        f"{hashlib.sha256(other).hexdigest()} *other.bin\n"
    )
    engine = SignatureEngine([listing])
    found = scan(engine, bad)
    assert rules(found) == {("known-bad", "Bad-Thing")}
    assert str(listing) in found[0].detail
    assert rules(scan(engine, worse)) == {
        ("known-bad", "sha256:" + hashlib.sha256(worse).hexdigest())
    }
    assert rules(scan(engine, other)) == {("known-bad", "other.bin")}
    # The shipped list is still in use.
    assert ("known-bad", "EICAR-Test-File") in rules(scan(engine, eicar()))
    assert scan(engine, b"bad file") == []


def test_describe_names_the_lists_in_use(tmp_path: Path) -> None:
    shipped = SignatureEngine().describe()
    assert shipped["version"]
    assert len(shipped["rules"]) == 64
    listing = tmp_path / "mine.txt"
    listing.write_text("a" * 64 + "\n")
    mine = SignatureEngine([listing]).describe()
    assert int(mine["hashes"]) == int(shipped["hashes"]) + 1
    assert mine["rules"] != shipped["rules"]


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("# fine\n" + "a" * 64 + "\nnot-a-hash name\n", 3),
        ("a" * 63 + "\n", 1),
        ("a" * 65 + "\n", 1),
        ("g" * 64 + "\n", 1),
        ("\n\n" + "a" * 64 + ",name\n", 3),
    ],
    ids=["word", "short", "long", "not-hex", "comma"],
)
def test_bad_hash_line_names_file_and_line(tmp_path: Path, content: str, line: int) -> None:
    listing = tmp_path / "bad-list.txt"
    listing.write_text(content)
    with pytest.raises(ConfigError) as info:
        SignatureEngine([listing])
    message = str(info.value)
    assert str(listing) in message
    assert f"line {line}" in message
    assert "\n" not in message


def test_hash_list_that_is_not_text_or_missing(tmp_path: Path) -> None:
    binary = tmp_path / "binary.sha256"
    binary.write_bytes(b"a" * 64 + b"\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.sha256, line 2"):
        SignatureEngine([binary])
    with pytest.raises(ConfigError, match="cannot read hash list"):
        SignatureEngine([tmp_path / "missing.sha256"])


def test_load_hash_list_keeps_the_first_name() -> None:
    digest = "ab" * 32
    parsed = load_hash_list([f"{digest} first".encode(), f"{digest.upper()} second".encode()], "x")
    assert parsed == {digest: "first"}


def test_shipped_list_describes_eicar_by_hash_only() -> None:
    shipped = (files("splitstore.scanning") / "data" / "known-bad.sha256").read_bytes()
    assert hashlib.sha256(eicar()).hexdigest().encode() in shipped
    assert eicar() not in shipped
