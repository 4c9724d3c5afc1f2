"""The server-side storage interface, on local disk: atomic stripes and commits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitstore import _reclaim, _storage
from splitstore._digest import stripe_digest
from splitstore._service import IO_BATCH_BYTES, WRITE_BATCH_BYTES, StorageService, StripeChunks
from splitstore._storage import (
    MAX_MANIFEST_TEXT,
    DataFolder,
    FolderLock,
    LocalDiskStore,
    ObjectRecord,
    StorageError,
    StripeUpload,
    _tree_bytes,
)
from splitstore._tenants import Tenant

OID, OID2 = "1" * 64, "2" * 64
V1, V2, V3 = "a" * 32, "b" * 32, "c" * 32


def put(store: LocalDiskStore, oid: str, vid: str, data: bytes) -> str:
    upload = store.begin_stripe(oid, vid, len(data))
    for i in range(0, len(data), 7):
        upload.write(data[i : i + 7])
    return upload.finish()


def record(vid: str, data: bytes, manifest: bytes = b"m") -> ObjectRecord:
    return ObjectRecord(vid, len(data), stripe_digest(data), manifest)


def test_stripe_then_commit(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    assert put(store, OID, V1, b"hello") == stripe_digest(b"hello")
    store.commit(OID, record(V1, b"hello"))
    assert store.get_record(OID) == record(V1, b"hello")
    f, length = store.open_stripe(OID, V1)
    with f:
        assert (f.read(), length) == (b"hello", 5)
    assert [oid for oid, _ in store.list_records()] == [OID]


def test_short_or_long_uploads_leave_nothing(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    upload = store.begin_stripe(OID, V1, 10)
    upload.write(b"12345")
    with pytest.raises(StorageError) as short:
        upload.finish()
    assert short.value.code == "bad_request"
    upload.abort()
    upload = store.begin_stripe(OID, V1, 3)
    with pytest.raises(StorageError):
        upload.write(b"12345")
    upload.abort()
    assert not list((tmp_path / "tmp").iterdir())
    with pytest.raises(StorageError) as missing:
        store.open_stripe(OID, V1)
    assert missing.value.code == "not_found"


def test_commit_must_match_the_stripe(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    with pytest.raises(StorageError) as no_stripe:
        store.commit(OID, record(V1, b"data"))
    assert no_stripe.value.code == "conflict"
    put(store, OID, V1, b"data")
    with pytest.raises(StorageError) as wrong_hash:
        store.commit(OID, record(V1, b"DATA"))
    assert wrong_hash.value.code == "conflict"
    with pytest.raises(StorageError):
        store.get_record(OID)  # nothing committed


def test_keeps_current_and_previous_only(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    for vid in (V1, V2, V3):
        put(store, OID, vid, vid.encode())
        store.commit(OID, record(vid, vid.encode()))
    folder = tmp_path / "objects" / OID[:2] / OID
    assert sorted(p.name for p in folder.glob("*.stripe")) == [f"{V2}.stripe", f"{V3}.stripe"]
    assert store.get_record(OID).version_id == V3


@contextlib.contextmanager
def held_removals(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every stripe counts as large, and background removals wait until the block ends."""
    monkeypatch.setattr(_storage, "RECLAIM_LATER_BYTES", 1)
    gate, started, unlink = threading.Event(), [], _reclaim._unlink

    def held(path: Path) -> None:
        started.append(path)
        gate.wait(10)
        unlink(path)

    monkeypatch.setattr(_reclaim, "_unlink", held)
    try:
        yield started
    finally:
        gate.set()
        _reclaim.wait_reclaimed()


