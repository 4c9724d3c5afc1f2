"""Where a server keeps what it is given: one narrow interface, local disk first.

Both servers (HTTPS and TCP) speak to storage only through ``StripeStore``, so another
backend (an object store, say) can come later without touching them. Each tenant has a
store of its own; ``DataFolder`` hands them out. The on-disk layout and its commit rules
are specified in docs/format.md; in short::

    DATA_DIR/FORMAT                           "splitstore-server-data 3"
    DATA_DIR/tmp/                             uploads in progress (emptied at start)
    DATA_DIR/tenants/<tenant>/objects/<id[:2]>/<id>/record.json   the committed record
    DATA_DIR/tenants/<tenant>/objects/<id[:2]>/<id>/<vid>.stripe  one version's stripe
    DATA_DIR/tenants/<tenant>/objects/<id[:2]>/<id>/<vid>.meta    its length and digest

A stripe is written to tmp/, flushed, fsynced and renamed into place only once it has
exactly the declared length. A record is committed only if it names a complete stripe
whose length and digest match what the client declared. Every file is replaced atomically.
A folder of format 1 (``objects/`` at the top, one user) is moved into the tenant
``default`` when a server starts on it; one of format 2 (bare SHA-256s, still read) only
gets the new marker.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import orjson

try:
    import fcntl
except ImportError:  # not POSIX: servers cannot tell that another one uses their folder
    fcntl = None  # type: ignore[assignment]

from ._digest import from_sha256_hex, is_digest, new_stripe_hasher, stripe_digest
from ._manifest import MAX_MANIFEST_BYTES
from ._names import is_object_id, is_version_id
from ._reclaim import RECLAIM_LATER_BYTES, pending_bytes, reclaim_later
from ._syncing import SyncingWriter
from ._tenants import SINGLE_TENANT, is_tenant_name

__all__ = [
    "DATA_FORMAT",
    "MAX_MANIFEST_TEXT",
    "MAX_STRIPE_BYTES",
    "STRIPE_OVERHEAD_BYTES",
    "DataFolder",
    "FolderLock",
    "LocalDiskStore",
    "ObjectRecord",
    "StorageError",
    "StripeStore",
    "StripeUpload",
    "refuse_unless_new",
    "tenant_folder",
    "tenant_stored_bytes",
]

log = logging.getLogger("splitstore.storage")
# flock's answers for a file system that has no locks (some NFS and CIFS mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}

DATA_FORMAT = "splitstore-server-data 3"
# Format 2 kept bare SHA-256s in records and .meta files, which format 3 still reads: a
# format-2 folder needs only its marker changed (so that older servers refuse it).
DATA_FORMAT_2 = "splitstore-server-data 2"
# One user's objects at the top of the folder; moved into tenants/default on start.
DATA_FORMAT_1 = "splitstore-server-data 1"
# One stripe of a 2**53-byte file; the per-tenant quotas of later versions sit below this.
MAX_STRIPE_BYTES = 2**53 - 1
# A record is a few hashes and an encoded manifest.
MAX_RECORD_BYTES = 2 * MAX_MANIFEST_BYTES
# A record's manifest as base64 text: short enough that the record, with its other
# fields, always fits in one JSON frame of the TCP protocol (a get_record RESPONSE, at
# most 65,536 bytes), however it was committed. A sealed manifest of MAX_MANIFEST_BYTES
# is some 43,800 characters.
MAX_MANIFEST_TEXT = 64 * 1024 - 512
# The .meta file beside each stripe ({"length": N, "digest": "blake3:HEX"}, at most 113
# bytes):
# quotas count it with the stripe.
STRIPE_OVERHEAD_BYTES = 128


class StorageError(Exception):
    """A storage failure with the wire error code the servers answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """What a server knows of one committed version: its stripe, and the opaque manifest."""

    version_id: str
    stripe_length: int
    #: ``ALGORITHM:HEX`` (``_digest``); records written before 0.2 said ``stripe_sha256``.
    stripe_digest: str
    manifest: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "version_id": self.version_id,
            "stripe_length": self.stripe_length,
            "stripe_digest": self.stripe_digest,
            "manifest": base64.b64encode(self.manifest).decode("ascii"),
        }

    @classmethod
    def from_json(cls, doc: object) -> ObjectRecord:
        """Build a record from untrusted JSON; raises StorageError("bad_request", ...)."""
        if not isinstance(doc, dict):
            raise StorageError("bad_request", "a record must be a JSON object")
        vid, length, digest, manifest = (
            doc.get("version_id"),
            doc.get("stripe_length"),
            doc.get("stripe_digest"),
            doc.get("manifest"),
        )
        if digest is None and "stripe_sha256" in doc:  # a record kept by an older server
            digest = from_sha256_hex(doc["stripe_sha256"])
        if not is_version_id(vid):
            raise StorageError("bad_request", "version_id must be 32 lowercase hex digits")
        if not _is_length(length):
            raise StorageError("bad_request", "stripe_length must be a whole number")
        if not is_digest(digest):
            raise StorageError(
                "bad_request", "stripe_digest must be 'blake3:' or 'sha256:' and 64 lowercase hex"
            )
        if not isinstance(manifest, str) or len(manifest) > MAX_MANIFEST_TEXT:
            raise StorageError(
                "bad_request", f"manifest must be base64 text of at most {MAX_MANIFEST_TEXT} bytes"
            )
        try:
            # Strict: only the base64 alphabet and correct padding (as b64decode's validate).
            raw = binascii.a2b_base64(manifest, strict_mode=True)
        except ValueError as exc:
            raise StorageError("bad_request", "manifest is not valid base64") from exc
        return cls(cast(str, vid), cast(int, length), cast(str, digest), raw)


