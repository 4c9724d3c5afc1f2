"""Stripe digests: BLAKE3 for what is stored now, SHA-256 still read for what was stored before."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from splitstore import Client, IntegrityError
from splitstore._digest import (
    from_sha256_hex,
    hasher_for,
    is_digest,
    new_stripe_hasher,
    stripe_digest,
)
from splitstore._manifest import ENCRYPTED_FORMAT, MANIFEST_FORMAT, StripeInfo

from .conftest import LiveServers
from .test_faults import KINDS, fetched, write_random

# Published test vectors: the empty input.
BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_new_stripes_get_named_blake3_digests() -> None:
    assert stripe_digest(b"") == "blake3:" + BLAKE3_EMPTY
    h = new_stripe_hasher()
    for piece in (b"ab", bytearray(b"cd"), memoryview(b"ef")):
        h.update(piece)
    assert h.digest() == stripe_digest(b"abcdef")


def test_a_digest_is_checked_with_the_algorithm_it_names() -> None:
    old = from_sha256_hex(SHA256_EMPTY)
    assert old == "sha256:" + SHA256_EMPTY
    assert hasher_for(old).digest() == old
    assert hasher_for(stripe_digest(b"x")).algorithm == "blake3"
    for bad in ("md5:" + "0" * 64, "blake3:" + "0" * 63, "0" * 64, "", "sha256:" + "G" * 64):
        assert not is_digest(bad)
        with pytest.raises(ValueError, match="not a stripe digest"):
            hasher_for(bad)
    for bad_hex in ("sha256:" + "0" * 64, "0" * 63, "AB" * 32, 5, None):
        assert from_sha256_hex(bad_hex) is None


def make_legacy(servers: LiveServers, name: str) -> None:
    """Rewrite what both servers hold for ``name`` as splitstore 0.1 wrote it: manifest
    format 1 or 2 with bare SHA-256s of the stripes (sealed once, the same on both),
    records with ``stripe_sha256``, and .meta files with ``sha256``."""
    keyring = servers.keyring
    oid = keyring.object_id(name)
    folders = {kind: servers.object_dir(kind, name) for kind in KINDS}
    docs = {kind: json.loads((f / "record.json").read_text()) for kind, f in folders.items()}
    stripes = {
        kind: (folders[kind] / f"{docs[kind]['current']['version_id']}.stripe").read_bytes()
        for kind in KINDS
    }
    sha = {kind: hashlib.sha256(stripe).hexdigest() for kind, stripe in stripes.items()}
    sealed = base64.b64decode(docs[KINDS[0]]["current"]["manifest"])
    manifest = keyring.open(oid, sealed, KINDS[0], name)
    legacy = dataclasses.replace(
        manifest,
        format=ENCRYPTED_FORMAT if manifest.encrypted else MANIFEST_FORMAT,
        stripes=tuple(
            StripeInfo(s.server, s.length, "sha256:" + sha[s.server]) for s in manifest.stripes
        ),
    )
    envelope = base64.b64encode(keyring.seal(oid, legacy)).decode()
    for kind in KINDS:
        current = docs[kind]["current"]
        current["manifest"] = envelope
        del current["stripe_digest"]
        current["stripe_sha256"] = sha[kind]
        meta = {"length": len(stripes[kind]), "sha256": sha[kind]}
        (folders[kind] / f"{current['version_id']}.meta").write_text(json.dumps(meta))
        (folders[kind] / "record.json").write_text(json.dumps(docs[kind]))


@pytest.mark.parametrize("setup", ["servers", "plain_servers"])
def test_files_stored_before_stripe_digests_fetch_verify_and_name_a_damaged_server(
    request: pytest.FixtureRequest, tmp_path: Path, setup: str
) -> None:
    servers: LiveServers = request.getfixturevalue(setup)
    data = write_random(tmp_path / "in", 70_000)
    with servers.client() as client:
        client.store(tmp_path / "in", "old")
    make_legacy(servers, "old")
    # Both servers' records and the manifest now say what an older splitstore wrote.
    record = json.loads((servers.object_dir("tcp", "old") / "record.json").read_text())
    assert "stripe_sha256" in record["current"]
    oid, sealed = servers.keyring.object_id("old"), base64.b64decode(record["current"]["manifest"])
    assert servers.keyring.open(oid, sealed, "tcp", "old").format in (1, 2)

    with Client(servers.config) as client:
        assert fetched(client, "old", tmp_path) == data
        client.verify("old")
        assert client.stat("old").sha256 == hashlib.sha256(data).hexdigest()
        assert [info.name for info in client.list()] == ["old"]
        # Small files go in batches (get_records, get_stripes): old records there too.
        (tmp_path / "many").mkdir()
        client.fetch_many(["old"], tmp_path / "many")
        assert (tmp_path / "many" / "old").read_bytes() == data

        # A damaged old stripe is found, and the server holding it named, by its SHA-256.
        stripe = servers.stripe_path("tcp", "old")
        raw = bytearray(stripe.read_bytes())
        raw[100] ^= 1
        stripe.write_bytes(raw)
        with pytest.raises(IntegrityError, match="tcp server") as info:
            client.verify("old")
        assert info.value.server is not None
        assert "tcp" in info.value.server

        # Storing it again writes a new version with BLAKE3 digests over the old one.
        client.store(tmp_path / "in", "old")
        record = json.loads((servers.object_dir("tcp", "old") / "record.json").read_text())
        assert record["current"]["stripe_digest"].startswith("blake3:")
        assert "stripe_sha256" in record["previous"]  # kept as it was written
        assert fetched(client, "old", tmp_path) == data
        client.verify("old")