def test_a_large_dropped_stripe_is_removed_after_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeing a large file takes a while: the commit answers before it is done, and the
    version is gone from the object's folder (and its byte count) at once."""
    store = LocalDiskStore(tmp_path)
    folder, tmp = tmp_path / "objects" / OID[:2] / OID, tmp_path / "tmp"
    with held_removals(monkeypatch) as started:
        for vid in (V1, V2, V3):
            put(store, OID, vid, vid.encode() * 100)
            store.commit(OID, record(vid, vid.encode() * 100))
        # The commit of V3 has returned, V1's removal has not run.
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["record.json", f"{V2}.stripe", f"{V2}.meta", f"{V3}.stripe", f"{V3}.meta"]
        )
        assert store.used_bytes() == _tree_bytes(tmp_path / "objects")
        aside = list(tmp.glob("*.dropped"))
        assert [p.read_bytes() for p in aside] == [V1.encode() * 100]
        device = os.stat(tmp_path).st_dev
        assert _reclaim.pending_bytes(device) == 3200
        assert _reclaim.pending_bytes(device + 1) == 0  # counted for its own disk only
        with pytest.raises(StorageError) as gone:
            store.open_stripe(OID, V1)
        assert gone.value.code == "not_found"
        assert store.get_record(OID).version_id == V3
    assert started == aside
    assert not list(tmp.iterdir())
    assert _reclaim.pending_bytes(os.stat(tmp_path).st_dev) == 0
    assert store.used_bytes() == _tree_bytes(tmp_path / "objects")


def test_a_fetch_of_a_dropped_stripe_still_reads_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stripe being served when a later commit drops it is unlinked, never cut short:
    the reader that has it open reads to its end."""
    store = LocalDiskStore(tmp_path)
    data = os.urandom(20 * 1024 * 1024)  # past RECLAIM_LATER_BYTES, as a real large stripe
    upload = store.begin_stripe(OID, V1, len(data))
    upload.write(data)
    upload.finish()
    store.commit(OID, record(V1, data))
    f, _ = store.open_stripe(OID, V1)
    with f:
        head = f.read(1000)
        for vid in (V2, V3):
            put(store, OID, vid, vid.encode())
            store.commit(OID, record(vid, vid.encode()))
        _reclaim.wait_reclaimed()
        assert not list((tmp_path / "tmp").iterdir())  # V1 is gone from the disk's tree
        assert head + f.read() == data


def test_a_dropped_stripe_with_no_thread_to_free_it_goes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_storage, "RECLAIM_LATER_BYTES", 1)

    def no_thread(path: Path, size: int) -> None:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(_storage, "reclaim_later", no_thread)
    store = LocalDiskStore(tmp_path)
    for vid in (V1, V2, V3):
        put(store, OID, vid, vid.encode())
        store.commit(OID, record(vid, vid.encode()))
    assert not list((tmp_path / "tmp").iterdir())
    assert store.get_record(OID).version_id == V3
    assert store.used_bytes() == _tree_bytes(tmp_path / "objects")


def test_bytes_being_unlinked_no_longer_count_as_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the moment the unlink starts the file system counts what it frees: counting
    it as pending too would take the space twice."""
    doomed = tmp_path / "z.dropped"
    doomed.write_bytes(b"z" * 4096)
    unlinking, go_on, unlink = threading.Event(), threading.Event(), os.unlink

    def slow_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(".dropped"):
            unlinking.set()
            go_on.wait(10)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", slow_unlink)
    _reclaim.reclaim_later(doomed, 4096)
    try:
        assert unlinking.wait(10)
        assert _reclaim.pending_bytes(os.stat(tmp_path).st_dev) == 0
    finally:
        go_on.set()
        _reclaim.wait_reclaimed()
    assert not doomed.exists()


def test_a_removal_no_thread_takes_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped = concurrent.futures.ThreadPoolExecutor(1)
    stopped.shutdown()
    monkeypatch.setattr(_reclaim, "_pool", lambda: stopped)
    doomed = tmp_path / "w.dropped"
    doomed.write_bytes(b"w" * 100)
    with pytest.raises(RuntimeError):
        _reclaim.reclaim_later(doomed, 100)
    assert _reclaim.pending_bytes(os.stat(tmp_path).st_dev) == 0


def test_a_dropped_file_that_cannot_be_freed_is_reported_and_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = tmp_path / "y.dropped"
    stuck.mkdir()  # not a file: unlink refuses it
    _reclaim.reclaim_later(stuck, 99)
    _reclaim.wait_reclaimed()
    assert stuck.exists()
    assert "could not remove y.dropped" in caplog.text
    assert _reclaim.pending_bytes(os.stat(tmp_path).st_dev) == 0