class StripeUpload(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def finish(self) -> str:
        """Check the length, make the stripe durable and visible; return its digest."""

    def abort(self) -> None: ...


class StripeStore(Protocol):
    """The storage interface both servers use. Methods block; servers call them in threads."""

    def begin_stripe(self, object_id: str, version_id: str, length: int) -> StripeUpload: ...
    def open_stripe(self, object_id: str, version_id: str) -> tuple[BinaryIO, int]: ...
    def commit(self, object_id: str, record: ObjectRecord) -> None: ...
    def put_stripes(self, stripes: Sequence[tuple[str, str, bytes | memoryview]]) -> list[str]:
        """Store several (object_id, version_id, bytes) stripes, each as one complete
        upload would be; their digests. On a failure, none or only some are stored."""

    def commit_many(self, records: Sequence[tuple[str, ObjectRecord]]) -> list[StorageError | None]:
        """Commit each record as ``commit`` would; each one's error, or None."""

    def get_record(self, object_id: str) -> ObjectRecord: ...
    def list_records(self) -> Iterator[tuple[str, ObjectRecord]]: ...
    def delete(self, object_id: str) -> None: ...
    def used_bytes(self) -> int:
        """Bytes the stored files take: stripes (committed or not), their metas, records."""


class DataFolder:
    """A server's data folder: one ``LocalDiskStore`` per tenant, and one shared tmp/.

    Opening it checks the format marker, moves a format-1 folder's objects into the
    tenant ``default``, empties tmp/ and counts what each tenant already stores.
    Blocking; thread-safe.
    """

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = root
        self.reserve_bytes = reserve_bytes
        self._tenants = root / "tenants"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._stores: dict[str, LocalDiskStore] = {}
        self._prepare()
        for folder in sorted(self._tenants.iterdir()):
            if folder.is_dir() and is_tenant_name(folder.name):
                self.tenant(folder.name)

    def _prepare(self) -> None:
        _make_folders(self.root, Path(self.root.anchor))
        marker = self.root / "FORMAT"
        found = DATA_FORMAT
        if marker.exists():
            found = marker.read_text(encoding="utf-8", errors="replace").strip()
        else:
            refuse_unless_new(self.root)
        if found == DATA_FORMAT_1:
            self._upgrade_from_1()
        elif found not in (DATA_FORMAT, DATA_FORMAT_2):
            raise StorageError(
                "internal", f"{self.root} holds data of format {found!r}, not {DATA_FORMAT!r}"
            )
        _make_folders(self._tenants, self.root)
        # Leftovers of uploads killed mid-way: never visible, so safe to drop.
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(exist_ok=True)
        if not marker.exists() or found != DATA_FORMAT:
            _atomic_write(marker, (DATA_FORMAT + "\n").encode())

    def _upgrade_from_1(self) -> None:
        """Move objects/ to tenants/default/objects: one rename, so a crash leaves either
        layout whole; the marker changes only after it (a rerun finishes the job)."""
        old = self.root / "objects"
        home = self._tenants / SINGLE_TENANT
        if not old.exists():
            return  # moved already; only the marker was left to write
        if (home / "objects").exists():
            raise StorageError(
                "internal",
                f"cannot upgrade {self.root}: both objects/ and {home / 'objects'} exist",
            )
        with _translate_os_errors():
            _make_folders(home, self.root)  # tenants/ and tenants/default, durably
            os.rename(old, home / "objects")
            _fsync_dir(home)
            _fsync_dir(self.root)

    def tenant(self, name: str) -> LocalDiskStore:
        """The store of tenant ``name``, created (empty) on first use."""
        if not is_tenant_name(name):  # a name never escapes tenants/
            raise StorageError("internal", f"{name!r} is not a tenant name")
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = LocalDiskStore(
                    tenant_folder(self.root, name),
                    tmp_dir=self._tmp,
                    reserve_bytes=self.reserve_bytes,
                )
                self._stores[name] = store
            return store

    def opened(self, name: str) -> LocalDiskStore | None:
        """The store of ``name`` if it is open already (cheap; never touches the disk)."""
        return self._stores.get(name)

    def usage(self) -> dict[str, int]:
        """Bytes stored per tenant."""
        with self._lock:
            return {name: store.used_bytes() for name, store in sorted(self._stores.items())}


def refuse_unless_new(root: Path) -> None:
    """Refuse a folder without a FORMAT marker unless it holds nothing but what a first
    start cut short leaves (or a file system's lost+found): a data_dir mistyped as a
    folder of the user's must not have its tmp/ emptied, nor a lock file left in it."""
    for entry in root.iterdir():
        name = entry.name
        ours = (
            name in ("lock", "lost+found")
            or (name in ("tmp", "tenants") and entry.is_dir() and not any(entry.iterdir()))
            or (name.startswith(".") and name.endswith(".tmp"))  # the marker, cut off
        )
        if not ours:
            raise StorageError(
                "internal",
                f"it is not a splitstore data folder (it has no FORMAT file, and holds "
                f"{name!r}): give the server an empty or new folder",
            )


class FolderLock:
    """A server's hold on its data folder: an exclusive ``flock`` on ``DATA_DIR/lock``,
    taken before the folder is opened (which empties its ``tmp/``) and kept while the
    server runs. A second server on the same folder (started twice, or both servers of a
    config given one folder) is refused before it touches anything; the kernel lets go of
    the lock when the process ends, however it ends."""

    def __init__(self, folder: Path) -> None:
        self._fd: int | None = None
        if fcntl is None:
            return
        with _translate_os_errors():
            if folder.is_dir() and not (folder / "FORMAT").exists():
                refuse_unless_new(folder)  # before a lock file is left in it
            _make_folders(folder, Path(folder.anchor))
            fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError("internal", "another splitstore server is using it") from None
            if exc.errno in _NO_LOCKS:  # some network file systems: served as before
                log.warning("cannot lock %s (%s): nothing stops a second server", folder, exc)
                return
            raise StorageError("internal", f"cannot lock it: {exc.strerror}") from exc
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def tenant_folder(data_dir: Path, name: str) -> Path:
    """Where a server keeps tenant ``name``'s objects (format 2)."""
    if not is_tenant_name(name):
        raise ValueError(f"{name!r} is not a tenant name")
    return data_dir / "tenants" / name


def tenant_stored_bytes(data_dir: Path, name: str) -> int:
    """Bytes tenant ``name`` stores in a data folder, read without changing anything (for
    tools run beside the servers); a folder not yet upgraded counts as format 1."""
    objects = tenant_folder(data_dir, name) / "objects"
    if not objects.is_dir() and name == SINGLE_TENANT:
        objects = data_dir / "objects"
    try:
        return _tree_bytes(objects)
    except (FileNotFoundError, NotADirectoryError):
        return 0


class LocalDiskStore:
    """A StripeStore in a local folder: ``root/objects/...`` (see the module docstring).

    Uploads are staged in ``tmp_dir`` (default ``root/tmp``, emptied here); a
    ``DataFolder`` passes its own shared one, which it empties itself.
    """

    def __init__(self, root: Path, *, tmp_dir: Path | None = None, reserve_bytes: int = 0) -> None:
        self.root = root
        self.reserve_bytes = reserve_bytes
        self._objects = root / "objects"
        self._tmp = tmp_dir if tmp_dir is not None else root / "tmp"
        # Commits, deletes and the last step of uploads are short; one lock keeps them (and
        # the count of used bytes) from interleaving.
        self._lock = threading.Lock()
        with _translate_os_errors():
            # A new tenant's folders, each entry durable in its parent (tenants/<t>, then
            # objects/): a crash must not lose the folder of a store already answered.
            _make_folders(self._objects, Path(self._objects.anchor))
            if tmp_dir is None:
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp.mkdir(exist_ok=True)
            self._used = _tree_bytes(self._objects)

    def used_bytes(self) -> int:
        return self._used

    # -- stripes -------------------------------------------------------------------------

    def begin_stripe(self, object_id: str, version_id: str, length: int) -> _DiskUpload:
        _check_ids(object_id, version_id)
        if not _is_length(length) or length > MAX_STRIPE_BYTES:
            raise StorageError("too_large", f"a stripe can be at most {MAX_STRIPE_BYTES} bytes")
        free = _free_bytes(self.root)
        if length + self.reserve_bytes > free:
            raise StorageError(
                "insufficient_storage",
                f"not enough disk space for a {length}-byte stripe ({free} bytes free)",
            )
        final = self._object_dir(object_id) / f"{version_id}.stripe"
        return _DiskUpload(self, final, length)

    def open_stripe(self, object_id: str, version_id: str) -> tuple[BinaryIO, int]:
        _check_ids(object_id, version_id)
        folder = self._object_dir(object_id)
        if not (folder / f"{version_id}.meta").exists():
            raise StorageError("not_found", "no such stripe")
        try:
            f = (folder / f"{version_id}.stripe").open("rb")
        except FileNotFoundError as exc:
            raise StorageError("not_found", "no such stripe") from exc
        return f, os.fstat(f.fileno()).st_size

    # -- records -------------------------------------------------------------------------

    def commit(self, object_id: str, record: ObjectRecord) -> None:
        folder = self._object_dir(object_id)
        with self._lock:  # the check and the write as one step: a commit may drop stripes
            doc, keep = self._next_entry(object_id, record)
            before = _file_bytes(folder / "record.json")
            _atomic_write(folder / "record.json", doc)
            self._used += _file_bytes(folder / "record.json") - before
            self._drop_versions(folder, keep)

    def _next_entry(self, object_id: str, record: ObjectRecord) -> tuple[bytes, set[str]]:
        """The record file that commits ``record``, and the versions it keeps (locked)."""
        _check_ids(object_id, record.version_id)
        folder = self._object_dir(object_id)
        meta = _read_json(folder / f"{record.version_id}.meta")
        if meta is None:
            raise StorageError("conflict", "the stripe of that version is not stored here")
        if (meta.get("length"), _meta_digest(meta)) != (record.stripe_length, record.stripe_digest):
            raise StorageError(
                "conflict",
                "the stored stripe's length or digest differs from the declared one",
            )
        current = self._read_entry(object_id)
        previous = current.get("current") if current else None
        if previous and previous.get("version_id") == record.version_id:
            previous = current.get("previous") if current else None
        keep = {record.version_id}
        if previous:
            keep.add(previous["version_id"])
        return json.dumps({"current": record.to_json(), "previous": previous}).encode(), keep

    # -- batches: the same steps, their fsyncs issued together ---------------------------

    def put_stripes(self, stripes: Sequence[tuple[str, str, bytes | memoryview]]) -> list[str]:
        total = 0
        for object_id, version_id, data in stripes:
            _check_ids(object_id, version_id)
            total += len(data)
        free = _free_bytes(self.root)
        if total + self.reserve_bytes > free:
            raise StorageError(
                "insufficient_storage",
                f"not enough disk space for {total} bytes of stripes ({free} bytes free)",
            )
        staged: list[Path] = []  # temp files not yet renamed into place
        try:
            with _translate_os_errors():
                # Each stripe and its .meta to tmp/, unsynced; then all synced at once.
                digests = []
                for _, _, data in stripes:
                    digest = stripe_digest(data)
                    meta = json.dumps({"length": len(data), "digest": digest}).encode()
                    staged += [_stage(self._tmp, data, ".part"), _stage(self._tmp, meta, ".meta")]
                    digests.append(digest)
                _fsync_all(staged)
                with self._lock:
                    made: set[Path] = set()
                    renamed_into: set[Path] = set()
                    try:
                        for object_id, version_id, _ in stripes:
                            final = self._object_dir(object_id) / f"{version_id}.stripe"
                            made |= _make_folders(final.parent, self._objects, sync=False)
                            # The stripe, then the .meta that says it is complete; each
                            # counted as it lands, so a failure midway leaves no drift.
                            for target in (final, final.with_suffix(".meta")):
                                before = _file_bytes(target)
                                os.replace(staged[0], target)
                                del staged[0]  # in place now: no longer ours to remove
                                renamed_into.add(target.parent)
                                self._used += _file_bytes(target) - before
                    finally:
                        # New folders' entries in their parents, and the renames: durable
                        # before any answer, as for one upload.
                        _fsync_all([*made, *renamed_into], folders=True)
        finally:
            for path in staged:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return digests

    def commit_many(self, records: Sequence[tuple[str, ObjectRecord]]) -> list[StorageError | None]:
        results: list[StorageError | None] = [None] * len(records)
        # An object named twice is committed in two rounds: the second builds on the first.
        rounds: list[dict[str, int]] = []
        for index, (object_id, _) in enumerate(records):
            for batch in rounds:
                if object_id not in batch:
                    batch[object_id] = index
                    break
            else:
                rounds.append({object_id: index})
        for batch in rounds:
            self._commit_round(records, list(batch.values()), results)
        return results

    def _commit_round(
        self,
        records: Sequence[tuple[str, ObjectRecord]],
        indexes: list[int],
        results: list[StorageError | None],
    ) -> None:
        with self._lock:
            staged: dict[int, tuple[Path, set[str]]] = {}
            try:
                for index in indexes:
                    object_id, record = records[index]
                    try:
                        doc, keep = self._next_entry(object_id, record)
                        with _translate_os_errors():
                            folder = self._object_dir(object_id)
                            staged[index] = (_stage(folder, doc, ".tmp", prefix="."), keep)
                    except StorageError as exc:
                        results[index] = exc
                with _translate_os_errors():
                    _fsync_all([path for path, _ in staged.values()])
                    committed: list[tuple[Path, set[str]]] = []
                    try:
                        for index, (path, keep) in list(staged.items()):
                            folder = path.parent
                            before = _file_bytes(folder / "record.json")
                            os.replace(path, folder / "record.json")
                            del staged[index]
                            self._used += _file_bytes(folder / "record.json") - before
                            committed.append((folder, keep))
                    finally:
                        _fsync_all([folder for folder, _ in committed], folders=True)
                    # Older versions go only once the records that replace them are
                    # durable, as in commit: a crash must not leave a record without them.
                    for folder, keep in committed:
                        self._drop_versions(folder, keep)
            finally:
                for path, _ in staged.values():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def get_record(self, object_id: str) -> ObjectRecord:
        _check_ids(object_id)
        entry = self._read_entry(object_id)
        if entry is None:
            raise StorageError("not_found", "no such object")
        try:
            return ObjectRecord.from_json(entry.get("current"))
        except StorageError as exc:
            raise StorageError("internal", f"stored record is damaged: {exc.message}") from exc

    def list_records(self) -> Iterator[tuple[str, ObjectRecord]]:
        # Plain strings and os.scandir: pathlib's path objects cost as much as the reads.
        objects = str(self._objects)
        for prefix in _sorted_folders(objects):
            for name in _sorted_folders(os.path.join(objects, prefix)):
                if not is_object_id(name):
                    continue
                try:  # a damaged record is left out; get_record reports it
                    entry = _read_json_at(os.path.join(objects, prefix, name, "record.json"))
                    record = None if entry is None else ObjectRecord.from_json(entry["current"])
                except (StorageError, KeyError):
                    continue
                if record is not None:
                    yield name, record

    def delete(self, object_id: str) -> None:
        _check_ids(object_id)
        folder = self._object_dir(object_id)
        with self._lock:
            held = _dir_bytes(folder)
            try:
                (folder / "record.json").unlink()
            except FileNotFoundError:
                found = False
            else:
                found = True
                _fsync_dir(folder)
            # Without a record there may still be stripes of failed stores: they go too,
            # so that they stop counting against the tenant's quota.
            shutil.rmtree(folder, ignore_errors=True)
            self._used -= held - _dir_bytes(folder)
        if not found:
            raise StorageError("not_found", "no such object")

    # -- helpers -------------------------------------------------------------------------

    def _object_dir(self, object_id: str) -> Path:
        return self._objects / object_id[:2] / object_id

    def _read_entry(self, object_id: str) -> dict[str, Any] | None:
        return _read_json(self._object_dir(object_id) / "record.json")

    def _drop_versions(self, folder: Path, keep: set[str]) -> None:
        """Remove the versions not in ``keep`` (locked), each ``.meta`` before its stripe:
        a crash between the two must not leave a version that looks complete without its
        data. Temp files of record and .meta writes cut off by a crash go too (every
        write of one holds the lock, so none is under way)."""
        doomed = []
        for path in folder.iterdir():
            stem, dot, suffix = path.name.partition(".")
            dropped = bool(dot) and suffix in ("stripe", "meta") and stem not in keep
            # _atomic_write's and _stage's temp names: "." and a random stem, then ".tmp".
            crash_leftover = not stem and suffix.endswith(".tmp")
            if dropped or crash_leftover:
                doomed.append(path)
        doomed.sort(key=lambda path: not path.name.endswith(".meta"))
        for path in doomed:
            size = _file_bytes(path)
            if (
                path.suffix == ".stripe"
                and size >= RECLAIM_LATER_BYTES
                and self._set_aside(path, size)
            ):
                self._used -= size
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self._used -= size

    def _set_aside(self, path: Path, size: int) -> bool:
        """Move a large dropped stripe into tmp/ and have it unlinked there later
        (``_reclaim``); False if it was not moved (it is then unlinked at once)."""
        aside = self._tmp / f"{secrets.token_hex(8)}.dropped"
        try:
            os.replace(path, aside)
        except OSError:
            return False
        try:
            reclaim_later(aside, size)
        except (OSError, RuntimeError):  # no thread for it (shutting down): at once, then
            with contextlib.suppress(OSError):
                aside.unlink()
        return True

    def _install(self, tmp: Path, final: Path, length: int, digest: str) -> None:
        """Make a complete, fsynced stripe visible and count it (the upload's last step)."""
        meta = final.with_suffix(".meta")
        with self._lock:
            _make_folders(final.parent, self._objects)
            # Each file counted as it lands: a .meta that cannot be written (a full disk)
            # must not leave the stripe in place and uncounted.
            before = _file_bytes(final)
            os.replace(tmp, final)
            self._used += length - before
            before = _file_bytes(meta)
            _atomic_write(meta, json.dumps({"length": length, "digest": digest}).encode())
            self._used += _file_bytes(meta) - before


class _DiskUpload:
    """A stripe being received: a temp file that becomes visible only when complete."""

    def __init__(self, store: LocalDiskStore, final: Path, length: int) -> None:
        self._store = store
        self._final = final
        self._length = length
        self._received = 0
        self._hash = new_stripe_hasher()
        fd, name = tempfile.mkstemp(dir=store._tmp, suffix=".part")
        self._tmp = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        # Synced as it goes, in the background: the final fsync then has little left to
        # write, and the writes do not stop for the disk every SYNC_EVERY_BYTES.
        self._disk = SyncingWriter(self._file)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise StorageError("internal", "upload already closed")
        self._received += len(data)
        if self._received > self._length:
            raise StorageError("bad_request", f"more than the declared {self._length} bytes sent")
        self._hash.update(data)
        with _translate_os_errors():
            self._disk.write(data)

    def finish(self) -> str:
        if self._file is None:
            raise StorageError("internal", "upload already closed")
        if self._received != self._length:
            raise StorageError(
                "bad_request",
                f"the stripe ended after {self._received} of the declared {self._length} bytes",
            )
        digest = self._hash.digest()
        with _translate_os_errors():
            self._disk.finish()
            self._file.close()
            self._file = None
            self._store._install(self._tmp, self._final, self._length, digest)
        return digest

    def abort(self) -> None:
        if self._file is not None:
            self._disk.abandon()  # never close the file under a sync still running
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


@contextlib.contextmanager
def _translate_os_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError("insufficient_storage", "the server's disk is full") from exc
        raise StorageError("internal", f"storage error: {exc.strerror}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a mix."""
    with _translate_os_errors():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)


def _make_folders(folder: Path, top: Path, *, sync: bool = True) -> set[Path]:
    """Create ``folder`` and any missing parents below ``top``, each one durably: a new
    folder's entry in its parent is fsynced, or a crash could lose the object it holds.
    With ``sync=False`` that is left to the caller: the folders to fsync are returned."""
    missing = []
    while not folder.exists() and folder != top:
        missing.append(folder)
        folder = folder.parent
    parents = set()
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        if sync:
            _fsync_dir(new.parent)
        parents.add(new.parent)
    return parents


def _stage(folder: Path, data: bytes | memoryview, suffix: str, prefix: str = "") -> Path:
    """``data`` in a new temp file in ``folder``, written but not yet fsynced."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            view = memoryview(data)
            while view:
                written = f.write(view)
                if not written:
                    raise OSError(errno.EIO, "the disk took no bytes")
                view = view[written:]
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


# A batch's fsyncs are issued together: the file system's journal then commits them in
# groups, 2-4x faster per file than one after another on the disk measured.
_FSYNC_POOL = ThreadPoolExecutor(8, thread_name_prefix="splitstore-fsync")


def _free_bytes(root: Path) -> int:
    """Free space for new stripes: what the disk has, and what dropped stripes will free."""
    return shutil.disk_usage(root).free + pending_bytes(os.stat(root).st_dev)


def _fsync_all(paths: Sequence[Path], *, folders: bool = False) -> None:
    """fsync every path (files, or folders), several at a time; raise the first error."""
    sync = _fsync_dir if folders else _fsync_file
    errors = [e for e in _FSYNC_POOL.map(_attempt, [sync] * len(paths), paths) if e]
    if errors:
        raise errors[0]


def _attempt(sync: Callable[[Path], None], path: Path) -> OSError | None:
    try:
        sync(path)
    except OSError as exc:
        return exc
    return None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _dir_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (0 if it is gone)."""
    total = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as it:
        for entry in it:
            with contextlib.suppress(FileNotFoundError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _tree_bytes(objects: Path) -> int:
    """Bytes under ``objects/<id[:2]>/<id>/``: what a store holds when it opens."""
    total = 0
    with os.scandir(objects) as prefixes:
        for prefix in prefixes:
            if not prefix.is_dir(follow_symlinks=False):
                continue
            with os.scandir(prefix.path) as folders:
                for folder in folders:
                    if folder.is_dir(follow_symlinks=False):
                        total += _dir_bytes(Path(folder.path))
    return total


def _read_json(path: Path) -> dict[str, Any] | None:
    return _read_json_at(str(path))


def _read_json_at(path: str) -> dict[str, Any] | None:
    """A JSON object from a file (None if the file is missing or holds no object)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECORD_BYTES * 3)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        doc = orjson.loads(raw)
    except ValueError as exc:
        raise StorageError("internal", f"{os.path.basename(path)} is damaged") from exc
    return doc if isinstance(doc, dict) else None


def _sorted_folders(folder: str) -> list[str]:
    """The names of the folders in ``folder``, sorted ([] if it is gone)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _check_ids(object_id: str, version_id: str | None = None) -> None:
    if not is_object_id(object_id):
        raise StorageError("bad_request", "object id must be 64 lowercase hex digits")
    if version_id is not None and not is_version_id(version_id):
        raise StorageError("bad_request", "version id must be 32 lowercase hex digits")


def _is_length(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_digest(meta: dict[str, Any]) -> str | None:
    """The digest a .meta file gives its stripe; those of older servers held bare SHA-256."""
    if "digest" in meta:
        return meta["digest"] if is_digest(meta["digest"]) else None
    return from_sha256_hex(meta.get("sha256"))
