"""A malicious server against an encrypted setup, and what a curious one can learn.

Each attack edits a server's files on disk the way a server that controls them could
(stripe, ``.meta`` and ``record.json`` kept consistent with each other, so the server
itself sees nothing wrong), then checks that the client refuses: the exact IntegrityError
(or RollbackError), one clear line naming the guilty server, no output file and no
``*.splitstore-part`` left behind, and ``verify`` failing too. test_faults.py covers plain
damage (flipped, cut, extended or deleted stripes, a lost record, a record swapped between
objects); this file covers what needs the encryption to be caught.

The leakage tests store a secret under a telling name and search every byte and every
file name both servers hold for it; the same search on a setup with encryption off must
find it, so the search is shown to work.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from splitstore import (
    Client,
    IntegrityError,
    NotFoundError,
    RollbackError,
    WrongKeyError,
)
from splitstore._client import _damaged_range
from splitstore._crypto import (
    KEY_ID_SIZE,
    MANIFEST_MAGIC,
    SALT_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    ciphertext_size,
)
from splitstore._digest import stripe_digest
from splitstore._keys import create_key_file
from splitstore._manifest import (
    DIGEST_FORMAT,
    ENCRYPTED_FORMAT,
    MANIFEST_FORMAT,
    PAYLOAD_ENCRYPTION,
    Manifest,
)
from splitstore._manifest import StripeInfo as ManifestStripe
from splitstore._names import object_id_for
from splitstore._payload import SegmentFailed
from splitstore._stripes import join_block, stripe_lengths

from .conftest import LiveServers
from .test_faults import KINDS, check_message, fetched, label, other, partials, write_random

CHUNK = 1024
SEALED_SEGMENT = SEGMENT_SIZE + TAG_SIZE


# -- helpers ---------------------------------------------------------------------------


def write_stripe(path: Path, data: bytes) -> None:
    """Replace a stripe as its server would: the .meta beside it says the new length and
    hash, so the server serves it without complaint."""
    path.write_bytes(data)
    meta = {"length": len(data), "digest": stripe_digest(data)}
    path.with_suffix(".meta").write_text(json.dumps(meta))


def read_record(servers: LiveServers, kind: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((servers.object_dir(kind, name) / "record.json").read_text())
    return doc


def write_record(servers: LiveServers, kind: str, name: str, doc: dict[str, Any]) -> None:
    (servers.object_dir(kind, name) / "record.json").write_text(json.dumps(doc))


def refused(
    client: Client,
    name: str,
    folder: Path,
    cls: type[IntegrityError],
    *mentions: str,
    server: str,
) -> str:
    """fetch and verify of ``name`` both raise exactly ``cls``, one line naming ``server``;
    nothing is written. Returns fetch's message."""
    dest = folder / "out"
    with pytest.raises(IntegrityError) as info:
        client.fetch(name, dest)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    message = check_message(info.value, repr(name), *mentions, server=server)
    assert not dest.exists()
    assert partials(folder) == []
    with pytest.raises(IntegrityError) as info:
        client.verify(name)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    check_message(info.value, repr(name), server=server)
    return message


def segment_of(stream_offset: int, stored: int) -> SegmentFailed:
    """The sealed segment holding byte ``stream_offset`` of a ``stored``-byte stream."""
    index = stream_offset // SEALED_SEGMENT
    start = index * SEALED_SEGMENT
    return SegmentFailed(index, start, min(start + SEALED_SEGMENT, stored))


def stream_offset(kind: str, stripe_offset: int) -> int:
    """Where byte ``stripe_offset`` of a server's stripe lies in the stored stream."""
    j, within = divmod(stripe_offset, CHUNK)
    return (2 * j + KINDS.index(kind)) * CHUNK + within


def snapshot(servers: LiveServers, name: str, into: Path) -> None:
    """Copy ``name``'s folder on both servers aside (a server's own backup)."""
    for kind in KINDS:
        shutil.copytree(servers.object_dir(kind, name), into / kind)