def test_a_dropped_stripe_left_by_a_crash_goes_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = DataFolder(tmp_path)
    store = folder.tenant("default")
    with held_removals(monkeypatch):
        for vid in (V1, V2, V3):
            put(store, OID, vid, b"x" * 50)
            store.commit(OID, record(vid, b"x" * 50))
        assert len(list((tmp_path / "tmp").glob("*.dropped"))) == 1
        DataFolder(tmp_path)  # the server, started again after a crash
        assert not list((tmp_path / "tmp").iterdir())


def test_space_being_freed_counts_as_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large file replaced on a nearly full disk is not refused for the space its own
    older version is freeing."""
    store = LocalDiskStore(tmp_path)
    with held_removals(monkeypatch):
        for vid in (V1, V2, V3):
            put(store, OID, vid, b"y" * 1000)
            store.commit(OID, record(vid, b"y" * 1000))
        free = shutil.disk_usage(tmp_path).free
        store.reserve_bytes = free - 500  # 500 bytes left, and 1,000 on their way out
        store.begin_stripe(OID2, V1, 1400).abort()
        with pytest.raises(StorageError) as full:
            store.begin_stripe(OID2, V1, 2000)
        assert full.value.code == "insufficient_storage"


def test_deleting_after_a_drop_keeps_the_byte_count_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDiskStore(tmp_path)
    with held_removals(monkeypatch):
        for vid in (V1, V2, V3):
            put(store, OID, vid, vid.encode() * 10)
            store.commit(OID, record(vid, vid.encode() * 10))
        store.delete(OID)
        assert store.used_bytes() == 0


def test_a_stripe_that_cannot_be_set_aside_is_removed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDiskStore(tmp_path)
    with held_removals(monkeypatch) as started:
        for vid in (V1, V2):
            put(store, OID, vid, b"z" * 10)
            store.commit(OID, record(vid, b"z" * 10))
        real_replace = os.replace

        def no_rename(src: Path, dst: Path) -> None:  # tmp/ on another file system
            if str(dst).endswith(".dropped"):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", no_rename)
        put(store, OID, V3, b"z" * 10)
        store.commit(OID, record(V3, b"z" * 10))
        assert not (tmp_path / "objects" / OID[:2] / OID / f"{V1}.stripe").exists()
        assert started == []
        assert not list((tmp_path / "tmp").iterdir())
        assert store.used_bytes() == _tree_bytes(tmp_path / "objects")


def test_delete(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    put(store, OID, V1, b"x")
    store.commit(OID, record(V1, b"x"))
    store.delete(OID)
    with pytest.raises(StorageError) as gone:
        store.get_record(OID)
    assert gone.value.code == "not_found"
    with pytest.raises(StorageError):
        store.delete(OID)
    assert not (tmp_path / "objects" / OID[:2] / OID).exists()


@pytest.mark.parametrize("oid", ["../" * 21 + "x", "A" * 64, "1" * 65, ""])
def test_ids_are_validated(tmp_path: Path, oid: str) -> None:
    store = LocalDiskStore(tmp_path)
    with pytest.raises(StorageError) as bad:
        store.begin_stripe(oid, V1, 1)
    assert bad.value.code == "bad_request"
    with pytest.raises(StorageError):
        store.get_record(oid)


def test_leftover_uploads_are_cleared_at_start(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    upload = store.begin_stripe(OID, V1, 100)
    upload.write(b"partial")  # the server is killed here
    assert list((tmp_path / "tmp").iterdir())
    LocalDiskStore(tmp_path)
    assert not list((tmp_path / "tmp").iterdir())


def test_refuses_foreign_data_format(tmp_path: Path) -> None:
    DataFolder(tmp_path)
    (tmp_path / "FORMAT").write_text("something else 9\n")
    with pytest.raises(StorageError, match="format"):
        DataFolder(tmp_path)


def test_reserve_refuses_early(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path, reserve_bytes=2**62)
    with pytest.raises(StorageError) as full:
        store.begin_stripe(OID, V1, 1)
    assert full.value.code == "insufficient_storage"


def test_records_from_json_are_validated() -> None:
    good = record(V1, b"x").to_json()
    assert ObjectRecord.from_json(good) == record(V1, b"x")
    for key, value in [
        ("version_id", "x"),
        ("stripe_length", -1),
        ("stripe_length", True),
        ("stripe_digest", "Z" * 64),
        ("stripe_digest", "blake3:" + "Z" * 64),
        ("stripe_digest", "md5:" + "0" * 64),
        ("stripe_digest", None),
        ("manifest", "not base64!"),
    ]:
        with pytest.raises(StorageError):
            ObjectRecord.from_json({**good, key: value})


def test_records_and_metas_of_older_servers_still_commit_and_read(tmp_path: Path) -> None:
    """Servers before stripe digests kept bare SHA-256s in records and .meta files: they
    are read as sha256: digests, so an old data folder needs no conversion."""
    old = {**record(V1, b"x").to_json(), "stripe_sha256": hashlib.sha256(b"x").hexdigest()}
    del old["stripe_digest"]
    parsed = ObjectRecord.from_json(old)
    assert parsed.stripe_digest == "sha256:" + hashlib.sha256(b"x").hexdigest()
    assert parsed.to_json()["stripe_digest"] == parsed.stripe_digest
    with pytest.raises(StorageError):
        ObjectRecord.from_json({**old, "stripe_sha256": "sha256:" + "0" * 64})

    store = LocalDiskStore(tmp_path)
    put(store, OID, V1, b"x")
    meta = store._object_dir(OID) / f"{V1}.meta"
    meta.write_text(json.dumps({"length": 1, "sha256": hashlib.sha256(b"x").hexdigest()}))
    with pytest.raises(StorageError) as other:  # a new digest cannot match an old .meta
        store.commit(OID, record(V1, b"x"))
    assert other.value.code == "conflict"
    store.commit(OID, parsed)
    assert store.get_record(OID) == parsed


def test_listing_is_sorted_and_leaves_out_damaged_records(tmp_path: Path) -> None:
    store = LocalDiskStore(tmp_path)
    oids = [f"{i:x}" * 64 for i in (9, 3, 5, 7)]
    for oid in oids:
        put(store, oid, V1, b"data")
        store.commit(oid, record(V1, b"data"))
    damaged, gutted = oids[2], oids[3]
    (tmp_path / "objects" / damaged[:2] / damaged / "record.json").write_bytes(b"{not json")
    (tmp_path / "objects" / gutted[:2] / gutted / "record.json").write_bytes(b'{"x": 1}')
    (tmp_path / "objects" / "ff").write_bytes(b"a stray file, not a folder")
    (tmp_path / "objects" / "33" / "not-an-id").mkdir()
    listed = list(store.list_records())
    assert [oid for oid, _ in listed] == sorted([oids[0], oids[1]])
    assert all(rec == record(V1, b"data") for _, rec in listed)
    with pytest.raises(StorageError):
        store.get_record(damaged)


@pytest.mark.parametrize("size", [0, 5, IO_BATCH_BYTES, IO_BATCH_BYTES + 1, 3 * IO_BATCH_BYTES])
def test_stripe_chunks_read_to_the_length_and_close(tmp_path: Path, size: int) -> None:
    store = LocalDiskStore(tmp_path)
    data = os.urandom(size)
    put(store, OID, V1, data)

    async def read_all() -> tuple[bytes, bool]:
        f, length = store.open_stripe(OID, V1)
        chunks = StripeChunks(f, length)
        async with contextlib.aclosing(chunks):
            got = b"".join([piece async for piece in chunks])
        return got, f.closed

    assert asyncio.run(read_all()) == (data, True)


def test_stripe_chunks_closed_before_reading_close_the_file(tmp_path: Path) -> None:
    """A response that fails before its first byte must not leave the stripe open."""
    store = LocalDiskStore(tmp_path)
    put(store, OID, V1, b"hello")
    f, length = store.open_stripe(OID, V1)

    async def fail_before_reading() -> None:
        async with contextlib.aclosing(StripeChunks(f, length)):
            raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        asyncio.run(fail_before_reading())
    assert f.closed


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
def trace_disk(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, each fsync (of what), rename (of what, into which folder) and
    unlink (of which name); from any thread, since a batch's fsyncs run in several."""
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_replace, real_fsync, real_unlink = os.replace, os.fsync, Path.unlink

    def replace(src: str | Path, dst: str | Path) -> None:
        with lock:
            events.append(("renamed", os.path.realpath(src)))
            real_replace(src, dst)
            events.append(("rename into", os.path.dirname(os.path.realpath(dst))))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        with lock:
            events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))

    def unlink(self: Path, missing_ok: bool = False) -> None:
        with lock:
            events.append(("unlink", self.name))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    return events


def test_a_finished_upload_is_durable_before_it_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's answer promises a stripe that survives a crash, committed or not: a
    version committed on one server only is read with the other's uncommitted stripe.
    So no rename into the object folder may still wait for a folder fsync."""
    store = LocalDiskStore(tmp_path)
    events = trace_disk(monkeypatch)
    folder = os.path.realpath(tmp_path / "objects" / OID[:2] / OID)
    put(store, OID, V1, b"hello")
    renames = [i for i, e in enumerate(events) if e == ("rename into", folder)]
    assert len(renames) == 2  # the stripe and its .meta
    assert ("fsync", folder) in events[renames[-1] + 1 :]


def test_a_batch_is_durable_before_it_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's fsyncs are grouped, not skipped: every stripe, .meta and record file is
    fsynced before its rename, and every folder renamed into (or made) after it."""
    store = LocalDiskStore(tmp_path)
    events = trace_disk(monkeypatch)
    oids = [f"{i:02x}" * 32 for i in range(5)]
    vids = [f"{i:02x}" * 16 for i in range(5)]
    digests = store.put_stripes(
        [(o, v, bytes([i]) * 100) for i, (o, v) in enumerate(zip(oids, vids, strict=True))]
    )
    records = [
        (o, ObjectRecord(v, 100, d, b"m")) for o, v, d in zip(oids, vids, digests, strict=True)
    ]
    assert store.commit_many(records) == [None] * 5
    assert [store.get_record(o).version_id for o in oids] == vids
    for i, event in enumerate(events):
        if event[0] == "renamed":
            assert ("fsync", event[1]) in events[:i]  # the file's bytes first
    last = {e[1]: i for i, e in enumerate(events) if e[0] == "rename into"}
    made = {os.path.realpath(tmp_path / "objects" / o[:2]) for o in oids}
    for folder, i in last.items():
        assert ("fsync", folder) in events[i + 1 :]
    for folder in made:  # a new folder's entry in its parent
        assert ("fsync", os.path.dirname(folder)) in events
    assert len(last) == 5