def put_back(servers: LiveServers, kind: str, name: str, saved: Path) -> None:
    """Make ``name``'s folder on ``kind`` exactly what was saved (record and stripes)."""
    folder = servers.object_dir(kind, name)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved / kind, folder)


# -- 1. chunks reordered within a stripe -----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_reordered_within_a_stripe(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    write_random(tmp_path / "in", 200_000)
    info = client.store(tmp_path / "in", "doc")
    stored = ciphertext_size(info.size)
    path = servers.stripe_path(kind, "doc")
    data = bytearray(path.read_bytes())
    a, b = 3, 70  # stripe chunks 4 and 71: segments 0 and 2 of the stream
    chunk_a, chunk_b = data[a * CHUNK : (a + 1) * CHUNK], data[b * CHUNK : (b + 1) * CHUNK]
    assert chunk_a != chunk_b
    data[a * CHUNK : (a + 1) * CHUNK], data[b * CHUNK : (b + 1) * CHUNK] = chunk_b, chunk_a
    assert len(data) == info.bytes_per_server[kind]
    write_stripe(path, bytes(data))
    where = _damaged_range(segment_of(stream_offset(kind, a * CHUNK), stored), CHUNK)
    assert "the first bad segment is #0," in where
    refused(client, "doc", tmp_path, IntegrityError, "damaged", where, server=label(servers, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_a_stripe_that_changes_length_before_it_is_hashed_again(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """When a segment fails, both stripes are read again to name the server: one that now
    announces another length is named at once, not read on for the length it made up."""
    write_random(tmp_path / "in", 300_000)
    client.store(tmp_path / "in", "doc")
    path = servers.stripe_path(kind, "doc")
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    write_stripe(path, bytes(data))

    def grow_once_read(done: int, total: int) -> None:
        if done == total:  # read whole: before it is read again, the stripe grows
            write_stripe(path, bytes(data) + bytes(1 << 20))

    with pytest.raises(IntegrityError) as info:
        client.fetch("doc", tmp_path / "out", progress=grow_once_read)
    check_message(info.value, "bytes where", "were stored", server=label(servers, kind))
    assert not (tmp_path / "out").exists()


# -- 2. the two servers' stripes swapped ------------------------------------------------

# 10,224 bytes seal to 10,240 (one segment and its tag): five whole rounds of 2 KiB, so
# both stripes are 5,120 bytes and each fits where the other was.
EQUAL_STRIPES = 5 * 2 * CHUNK - TAG_SIZE


def test_size_with_equal_stripes() -> None:
    assert stripe_lengths(ciphertext_size(EQUAL_STRIPES), CHUNK, 2) == [5 * CHUNK, 5 * CHUNK]


@pytest.mark.parametrize("what", ["stripes", "folders"])
def test_servers_stripes_swapped(
    servers: LiveServers, client: Client, tmp_path: Path, what: str
) -> None:
    """Both servers are at fault; the client names the first it checks (HTTPS)."""
    write_random(tmp_path / "in", EQUAL_STRIPES)
    info = client.store(tmp_path / "in", "doc")
    assert len(set(info.bytes_per_server.values())) == 1
    https, tcp = servers.object_dir("https", "doc"), servers.object_dir("tcp", "doc")
    if what == "stripes":
        a, b = servers.stripe_path("https", "doc"), servers.stripe_path("tcp", "doc")
        da, db = a.read_bytes(), b.read_bytes()
        write_stripe(a, db)
        write_stripe(b, da)
        says = "damaged"
    else:  # each server's whole folder (record, stripe, meta) moved to the other
        shutil.move(https, tmp_path / "held")
        shutil.move(tcp, https)
        shutil.move(tmp_path / "held", tcp)
        says = "does not match its manifest"
    message = refused(client, "doc", tmp_path, IntegrityError, says, server=label(servers, "https"))
    assert label(servers, "tcp") not in message


@pytest.mark.parametrize("kind", KINDS)
def test_server_serves_the_other_servers_stripe(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    write_random(tmp_path / "in", EQUAL_STRIPES)
    client.store(tmp_path / "in", "doc")
    theirs = servers.stripe_path(other(kind), "doc").read_bytes()
    write_stripe(servers.stripe_path(kind, "doc"), theirs)
    where = _damaged_range(SegmentFailed(0, 0, ciphertext_size(EQUAL_STRIPES)), CHUNK)
    assert where.endswith("chunks 1-10 counting from 1")
    refused(client, "doc", tmp_path, IntegrityError, "damaged", where, server=label(servers, kind))


# -- 3. another file's, or another version's, stripe ------------------------------------


@pytest.mark.parametrize("source", ["another file", "the previous version"])
@pytest.mark.parametrize("kind", KINDS)
def test_stripe_of_another_file_or_version(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str, source: str
) -> None:
    size = 20_000
    if source == "another file":
        write_random(tmp_path / "b", size)
        client.store(tmp_path / "b", "b")
        donor = servers.stripe_path(kind, "b")
        write_random(tmp_path / "a", size)
        client.store(tmp_path / "a", "doc")
    else:
        write_random(tmp_path / "v1", size)
        client.store(tmp_path / "v1", "doc")
        donor = tmp_path / "v1.stripe"
        shutil.copyfile(servers.stripe_path(kind, "doc"), donor)
        write_random(tmp_path / "v2", size)
        client.store(tmp_path / "v2", "doc")
    target = servers.stripe_path(kind, "doc")
    replacement = donor.read_bytes()
    assert len(replacement) == target.stat().st_size
    assert replacement != target.read_bytes()
    write_stripe(target, replacement)
    refused(client, "doc", tmp_path, IntegrityError, "damaged", "#0", server=label(servers, kind))
    if source == "another file":  # the donor itself is untouched
        assert fetched(client, "b", tmp_path / "check") == (tmp_path / "b").read_bytes()


# -- 4. rollback and replay ------------------------------------------------------------


def store_two_versions(
    servers: LiveServers, client: Client, tmp_path: Path
) -> tuple[bytes, bytes, Path]:
    """Store v1, copy both servers' folders aside, store v2; return both and the copy."""
    v1 = write_random(tmp_path / "v1", 9000)
    client.store(tmp_path / "v1", "doc")
    saved = tmp_path / "after-v1"
    snapshot(servers, "doc", saved)
    v2 = write_random(tmp_path / "v2", 11_000)
    client.store(tmp_path / "v2", "doc")
    return v1, v2, saved


def rolled_back_everywhere(servers: LiveServers, client: Client, tmp_path: Path) -> str:
    """Every operation that reads the record refuses; returns fetch's message."""
    https = label(servers, "https")
    message = refused(
        client, "doc", tmp_path, RollbackError, "older version", "rolled back", server=https
    )
    with pytest.raises(RollbackError) as info:
        client.stat("doc")
    check_message(info.value, server=label(servers, "https"))
    return message


def test_rollback_on_both_servers(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    """Both servers serve their folders as they were after v1 (records and stripes)."""
    _, _, saved = store_two_versions(servers, client, tmp_path)
    for kind in KINDS:
        put_back(servers, kind, "doc", saved)
    message = rolled_back_everywhere(servers, client, tmp_path)
    assert label(servers, "tcp") in message  # both are named; exc.server is the first
    # A new client on the same config (so the same state file) remembers v2 too.
    state = servers.config.state_path()
    assert state is not None
    assert state.exists()
    with servers.client() as fresh:
        rolled_back_everywhere(servers, fresh, tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_on_one_server_the_other_lost_the_file(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """``kind`` serves its folder as after v1; the other server holds nothing of the file."""
    _, _, saved = store_two_versions(servers, client, tmp_path)
    put_back(servers, kind, "doc", saved)
    shutil.rmtree(servers.object_dir(other(kind), "doc"))
    message = refused(client, "doc", tmp_path, RollbackError, "older", server=label(servers, kind))
    assert label(servers, other(kind)) not in message
    with servers.client() as fresh, pytest.raises(RollbackError) as info:
        fresh.stat("doc")
    check_message(info.value, server=label(servers, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_record_rolled_back_on_one_server_still_gives_v2(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """Only ``kind``'s record is the v1 one; it still has v2's stripe (it keeps any
    complete stripe), so v2, the newest both hold, is what fetch gives, and verify names
    the server that does not hold v2's manifest."""
    _, v2, saved = store_two_versions(servers, client, tmp_path)
    shutil.copyfile(saved / kind / "record.json", servers.object_dir(kind, "doc") / "record.json")
    with servers.client() as fresh:
        for c in (client, fresh):
            assert fetched(c, "doc", tmp_path / "check") == v2
            assert c.stat("doc").committed_on == (other(kind),)
            with pytest.raises(IntegrityError) as info:
                c.verify("doc")
            assert type(info.value) is IntegrityError
            check_message(info.value, "'doc'", "cut off", server=label(servers, kind))
    assert partials(tmp_path / "check") == []


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_on_one_server_is_not_served(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    """``kind`` serves its whole folder as after v1 (v2's stripe gone); the other server
    is intact. v2 cannot be read, and v1 is older than what this client stored: fetch
    must not fall back to it (it did before 5c07f31) but name the server that lost v2."""
    v1, _, saved = store_two_versions(servers, client, tmp_path)
    put_back(servers, kind, "doc", saved)
    bad = label(servers, kind)
    with servers.client() as fresh:  # the same state file
        for c in (client, fresh):
            message = refused(c, "doc", tmp_path, IntegrityError, server=bad)
            assert "no longer holds" in message
            assert label(servers, other(kind)) not in message
    # Only a client that never saw v2 (its own state file) may take v1: the documented
    # limit of a per-client memory.
    config = dataclasses.replace(servers.config, state_file=tmp_path / "elsewhere.state")
    with Client(config) as elsewhere:
        assert fetched(elsewhere, "doc", tmp_path / "check") == v1


@pytest.mark.parametrize("where", ["https", "tcp", "both"])
def test_deleted_file_served_again(
    servers: LiveServers, client: Client, tmp_path: Path, where: str
) -> None:
    write_random(tmp_path / "in", 6000)
    client.store(tmp_path / "in", "doc")
    saved = tmp_path / "before-delete"
    snapshot(servers, "doc", saved)
    client.delete("doc")
    with pytest.raises(NotFoundError):
        client.stat("doc")
    kinds = KINDS if where == "both" else [where]
    for kind in kinds:
        put_back(servers, kind, "doc", saved)
    guilty = label(servers, kinds[0])
    message = refused(
        client, "doc", tmp_path, RollbackError, "was deleted", "replayed", server=guilty
    )
    for kind in KINDS:
        assert (label(servers, kind) in message) == (kind in kinds)
    with servers.client() as fresh, pytest.raises(RollbackError) as info:
        fresh.fetch("doc", tmp_path / "out")
    check_message(info.value, "was deleted", server=guilty)
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


# -- 5. forged manifests ---------------------------------------------------------------


def forged_plain_manifest(servers: LiveServers, name: str, fmt: int, encrypted: bool) -> bytes:
    """An unsealed manifest of format ``fmt`` describing exactly the stripes both servers
    hold (in formats 1 and 2, by their bare SHA-256s, as older versions wrote them).

    An unencrypted one would have the client output the ciphertext stream as the file (a
    downgrade); an encrypted one in the clear names a file key the forger chose (here: the
    stream's own bytes cannot decrypt under it, but a forger could seal data of its own)."""
    records = [read_record(servers, kind, name)["current"] for kind in KINDS]
    stripes = [servers.stripe_path(kind, name).read_bytes() for kind in KINDS]
    stream = bytes(join_block(stripes, CHUNK))
    digests = [r["stripe_digest"] for r in records]
    if fmt != DIGEST_FORMAT:
        digests = ["sha256:" + hashlib.sha256(stripe).hexdigest() for stripe in stripes]
    common: dict[str, Any] = {
        "name": name,
        "chunk_size": CHUNK,
        "version_id": records[0]["version_id"],
        "created_ns": 2**62,  # newer than anything: it would win
        "format": fmt,
        "stripes": tuple(
            ManifestStripe(kind, r["stripe_length"], digest)
            for kind, r, digest in zip(KINDS, records, digests, strict=True)
        ),
    }
    if not encrypted:
        manifest = Manifest(size=len(stream), sha256=hashlib.sha256(stream).hexdigest(), **common)
    else:
        size = len(stream) - TAG_SIZE * (-(-len(stream) // SEALED_SEGMENT))
        assert ciphertext_size(size) == len(stream)
        manifest = Manifest(
            size=size,
            sha256="0" * 64,
            encryption=PAYLOAD_ENCRYPTION,
            padded_size=size,
            file_key="11" * 32,
            **common,
        )
    return manifest.to_bytes()


@pytest.mark.parametrize(
    ("fmt", "encrypted"),
    [
        (DIGEST_FORMAT, False),
        (DIGEST_FORMAT, True),
        (MANIFEST_FORMAT, False),
        (ENCRYPTED_FORMAT, True),
    ],
    ids=["unencrypted", "encrypted", "format1", "format2"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_forged_unsealed_manifest_is_refused(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str, fmt: int, encrypted: bool
) -> None:
    data = write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "doc")
    forged = forged_plain_manifest(servers, "doc", fmt, encrypted)
    doc = read_record(servers, kind, "doc")
    doc["current"]["manifest"] = base64.b64encode(forged).decode()
    write_record(servers, kind, "doc", doc)
    bad = label(servers, kind)
    refused(client, "doc", tmp_path, IntegrityError, "not sealed", "forged", server=bad)
    with pytest.raises(IntegrityError) as info:
        client.stat("doc")
    check_message(info.value, "not sealed", server=bad)
    # The listing leaves the forged copy out; the genuine one is still listed, and
    # storing again repairs the file.
    assert {i.name: i.committed_on for i in client.list()} == {"doc": (other(kind),)}
    client.store(tmp_path / "in", "doc")
    assert fetched(client, "doc", tmp_path / "check") == data


HEADER = len(MANIFEST_MAGIC) + KEY_ID_SIZE + SALT_SIZE
FLIPS: dict[str, tuple[Callable[[int], int], str]] = {
    "magic": (lambda n: 0, "not sealed"),
    "salt": (lambda n: len(MANIFEST_MAGIC) + KEY_ID_SIZE, "does not authenticate"),
    "body": (lambda n: HEADER + (n - HEADER - TAG_SIZE) // 2, "does not authenticate"),
    "tag": (lambda n: n - 1, "does not authenticate"),
}


def flip_manifest_byte(
    servers: LiveServers, kind: str, name: str, at: Callable[[int], int]
) -> None:
    doc = read_record(servers, kind, name)
    sealed = bytearray(base64.b64decode(doc["current"]["manifest"]))
    sealed[at(len(sealed))] ^= 0x01
    doc["current"]["manifest"] = base64.b64encode(bytes(sealed)).decode()
    write_record(servers, kind, name, doc)


@pytest.mark.parametrize("where", list(FLIPS))
@pytest.mark.parametrize("kind", KINDS)
def test_sealed_manifest_with_a_flipped_byte(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str, where: str
) -> None:
    write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "doc")
    at, says = FLIPS[where]
    flip_manifest_byte(servers, kind, "doc", at)
    refused(client, "doc", tmp_path, IntegrityError, says, server=label(servers, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_sealed_manifest_with_a_flipped_key_id_byte(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    write_random(tmp_path / "in", 5000)
    client.store(tmp_path / "in", "doc")
    flip_manifest_byte(servers, kind, "doc", lambda n: len(MANIFEST_MAGIC))
    refused(client, "doc", tmp_path, IntegrityError, server=label(servers, kind))


# -- 6. one damaged segment in the middle of a larger file -----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_segment_names_its_chunks(
    servers: LiveServers, client: Client, tmp_path: Path, kind: str
) -> None:
    data = write_random(tmp_path / "in", 1024 * 1024)
    client.store(tmp_path / "in", "big")
    stored = ciphertext_size(len(data))
    assert stored == 1024 * 1024 + 16 * TAG_SIZE
    path = servers.stripe_path(kind, "big")
    at = 300_000
    stripe = bytearray(path.read_bytes())
    stripe[at] ^= 0x80
    write_stripe(path, bytes(stripe))

    offset = stream_offset(kind, at)
    failed = segment_of(offset, stored)
    first = failed.start // CHUNK + 1
    last = (failed.end - 1) // CHUNK + 1
    assert first <= offset // CHUNK + 1 <= last  # the damaged chunk is in the range named
    expected = {
        # tcp byte 300,000: stripe chunk 292 (0-based), stream chunk 585, stream byte 600,032
        "tcp": "#9, stored bytes 589968-655519, chunks 577-641 counting from 1",
        # https byte 300,000: stream chunk 584, stream byte 599,008
        "https": "#9, stored bytes 589968-655519, chunks 577-641 counting from 1",
    }[kind]
    where = _damaged_range(failed, CHUNK)
    assert where.endswith(expected)
    assert f"chunks {first}-{last} " in where
    message = refused(
        client, "big", tmp_path, IntegrityError, "damaged", where, server=label(servers, kind)
    )
    assert label(servers, other(kind)) not in message
    # verify says the same range
    with pytest.raises(IntegrityError) as info:
        client.verify("big")
    check_message(info.value, f"chunks {first}-{last}", server=label(servers, kind))


# -- 7. a wrong master key -------------------------------------------------------------


@pytest.fixture
def wrong_key_client(servers: LiveServers, tmp_path: Path) -> Iterator[Client]:
    """The same servers and token, another master key (and its own state file)."""
    create_key_file(tmp_path / "other.key")
    config = dataclasses.replace(
        servers.config, key_file=tmp_path / "other.key", state_file=tmp_path / "other.state"
    )
    with Client(config) as c:
        yield c


def test_list_with_a_wrong_key(client: Client, wrong_key_client: Client, tmp_path: Path) -> None:
    data = write_random(tmp_path / "in", 3000)
    client.store(tmp_path / "in", "doc")
    client.store(tmp_path / "in", "notes/other.txt")
    with pytest.raises(WrongKeyError) as info:
        wrong_key_client.list()
    check_message(info.value, "another master key", "key import")
    # Once it has files of its own, the other key's are left out of its listing, and
    # storing the same name does not touch the file stored with the first key.
    mine = write_random(tmp_path / "mine", 1000)
    wrong_key_client.store(tmp_path / "mine", "doc")
    assert [i.name for i in wrong_key_client.list()] == ["doc"]
    assert fetched(wrong_key_client, "doc", tmp_path / "check") == mine
    assert fetched(client, "doc", tmp_path / "check") == data
    assert [i.name for i in client.list()] == ["doc", "notes/other.txt"]


@pytest.mark.parametrize("op", ["stat", "fetch", "verify"])
def test_name_with_a_wrong_key(
    client: Client, wrong_key_client: Client, tmp_path: Path, op: str
) -> None:
    write_random(tmp_path / "in", 3000)
    client.store(tmp_path / "in", "doc")
    calls: dict[str, Callable[[], object]] = {
        "stat": lambda: wrong_key_client.stat("doc"),
        "fetch": lambda: wrong_key_client.fetch("doc", tmp_path / "out"),
        "verify": lambda: wrong_key_client.verify("doc"),
    }
    with pytest.raises(WrongKeyError) as info:
        calls[op]()
    check_message(info.value, "another master key")
    assert not (tmp_path / "out").exists()
    assert partials(tmp_path) == []


# -- leakage: what a curious server holds ----------------------------------------------

SECRET_NAME = "secret-plans/quarterly-report.pdf"
SMALL_NAME = "secret-plans/board-minutes.txt"
SMALL_TEXT = b"Board minutes: the merger with Initech closes on 14 March; tell no one. " * 40
RUN = 32  # a plaintext run this long showing anywhere counts as a leak


def keys8(data: bytes, stride: int) -> npt.NDArray[np.uint64]:
    """The 8 bytes at every ``stride``-th offset of ``data``, as integers."""
    if len(data) < 8:
        return np.empty(0, dtype=np.uint64)
    if stride == 8:
        return np.frombuffer(data, dtype=np.uint64, count=len(data) // 8)
    arr = np.frombuffer(data, dtype=np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(arr, 8)[::stride]
    keys: npt.NDArray[np.uint64] = np.ascontiguousarray(windows).view(np.uint64).ravel()
    return keys


class Runs:
    """Finds RUN-byte runs of a plaintext, at any offset, in other bytes.

    A run of RUN >= 15 bytes holds a whole 8-byte block of the plaintext at an offset that
    is a multiple of 8. Those blocks are indexed (sorted, with numpy); every 8-byte window
    of a stored file, at every offset, is looked up; each hit is then widened byte by byte
    to the whole common run, which counts if it is RUN bytes or more. Rigorous (no run is
    missed) and quick: with random or encrypted bytes there are next to no hits."""

    def __init__(self, plaintext: bytes) -> None:
        self.plaintext = plaintext
        keys = keys8(plaintext, 8)
        self.order = np.argsort(keys)
        self.sorted = keys[self.order]

    def _run_at(self, blob: bytes, pos: int, off: int) -> int:
        """Length of the common run through blob[pos:pos+8] == plaintext[off:off+8]."""
        text, before, after = self.plaintext, 0, 8
        while before < min(pos, off) and blob[pos - before - 1] == text[off - before - 1]:
            before += 1
        limit = min(len(blob) - pos, len(text) - off)
        while after < limit and blob[pos + after] == text[off + after]:
            after += 1
        return before + after

    def count(self, blob: bytes, limit: int) -> int:
        """How many hits widen to a RUN-byte run (stopping at ``limit``)."""
        keys = keys8(blob, 1)
        if not len(keys) or not len(self.sorted):
            return 0
        lows = np.searchsorted(self.sorted, keys, "left")
        hits = self.sorted[np.minimum(lows, len(self.sorted) - 1)] == keys
        found = 0
        for pos in np.flatnonzero(hits).tolist():
            hi = int(np.searchsorted(self.sorted, keys[pos], "right"))
            for block in self.order[int(lows[pos]) : hi].tolist():
                if self._run_at(blob, pos, 8 * block) >= RUN:
                    found += 1
                    break
            if found >= limit:
                break
        return found


def _pad_unlike(length: int, avoid: int | None, *, at_end: bool) -> bytes:
    """Random padding whose byte touching the run (its last or first) is not ``avoid``."""
    pad = bytearray(os.urandom(length))
    edge = -1 if at_end else 0
    if pad and pad[edge] == avoid:
        pad[edge] ^= 0xFF
    return bytes(pad)


def test_leak_search_finds_any_run_of_32_bytes() -> None:
    """The finder itself: a run of RUN bytes anywhere is found, one byte less is not."""
    plaintext = os.urandom(100_000)
    runs = Runs(plaintext)
    for at in (0, 1, 7, 50_003, len(plaintext) - RUN):
        for pad in (0, 1, 5, 13):
            run = plaintext[at : at + RUN]
            assert runs.count(os.urandom(pad) + run + os.urandom(pad), 1) == 1
            # The bytes beside the shortened run must not happen to lengthen it again.
            before = _pad_unlike(pad, plaintext[at], at_end=True)
            following = plaintext[at + RUN] if at + RUN < len(plaintext) else None
            after = _pad_unlike(pad, following, at_end=False)
            assert runs.count(before + run[1:] + after, 1) == 0
    assert runs.count(os.urandom(200_000), 1) == 0


def server_files(servers: LiveServers) -> tuple[dict[Path, bytes], list[str]]:
    """Every file both servers hold, with what a reader of it sees (for a record, the
    decoded manifests too), and the name of every file and folder."""
    contents: dict[Path, bytes] = {}
    names: list[str] = []
    for kind in KINDS:
        for folder, dirs, files in os.walk(servers.data_dir(kind)):
            names += dirs + files
            for f in files:
                path = Path(folder) / f
                blob = path.read_bytes()
                if f == "record.json":
                    doc = json.loads(blob)
                    for entry in (doc["current"], doc["previous"]):
                        if entry:
                            blob += b"\n" + base64.b64decode(entry["manifest"])
                contents[path] = blob
    return contents, names


@dataclasses.dataclass
class Exposure:
    runs: int  # RUN-byte plaintext runs found (of either file), up to a limit per file
    texts: list[str]  # the telling strings found in some file's bytes
    paths: list[str]  # the telling strings found in some file or folder name


def store_secrets(client: Client, tmp_path: Path) -> tuple[bytes, list[str]]:
    secret = write_random(tmp_path / "report.pdf", 3 * 1024 * 1024)
    client.store(tmp_path / "report.pdf", SECRET_NAME)
    (tmp_path / "minutes.txt").write_bytes(SMALL_TEXT)
    client.store(tmp_path / "minutes.txt", SMALL_NAME)
    telling = [SECRET_NAME, SMALL_NAME, "secret-plans", "quarterly-report.pdf", "board-minutes"]
    # the ids anyone could compute from a guessed name (encryption off uses the first)
    telling += [object_id_for(n) for n in (SECRET_NAME, SMALL_NAME)]
    telling += [hashlib.sha256(n.encode()).hexdigest() for n in (SECRET_NAME, SMALL_NAME)]
    telling += [hashlib.sha256(d).hexdigest() for d in (secret, SMALL_TEXT)]
    telling += ["Initech", str(len(secret))]
    return secret, telling


def exposure(servers: LiveServers, secret: bytes, telling: list[str], limit: int) -> Exposure:
    contents, names = server_files(servers)
    assert sum(len(b) for b in contents.values()) > len(secret)  # the stripes are there
    finders = [Runs(secret), Runs(SMALL_TEXT)]
    runs = sum(r.count(blob, limit) for blob in contents.values() for r in finders)
    texts = [t for t in telling if any(t.encode() in b for b in contents.values())]
    paths = [t for t in telling if any(t in n for n in names)]
    return Exposure(runs, texts, paths)


def test_servers_hold_nothing_of_the_plaintext_or_names(
    servers: LiveServers, client: Client, tmp_path: Path
) -> None:
    secret, telling = store_secrets(client, tmp_path)
    found = exposure(servers, secret, telling, limit=1)
    assert found == Exposure(0, [], [])
    assert fetched(client, SECRET_NAME, tmp_path / "check") == secret


def test_leak_search_finds_the_plaintext_with_encryption_off(
    plain_servers: LiveServers, plain_client: Client, tmp_path: Path
) -> None:
    """The positive control: the same search on a plain setup finds everything."""
    secret, telling = store_secrets(plain_client, tmp_path)
    found = exposure(plain_servers, secret, telling, limit=10)
    assert found.runs == 10 * 2 * 2  # both plaintexts, on both servers' stripes
    # Inside the (plain) manifests: the names, their components, the file hashes, the
    # text's words and the size; the unkeyed ids are the folder names.
    unkeyed = {object_id_for(n) for n in (SECRET_NAME, SMALL_NAME)}
    hashed = {hashlib.sha256(n.encode()).hexdigest() for n in (SECRET_NAME, SMALL_NAME)}
    assert set(found.texts) == set(telling) - unkeyed - hashed
    assert set(found.paths) == unkeyed