def two_committed_and_a_third_uploaded(tmp_path: Path) -> LocalDiskStore:
    """A store whose object OID has V1 and V2 committed and V3's stripe uploaded: the
    commit of V3 drops V1."""
    store = LocalDiskStore(tmp_path)
    for vid in (V1, V2):
        put(store, OID, vid, vid.encode())
        store.commit(OID, record(vid, vid.encode()))
    put(store, OID, V3, b"new")
    return store


def test_a_batch_commit_drops_old_versions_only_once_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As commit: a crash must never leave a record whose kept versions were deleted."""
    store = two_committed_and_a_third_uploaded(tmp_path)
    events = trace_disk(monkeypatch)
    assert store.commit_many([(OID, record(V3, b"new"))]) == [None]
    folder = os.path.realpath(tmp_path / "objects" / OID[:2] / OID)
    dropped = events.index(("unlink", f"{V1}.stripe"))
    assert ("fsync", folder) in events[:dropped]
    assert not (tmp_path / "objects" / OID[:2] / OID / f"{V1}.stripe").exists()
    assert store.get_record(OID).version_id == V3


def test_a_batch_cut_short_keeps_the_byte_count_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDiskStore(tmp_path)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(".meta") and OID2 in str(dst):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="Input/output error"):
        store.put_stripes([(OID, V1, b"a" * 100), (OID2, V2, b"b" * 300)])
    assert store.used_bytes() == _tree_bytes(tmp_path / "objects")
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing staged is left behind
    monkeypatch.setattr(os, "replace", real_replace)
    assert LocalDiskStore(tmp_path).used_bytes() == store.used_bytes()


def test_upload_cancelled_while_its_file_opens_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection dropped during begin_stripe's thread hop: the file opened late is
    closed and removed, not left open to the garbage collector and on disk."""
    data = DataFolder(tmp_path)
    store = data.tenant("alice")
    entered, release, opened = threading.Event(), threading.Event(), threading.Event()
    real_begin = store.begin_stripe

    def slow_begin(oid: str, vid: str, length: int) -> StripeUpload:
        entered.set()
        release.wait(10)
        upload = real_begin(oid, vid, length)
        opened.set()
        return upload

    monkeypatch.setattr(store, "begin_stripe", slow_begin)

    async def body() -> AsyncIterator[bytes]:
        yield b"never read"

    async def scenario() -> None:
        service = StorageService(data)
        task = asyncio.create_task(service.put_stripe(Tenant("alice"), OID, V1, 10, body()))
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # at once: the thread is still opening the file
        release.set()
        await asyncio.to_thread(opened.wait, 10)
        for _ in range(500):  # the server goes on running; the late file goes soon
            if not list((tmp_path / "tmp").iterdir()):
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert list((tmp_path / "tmp").iterdir()) == []


def test_upload_cancelled_twice_mid_write_still_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up waits for a write still running in its thread, then aborts: a second
    cancellation during that wait must not skip the abort."""
    data = DataFolder(tmp_path)
    store = data.tenant("alice")
    writing, release = threading.Event(), threading.Event()
    real_begin = store.begin_stripe

    def begin(oid: str, vid: str, length: int) -> StripeUpload:
        upload = real_begin(oid, vid, length)
        real_write = upload.write

        def slow_write(piece: bytes | memoryview) -> None:
            writing.set()
            release.wait(10)
            real_write(piece)

        monkeypatch.setattr(upload, "write", slow_write)
        return upload

    monkeypatch.setattr(store, "begin_stripe", begin)
    size = 2 * WRITE_BATCH_BYTES

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * WRITE_BATCH_BYTES  # a whole batch: written while the next is awaited
        await asyncio.Event().wait()  # and the next never comes

    async def scenario() -> None:
        service = StorageService(data)
        task = asyncio.create_task(service.put_stripe(Tenant("alice"), OID, V1, size, body()))
        await asyncio.to_thread(writing.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)  # now waiting for the write in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(500):
            if not list((tmp_path / "tmp").iterdir()):
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert list((tmp_path / "tmp").iterdir()) == []


def test_new_folders_are_durable_in_their_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new data folder, tenants/, a new tenant's folders: each one's entry in its parent
    is fsynced before anything is stored in it, or a crash could lose a store answered."""
    events = trace_disk(monkeypatch)
    root = tmp_path / "new" / "data"
    data = DataFolder(root)
    data.tenant("alice")
    synced = {path for what, path in events if what == "fsync"}
    for made in (root.parent, root, root / "tenants", root / "tenants" / "alice"):
        assert os.path.realpath(made.parent) in synced, made


def test_the_format_1_upgrade_makes_tenants_durable_before_the_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "objects" / OID[:2] / OID).mkdir(parents=True)
    (tmp_path / "FORMAT").write_text("splitstore-server-data 1\n")
    events = trace_disk(monkeypatch)
    DataFolder(tmp_path)
    marker = max(i for i, e in enumerate(events) if e == ("rename into", str(tmp_path)))
    for folder in (tmp_path, tmp_path / "tenants", tmp_path / "tenants" / "default"):
        assert ("fsync", os.path.realpath(folder)) in events[:marker], folder


def test_a_meta_that_cannot_be_written_keeps_the_byte_count_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stripe is in place before its .meta is written: counted as it lands, so a full
    disk at the .meta does not leave its bytes out of the tenant's usage for good."""
    store = LocalDiskStore(tmp_path)
    real = _storage._atomic_write

    def atomic_write(path: Path, data: bytes) -> None:
        if path.suffix == ".meta":
            raise StorageError("insufficient_storage", "the server's disk is full")
        real(path, data)

    monkeypatch.setattr(_storage, "_atomic_write", atomic_write)
    with pytest.raises(StorageError, match="disk is full"):
        put(store, OID, V1, b"x" * 10_000)
    assert store.used_bytes() == _tree_bytes(tmp_path / "objects") >= 10_000
    monkeypatch.setattr(_storage, "_atomic_write", real)
    for vid in (V1, V2, V3):  # the upload again, then two more versions drop it
        put(store, OID, vid, vid.encode() * 100)
        store.commit(OID, record(vid, vid.encode() * 100))
        assert store.used_bytes() == _tree_bytes(tmp_path / "objects")


def test_a_commit_removes_what_a_crash_left_of_record_writes(tmp_path: Path) -> None:
    """A record's or .meta's temp file cut off by a crash would count against the quota
    for as long as the object lives; the object's next commit removes it."""
    store = LocalDiskStore(tmp_path)
    put(store, OID, V1, b"one")
    store.commit(OID, record(V1, b"one"))
    folder = tmp_path / "objects" / OID[:2] / OID
    (folder / ".k2j4h5g6.tmp").write_bytes(b'{"current": ' + b"x" * 6000)
    store = LocalDiskStore(tmp_path)  # the server started again
    put(store, OID, V2, b"two")
    store.commit(OID, record(V2, b"two"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{V1}.meta", f"{V1}.stripe", f"{V2}.meta", f"{V2}.stripe", "record.json"]
    )
    assert store.used_bytes() == _tree_bytes(tmp_path / "objects")


def test_a_dropped_version_loses_its_meta_before_its_stripe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two unlinks must not leave a .meta without its stripe: the
    version would look complete, and a commit of it would be taken."""
    store = two_committed_and_a_third_uploaded(tmp_path)
    events = trace_disk(monkeypatch)
    store.commit(OID, record(V3, b"new"))
    assert events.index(("unlink", f"{V1}.meta")) < events.index(("unlink", f"{V1}.stripe"))


def test_the_longest_record_fits_in_one_tcp_response() -> None:
    """However a record was committed (one commit, a batch, HTTPS), get_record over TCP
    answers it in one JSON frame: a longer manifest is refused when it is committed."""
    from splitstore import _protocol as p

    fields = {"version_id": V1, "stripe_length": 2**53 - 1, "stripe_digest": "blake3:" + "f" * 64}
    longest = ObjectRecord.from_json({**fields, "manifest": "A" * MAX_MANIFEST_TEXT})
    response = json.dumps({"status": "ok", "record": longest.to_json()}).encode()
    assert len(response) <= p.MAX_JSON_FRAME
    with pytest.raises(StorageError, match="manifest") as refused:
        ObjectRecord.from_json({**fields, "manifest": "A" * (MAX_MANIFEST_TEXT + 4)})
    assert refused.value.code == "bad_request"


def test_a_folder_of_other_files_is_not_taken_for_a_data_folder(tmp_path: Path) -> None:
    """A data_dir that names a folder of the user's (a typo) is refused, its tmp/ kept;
    an empty one, or one holding only what a first start cut short leaves, is taken."""
    (tmp_path / "mine" / "tmp").mkdir(parents=True)
    (tmp_path / "mine" / "tmp" / "notes.txt").write_text("the user's")
    for open_it in (DataFolder, FolderLock):  # a server locks the folder first
        with pytest.raises(StorageError, match="not a splitstore data folder"):
            open_it(tmp_path / "mine")
    assert (tmp_path / "mine" / "tmp" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["tmp"]  # no lock left
    cut_short = tmp_path / "cut-short"
    for folder in ("tmp", "tenants", "lost+found"):
        (cut_short / folder).mkdir(parents=True)
    (cut_short / "lock").touch()
    (cut_short / ".a1b2c3.tmp").write_text("splitstore-ser")
    DataFolder(cut_short)
    assert (cut_short / "FORMAT").read_text() == "splitstore-server-data 3\n"


def test_a_claim_of_nothing_holds_nothing(tmp_path: Path) -> None:
    """A batch of records all refused reserves nothing: its release must not touch what
    other requests of the tenant hold (it once took their entry away, a KeyError)."""
    service = StorageService(DataFolder(tmp_path))
    alice = Tenant("alice", quota_bytes=100)
    store = service.stores.tenant("alice")
    release = service._reserve(alice, store, 0, "nothing")
    held = service._reserve(alice, store, 60, "a stripe")
    held()
    release()
    assert service._in_flight == {}
