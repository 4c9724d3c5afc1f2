"""The client: store, fetch, list, stat, delete and verify files across the two servers.

Storing a file streams it once: each block is hashed, cut into one piece per server, and
the pieces flow through bounded queues into one upload per server, both servers at once.
Only when both stripes are in place is the manifest written to both (the commit point).
Fetching streams both stripes back, interleaves them into a temporary file beside the
destination, and renames it into place only once every hash matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

from ._coalesce import CoalescingRemote
from ._config import Config, load_config
from ._crypto import PayloadCipher, ciphertext_size, manifest_key_id, new_file_key, padme
from ._digest import Hasher, hasher_for, new_check_hasher
from ._errors import (
    ConfigError,
    IntegrityError,
    LocalFileError,
    MaliciousFileError,
    NotFoundError,
    RollbackError,
    SplitStoreError,
    WrongKeyError,
)
from ._http_client import HttpsRemote
from ._keyring import Keyring
from ._keys import load_master_key
from ._localfile import open_regular_file
from ._manifest import DIGEST_FORMAT, PAYLOAD_ENCRYPTION, Manifest, StripeInfo
from ._many import (
    FileCallback,
    FileSpec,
    ManyScanCallback,
    fetch_many,
    large_read_turn,
    store_many,
)
from ._names import new_version_id, validate_name
from ._payload import SegmentFailed, StreamOpener, StreamSealer
from ._pipeline import PieceSink, PieceSource
from ._remote import Remote, StripeReader
from ._state import Seen, SeenVersions
from ._storage import ObjectRecord
from ._stripes import block_size_for, stripe_chunk_counts, stripe_lengths
from ._syncing import SyncingWriter
from ._tcp_client import TcpRemote
from ._threads import in_thread, in_thread_to_the_end, outlast
from ._tls import client_ssl_context
from .scanning import Scanner, ScanReport, ScanStream

__all__ = ["AsyncClient", "Client", "FileInfo", "ProgressCallback", "ScanCallback"]

#: Called with (bytes done, bytes in all) as a transfer moves on.
ProgressCallback = Callable[[int, int], None]
#: Called by ``fetch`` with the scan of the fetched file, and the one recorded at store time.
ScanCallback = Callable[[ScanReport, "ScanReport | None"], None]

# Records looked at before "not found" is put down to a wrong key (a namespace of
# another key's files shows that at once; one of this key's files rules it out).
_KEY_PROBE_RECORDS = 16
# The 1 MiB buffers a fetched file's direct writes may hold: up to seven waiting for the
# disk (at most four written at once) while the eighth fills, as the next block is joined
# and decrypted: about two blocks' worth. Written in the fetch's own thread,
# the disk's time added to that work and the event loop waited for it about half the time.
FETCH_WRITE_DEPTH = 8

# Read size when a stripe is read again only to hash it.
_REHASH_BYTES = 1024 * 1024

# Blocks queued per server between the file reader and the uploads; with ~4 MiB blocks
# this bounds the client's buffers to a few tens of MiB whatever the file size.
QUEUE_DEPTH = 4

T = TypeVar("T")


@dataclass(frozen=True)
class FileInfo:
    """A stored file as its manifest describes it."""

    name: str
    size: int
    chunk_size: int
    chunks: int
    chunks_per_server: dict[str, int]
    bytes_per_server: dict[str, int]
    sha256: str
    version_id: str
    stored_at: float
    #: Servers holding the committed manifest of this version (both, unless a store was cut off).
    committed_on: tuple[str, ...] = field(default=())
    #: Stored encrypted (the servers hold ciphertext chunks and a sealed manifest).
    encrypted: bool = False
    #: What the malicious-file checks found when this version was stored (None: not scanned).
    scan: ScanReport | None = None

    @classmethod
    def from_manifest(cls, m: Manifest, committed_on: Sequence[str] = ()) -> FileInfo:
        servers = [s.server for s in m.stripes]
        counts = stripe_chunk_counts(m.stored_size, m.chunk_size, len(servers))
        return cls(
            name=m.name,
            size=m.size,
            chunk_size=m.chunk_size,
            chunks=sum(counts),
            chunks_per_server=dict(zip(servers, counts, strict=True)),
            bytes_per_server={s.server: s.length for s in m.stripes},
            sha256=m.sha256,
            version_id=m.version_id,
            stored_at=m.created_ns / 1e9,
            committed_on=tuple(committed_on),
            encrypted=m.encrypted,
            scan=m.scan,
        )

    def to_json(self) -> dict[str, Any]:
        # Field by field rather than asdict(), which deep-copies: ls --json makes thousands.
        return {
            "name": self.name,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "chunks_per_server": dict(self.chunks_per_server),
            "bytes_per_server": dict(self.bytes_per_server),
            "sha256": self.sha256,
            "version_id": self.version_id,
            "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.stored_at)),
            "committed_on": list(self.committed_on),
            "encrypted": self.encrypted,
            "scan": None if self.scan is None else self.scan.to_json(),
        }


@dataclass(frozen=True)
class _Candidate:
    manifest: Manifest
    committed_on: tuple[str, ...]

    def order(self) -> tuple[int, str]:
        return (self.manifest.created_ns, self.manifest.version_id)


@dataclass(frozen=True)
class _Versions:
    """What the servers hold of a name, newest first, and what this client saw before."""

    oid: str
    candidates: list[_Candidate]
    seen: Seen | None


class AsyncClient:
    """A session with both servers; connections stay open across operations.

    ``config`` is a Config, a path to a config file, or None to find one as the CLI does.
    Use it as an async context manager, or call ``close()``. With encryption on (the
    default), the master key is loaded on first use; a passphrase key file reads
    ``$SPLITSTORE_PASSPHRASE`` or asks at the terminal.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self._remotes: list[Remote] | None = None
        self._keyring: Keyring | None = None
        self._seen: SeenVersions | None = None
        # Both servers answered a ping in this session (done), or are being asked.
        self._reached: asyncio.Future[list[None]] | None = None
        self._scanner: Scanner | None = None
        self._scanner_lock = threading.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        remotes, self._remotes = self._remotes, None
        self._reached = None
        for remote in remotes or ():
            await remote.close()
        seen, self._seen = self._seen, None
        if seen is not None:
            seen.close()

    def remotes(self) -> list[Remote]:
        if self._remotes is None:
            cfg = self.config
            token = cfg.token()
            ssl_context = client_ssl_context(cfg.ca_file)
            remotes: list[Remote] = []
            for server in cfg.servers:
                common: dict[str, Any] = {
                    "connect_timeout": cfg.connect_timeout,
                    "io_timeout": cfg.io_timeout,
                    "label": server.label,
                }
                if server.kind == "https":
                    remotes.append(
                        HttpsRemote(server.host, server.port, token, ssl_context, **common)
                    )
                else:
                    tls = ssl_context if server.tls else None
                    remotes.append(TcpRemote(server.host, server.port, token, tls, **common))
            # Small requests of concurrent stores and fetches share batches.
            self._remotes = [CoalescingRemote(r) for r in remotes]
        return self._remotes

    def keyring(self) -> Keyring:
        """The keys this config uses (loading the master key the first time)."""
        if self._keyring is None:
            cfg = self.config
            master = None
            if cfg.encrypted:
                assert cfg.key_file is not None  # parse_config guarantees it
                master = load_master_key(cfg.key_file)
            self._keyring = Keyring(master)
        return self._keyring

    def object_id(self, name: str) -> str:
        """The opaque id the servers keep ``name`` under."""
        return self.keyring().object_id(validate_name(name))

    def scanner(self) -> Scanner | None:
        """The malicious-file checks this config asks for (None when ``[scan]`` is off);
        built on first use, when rules are compiled and bad rule files are reported."""
        if not self.config.scan.enabled:
            return None
        if self._scanner is None:
            with self._scanner_lock:
                if self._scanner is None:
                    self._scanner = Scanner(self.config.scan)
        return self._scanner

    async def _scanner_off_loop(self) -> Scanner | None:
        # Building one compiles the YARA rules and loads libmagic (most of a second): in a
        # thread, so that transfers sharing this event loop do not stall meanwhile.
        if not self.config.scan.enabled:
            return None
        if self._scanner is not None:
            return self._scanner
        return await asyncio.to_thread(self.scanner)

    def _seen_versions(self) -> SeenVersions:
        if self._seen is None:
            self._seen = SeenVersions(self.config.state_path())
        return self._seen

    # -- store ---------------------------------------------------------------------------

    async def store(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: ProgressCallback | None = None,
        allow_unsafe: bool = False,
    ) -> FileInfo:
        """Store a local file under ``name`` (default: its base name); return what was stored.

        The file is scanned first (unless the config turns scanning off): one the policy
        blocks is refused with MaliciousFileError before a byte is sent, unless
        ``allow_unsafe``. The scan's result is recorded in the manifest.
        """
        source_path = Path(path)
        name = validate_name(source_path.name if name is None else name)
        keyring = self.keyring()
        remotes = self.remotes()
        oid = keyring.object_id(name)
        with open_regular_file(source_path) as f:
            # Scanned, the file was hashed (SHA-256) as it was scanned: this read is only
            # checked against that one, with BLAKE3 (the bytes sent must be those scanned).
            scanned = new_check_hasher()
            report = await self._scan_before_store(f, source_path, name, allow_unsafe, scanned)
            sent = None if report is None else new_check_hasher()
            seen = self._seen_versions()
            await self._reach(remotes)
            size = os.fstat(f.fileno()).st_size
            chunk, k = self.config.chunk_size, len(remotes)
            version_id = new_version_id()
            # Versions are ordered by creation time; never go back behind one this client
            # has seen, whatever its clock does.
            before = seen.get(oid)
            created_ns = max(time.time_ns(), before.created_ns + 1 if before else 0)
            file_key: bytes | None = None
            if keyring.encrypted:
                padded = padme(size) if self.config.padding == "padme" else size
                file_key = new_file_key()
                sealer = StreamSealer(PayloadCipher(file_key, oid, version_id), padded)
                pieces = PieceSource(f, size, chunk, k, sealer, padded, whole=sent)
                stored_size = ciphertext_size(padded)
            else:
                padded, stored_size = size, size
                pieces = PieceSource(f, size, chunk, k, whole=sent)
            lengths = stripe_lengths(stored_size, chunk, k)
            queues: list[asyncio.Queue[bytes | None]] = [
                asyncio.Queue(maxsize=QUEUE_DEPTH) for _ in remotes
            ]

            async def produce() -> None:
                while (block := await in_thread_to_the_end(pieces.next_pieces)) is not None:
                    for queue, piece in zip(queues, block, strict=True):
                        await queue.put(piece)
                    if progress:
                        progress(min(pieces.done, size), size)
                for queue in queues:
                    await queue.put(None)

            async def drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
                while (piece := await queue.get()) is not None:
                    if piece:
                        yield piece

            uploads = [
                r.put_stripe(oid, version_id, n, drain(q))
                for r, n, q in zip(remotes, lengths, queues, strict=True)
            ]
            results = await _run_all([produce(), *uploads])
        if progress and size == 0:
            progress(0, 0)
        stripes = []
        for remote, length, local, remote_digest in zip(
            remotes, lengths, pieces.stripes, results[1:], strict=True
        ):
            if remote_digest != local.digest():
                raise IntegrityError(
                    f"the {remote.label} received different bytes than were sent",
                    server=remote.label,
                )
            stripes.append(StripeInfo(remote.kind, length, remote_digest))
        if report is not None and pieces.whole.hexdigest() != scanned.hexdigest():
            raise LocalFileError(
                f"{source_path} changed while it was being stored (the bytes sent are not "
                "the bytes scanned); nothing was committed, store it again"
            )
        manifest = Manifest(
            name=name,
            size=size,
            chunk_size=chunk,
            sha256=pieces.whole.hexdigest() if report is None else report.sha256,
            version_id=version_id,
            created_ns=created_ns,
            stripes=tuple(stripes),
            format=DIGEST_FORMAT,
            encryption="none" if file_key is None else PAYLOAD_ENCRYPTION,
            padded_size=None if file_key is None else padded,
            file_key=None if file_key is None else file_key.hex(),
            scan=report,
        )
        body = keyring.seal(oid, manifest)
        # Both commits run to their end, even if one fails, so we can say where it landed.
        outcomes = await asyncio.gather(
            *(
                r.commit(oid, ObjectRecord(version_id, s.length, s.digest, body))
                for r, s in zip(remotes, stripes, strict=True)
            ),
            return_exceptions=True,
        )
        committed = [r.label for r, o in zip(remotes, outcomes, strict=True) if o is None]
        if committed:
            # Even half-committed, this version may be served now: remember it, so that the
            # older one is never taken for current again.
            seen.note(oid, Seen(created_ns, version_id))
        failed = [o for o in outcomes if o is not None]
        if failed:
            error = failed[0]
            if committed:
                note = (
                    f"; the new version was committed only on the {committed[0]}, so fetch may "
                    "return it: store the file again"
                )
            else:
                note = "; the previous version, if any, is unchanged"
            if isinstance(error, SplitStoreError):
                error.args = (f"{error}{note}",)
            raise error
        return FileInfo.from_manifest(manifest, [r.kind for r in remotes])

    async def _reach(self, remotes: list[Remote]) -> None:
        """Once per session: a server that is down, or refuses the token, is named before
        any of a file is read (later stores learn it from the upload). Stores that start
        together share the one ping, rather than each opening connections of its own."""
        stale = (
            self._reached is not None
            and self._reached.done()
            and (self._reached.cancelled() or self._reached.exception() is not None)
        )
        if self._reached is None or stale:  # a failure no one was left to see: ask again
            self._reached = asyncio.ensure_future(_run_all([r.ping() for r in remotes]))
        reached = self._reached
        try:
            await asyncio.shield(reached)
        except BaseException:
            if reached.done() and self._reached is reached:
                self._reached = None  # the next store asks again
            raise

    async def _scan_before_store(
        self, f: io.BufferedReader, path: Path, name: str, allow_unsafe: bool, also: Hasher
    ) -> ScanReport | None:
        """The file's scan (None when scanning is off), ``also`` updated with its bytes."""
        scanner = await self._scanner_off_loop()
        if scanner is None:
            return None
        # The stored name's extension is what a recipient will see. To the thread's end
        # even if cancelled: the caller closes ``f`` as soon as this returns.
        report = await in_thread_to_the_end(
            functools.partial(scanner.scan_open_file, f, path, _base_name(name), also=also)
        )
        f.seek(0)
        if report.verdict == "malicious" and not allow_unsafe:
            raise MaliciousFileError(f"{name!r} was not stored: {report.summary()}", report)
        return report

    async def store_many(
        self,
        files: Iterable[FileSpec],
        *,
        allow_unsafe: bool = False,
        on_file: FileCallback | None = None,
    ) -> list[FileInfo]:
        """Store many files, each as ``store`` would; what was stored, in the given order.

        ``files`` holds paths, or (path, name) pairs. Small files are stored many at a
        time, their requests to each server sharing batches, which makes them several
        times faster than one ``store`` after another. Every file is tried; if any
        failed, BatchError says which (``results``) after the rest are stored.
        ``on_file(index, outcome)`` is told of each file as it ends.
        """
        return await store_many(self, files, allow_unsafe=allow_unsafe, on_file=on_file)

    async def fetch_many(
        self,
        names: Iterable[str],
        folder: str | os.PathLike[str],
        *,
        force: bool = False,
        allow_unsafe: bool = False,
        on_file: FileCallback | None = None,
        on_scan: ManyScanCallback | None = None,
    ) -> list[Path]:
        """Fetch many files into ``folder`` (each under its base name), each as ``fetch``
        would; the paths written, in the given order. As ``store_many``, small files
        share batches, every file is tried, BatchError reports those that failed, and
        ``on_file`` is told of each as it ends; ``on_scan`` gets each file's name and scans.
        """
        return await fetch_many(
            self,
            names,
            folder,
            force=force,
            allow_unsafe=allow_unsafe,
            on_file=on_file,
            on_scan=on_scan,
        )

    # -- fetch and verify ----------------------------------------------------------------

    async def fetch(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
        allow_unsafe: bool = False,
        on_scan: ScanCallback | None = None,
    ) -> Path:
        """Rebuild ``name`` into ``dest`` (default: its base name in the current folder).

        Nothing appears at ``dest`` unless every byte checked out; an existing file there
        is replaced only with ``force``. Returns the path written.

        The reassembled file is scanned as it is written (unless the config turns scanning
        off), and one the policy blocks is not delivered (MaliciousFileError) unless
        ``allow_unsafe``. ``on_scan`` receives that scan and the one recorded at store time.
        """
        name = validate_name(name)
        try:
            target = _output_path(name, dest)
            exists = target.exists()
        except OSError as exc:  # e.g. a name longer than the file system allows
            where = exc.filename or dest or name
            raise LocalFileError(f"cannot write {where}: {exc.strerror}") from exc
        if exists and not force:
            raise LocalFileError(f"{target} already exists (use --force to overwrite it)")
        # Built before the temporary file is made: a bad rule file leaves nothing behind.
        scanner = await self._scanner_off_loop()
        versions = await self._candidates(name)
        try:
            fd, tmp_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name[:64]}.", suffix=".splitstore-part"
            )
        except OSError as exc:
            raise LocalFileError(f"cannot write in {target.parent}: {exc.strerror}") from exc
        tmp = Path(tmp_name)
        try:
            # Scanned, an archive is read again at the end: kept cached until its first
            # block shows the file is none (_ScanningWriter).
            with (
                os.fdopen(fd, "wb") as raw,
                SyncingWriter(
                    raw, keep_cached=scanner is not None, write_depth=FETCH_WRITE_DEPTH
                ) as disk,
            ):
                file = cast(BinaryIO, disk)
                out = file if scanner is None else _ScanningWriter(disk, scanner, target.name)
                manifest = await self._read_newest(name, versions, cast(BinaryIO, out), progress)
                try:
                    await in_thread_to_the_end(disk.finish)
                except OSError as exc:
                    raise LocalFileError(f"cannot write {tmp}: {exc.strerror}") from exc
            if isinstance(out, _ScanningWriter):
                report = await asyncio.to_thread(out.finish, tmp)
                if report.verdict == "malicious" and not allow_unsafe:
                    raise MaliciousFileError(
                        f"{name!r} was not delivered: {report.summary()}; nothing was written",
                        report,
                    )
                if on_scan is not None:
                    on_scan(report, manifest.scan)
            _apply_umask(tmp)
            _move_into_place(tmp, target, force)
            _fsync_folder(target.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return target

    async def verify(self, name: str, *, progress: ProgressCallback | None = None) -> FileInfo:
        """Read back and check every byte both servers hold for ``name``; write nothing."""
        name = validate_name(name)
        versions = await self._candidates(name)
        newest = versions.candidates[0]
        missing = [r.label for r in self.remotes() if r.kind not in newest.committed_on]
        if missing:
            raise IntegrityError(
                f"{name!r}: the {', '.join(missing)} does not hold the current version's "
                "manifest (a store was cut off, or it serves an older one; store the file "
                "again)",
                server=missing[0],
            )
        try:
            await self._read_version(name, newest.manifest, None, progress)
        except _StripeMissing as exc:
            raise IntegrityError(str(exc), server=exc.server) from None
        self._note_seen(versions.oid, newest)
        return FileInfo.from_manifest(newest.manifest, newest.committed_on)

    async def _read_newest(
        self,
        name: str,
        versions: _Versions,
        out: BinaryIO,
        progress: ProgressCallback | None,
    ) -> Manifest:
        """Read the newest version whose data both servers still hold into ``out``.

        An older one is only taken if it is not older than what this client has seen:
        a server that drops the newest data must not make an older version current.
        """
        candidates = versions.candidates
        for i, candidate in enumerate(candidates):
            try:
                await self._read_version(name, candidate.manifest, out, progress)
            except _StripeMissing as exc:
                # Fall back only to a version no older than what this client has seen.
                fallback = candidates[i + 1] if i + 1 < len(candidates) else None
                seen = versions.seen
                if fallback is None or (seen is not None and fallback.order() < seen.order()):
                    raise IntegrityError(str(exc), server=exc.server) from None
                out.seek(0)
                out.truncate()
            else:
                self._note_seen(versions.oid, candidate)
                return candidate.manifest
        raise AssertionError("unreachable: there is always a candidate")

    def _note_seen(self, oid: str, candidate: _Candidate) -> None:
        self._seen_versions().note(oid, Seen(*candidate.order()))

    async def _read_version(
        self,
        name: str,
        manifest: Manifest,
        out: BinaryIO | None,
        progress: ProgressCallback | None,
    ) -> None:
        remotes = self.remotes()
        oid = self.object_id(name)
        chunk, k, stored = manifest.chunk_size, len(remotes), manifest.stored_size
        expected = [manifest.stripe_for(r.kind) for r in remotes]
        cipher = self.keyring().payload_cipher(oid, manifest)
        opener = StreamOpener(cipher, stored) if cipher is not None else None
        # Encrypted, the tags check every byte: the stripes are hashed only if one fails.
        plain_digests = [info.digest for info in expected] if cipher is None else []
        sink = PieceSink(manifest.size, chunk, k, out, opener, stripe_digests=plain_digests)
        if isinstance(out, _ScanningWriter):
            # The scan takes the manifest's SHA-256 instead of hashing the file again.
            # Encrypted, the tags check every byte against the sealed manifest that
            # carries it (only a sealed manifest may carry a file key: Keyring.open);
            # unencrypted, the sink hashes the file and compares it with the manifest
            # below, before the scan's report is used.
            out.vouch_sha256(manifest.sha256)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(large_read_turn(stored))
            readers: list[StripeReader] = []
            for remote, info in zip(remotes, expected, strict=True):
                try:
                    reader = await stack.enter_async_context(
                        remote.get_stripe(oid, manifest.version_id, expected_length=info.length)
                    )
                except NotFoundError:
                    raise _StripeMissing(
                        f"the {remote.label} no longer holds the data of {name!r}", remote.label
                    ) from None
                readers.append(reader)
            for remote, reader, info in zip(remotes, readers, expected, strict=True):
                if reader.length != info.length:
                    raise IntegrityError(
                        f"the {remote.label} holds {reader.length} bytes of {name!r} where "
                        f"{info.length} were stored: its data was cut short or extended",
                        server=remote.label,
                    )
            block_size, done = block_size_for(chunk, k), 0
            writing: asyncio.Future[None] | None = None
            try:
                while done < stored:
                    block = min(block_size, stored - done)
                    wanted = stripe_lengths(block, chunk, k)
                    pieces = await _run_all(
                        [r.read(n) for r, n in zip(readers, wanted, strict=True)]
                    )
                    for remote, piece, n in zip(remotes, pieces, wanted, strict=True):
                        if len(piece) != n:
                            raise IntegrityError(
                                f"the {remote.label}'s data of {name!r} ended early",
                                server=remote.label,
                            )
                    if writing is not None:
                        await asyncio.shield(writing)
                    writing = in_thread(sink.take, pieces)
                    done += block
                    if progress:
                        progress(
                            min(done * manifest.size // max(stored, 1), manifest.size),
                            manifest.size,
                        )
                if writing is not None:
                    await asyncio.shield(writing)
                await in_thread_to_the_end(sink.finish)
            finally:
                if writing is not None:
                    # On failure, a write may still run in its thread: let it end before
                    # the caller closes ``out``, even through a further cancellation; the
                    # error being raised says more than its own. (It was awaited through
                    # a shield, so a cancellation did not cancel ``writing`` while its
                    # thread went on.)
                    await outlast(writing)
        if progress and stored == 0:
            progress(0, 0)
        where = _damaged_range(sink.failed, chunk)
        digests: list[str | None] = [None] * k  # None: not hashed, nothing to compare
        if cipher is None:
            digests = [d.digest() for d in sink.stripes]
        elif sink.failed is not None:
            # Encrypted, every segment is authenticated, so the stripes are hashed only now
            # that something is wrong: to name the server whose data it is.
            digests = [*await self._hash_stripes(oid, manifest)]
        for remote, info, digest in zip(remotes, expected, digests, strict=True):
            if digest is not None and digest != info.digest:
                raise IntegrityError(
                    f"the {remote.label}'s data of {name!r} is damaged (its digest does not "
                    f"match the manifest{where}); nothing was written",
                    server=remote.label,
                )
        if sink.failed is not None:
            raise IntegrityError(
                f"{name!r} does not decrypt{where}, though each server's data matches its "
                "manifest; nothing was written"
            )
        # Encrypted, the tags have checked every byte and ``whole`` is None.
        if sink.whole is not None and sink.whole.hexdigest() != manifest.sha256:
            raise IntegrityError(
                f"{name!r} reassembled to different bytes than were stored; nothing was written"
            )

    async def _hash_stripes(self, oid: str, manifest: Manifest) -> list[str]:
        """The digest of each server's stripe of a version, read again in full, each by
        the algorithm the manifest names for it."""
        version_id = manifest.version_id

        async def digest(remote: Remote) -> str:
            info = manifest.stripe_for(remote.kind)
            h = hasher_for(info.digest)
            async with contextlib.AsyncExitStack() as stack:
                try:
                    reader = await stack.enter_async_context(remote.get_stripe(oid, version_id))
                except NotFoundError:
                    raise IntegrityError(
                        f"the {remote.label} no longer holds the data it was just serving",
                        server=remote.label,
                    ) from None
                if reader.length != info.length:  # never read on for a length it made up
                    raise IntegrityError(
                        f"the {remote.label} now holds {reader.length} bytes where "
                        f"{info.length} were stored: its data is damaged",
                        server=remote.label,
                    )
                done = 0
                while done < reader.length:
                    piece = await reader.read(min(_REHASH_BYTES, reader.length - done))
                    if not piece:
                        break
                    h.update(piece)
                    done += len(piece)
            return h.digest()

        return await _run_all([digest(r) for r in self.remotes()])

    async def _candidates(self, name: str) -> _Versions:
        """The versions of ``name`` the servers hold, newest first.

        Raises RollbackError if the newest is older than a version this client has seen
        (stored, fetched or deleted): a server is serving an outdated manifest.
        """
        remotes = self.remotes()
        keyring = self.keyring()
        oid = keyring.object_id(name)
        outcomes = await _run_all([_none_if_missing(r.get_record(oid)) for r in remotes])
        opened: list[tuple[Remote, ObjectRecord, Manifest]] = []
        wrong_key: list[tuple[Remote, WrongKeyError]] = []
        for remote, record in zip(remotes, outcomes, strict=True):
            if record is None:
                continue
            try:
                opened.append(
                    (remote, record, keyring.open(oid, record.manifest, remote.label, name))
                )
            except WrongKeyError as exc:
                wrong_key.append((remote, exc))
        if wrong_key and opened:
            # The key id is not secret: a server can rewrite it to pose as a key problem.
            remote = wrong_key[0][0]
            raise IntegrityError(
                f"the {remote.label}'s manifest of {name!r} names another master key, while "
                f"the {opened[0][0].label}'s opens with this one: it was forged or damaged",
                server=remote.label,
            )
        if wrong_key:
            raise wrong_key[0][1]
        found: dict[str, tuple[Manifest, bytes, list[str]]] = {}
        for remote, record, manifest in opened:
            if manifest.name != name:
                raise IntegrityError(
                    f"the {remote.label} answered for {name!r} with the manifest of another file",
                    server=remote.label,
                )
            if [st.server for st in manifest.stripes] != [r.kind for r in remotes]:
                raise IntegrityError(
                    f"the {remote.label}'s manifest of {name!r} does not list the servers "
                    "of this setup in order",
                    server=remote.label,
                )
            info = manifest.stripe_for(remote.kind)
            if (
                info is None
                or (record.stripe_length, record.stripe_digest) != (info.length, info.digest)
                or record.version_id != manifest.version_id
            ):
                raise IntegrityError(
                    f"the {remote.label}'s record of {name!r} does not match its manifest",
                    server=remote.label,
                )
            entry = found.get(manifest.version_id)
            if entry is None:
                found[manifest.version_id] = (manifest, record.manifest, [remote.kind])
            elif entry[1] != record.manifest:
                raise IntegrityError(
                    f"the servers hold different manifests for the same version of {name!r}",
                    server=remote.label,
                )
            else:
                entry[2].append(remote.kind)
        before = self._seen_versions().get(oid)
        if not found:
            await self._raise_if_wrong_key(name)
            if before is not None and not before.deleted:
                # This client never deleted it: another client did, or both servers dropped it.
                raise NotFoundError(
                    f"no file named {name!r} is stored (this client saw it stored; it was "
                    "deleted elsewhere, or both servers lost it)"
                )
            raise NotFoundError(f"no file named {name!r} is stored")
        ordered = sorted(found.values(), key=lambda v: (v[0].created_ns, v[0].version_id))
        candidates = [_Candidate(m, tuple(kinds)) for m, _, kinds in reversed(ordered)]
        newest = candidates[0].manifest
        if before is not None and (newest.created_ns, newest.version_id) < before.order():
            stale = [r.label for r in remotes if r.kind in candidates[0].committed_on]
            if before.deleted:
                verb = "serve" if len(stale) > 1 else "serves"
                raise RollbackError(
                    f"{name!r} was deleted by this client at {_when(before.created_ns)}, but "
                    f"the {' and the '.join(stale)} still {verb} it (stored "
                    f"{_when(newest.created_ns)}): if that delete failed there, delete the "
                    "file again; otherwise its data was replayed",
                    server=stale[0],
                )
            raise RollbackError(
                f"the {' and the '.join(stale)} served an older version of {name!r} than this "
                f"client has seen (stored {_when(newest.created_ns)}; the file has a newer "
                f"version since {_when(before.created_ns)}): its data was rolled back or "
                "replayed",
                server=stale[0],
            )
        return _Versions(oid, candidates, before)

    async def _raise_if_wrong_key(self, name: str) -> None:
        """Before saying "not found": is this setup's key the wrong one for the namespace?

        Object ids depend on the key, so with a wrong key every name looks absent. If the
        namespace holds records and the first few are all sealed with another key, say so.
        """
        keyring = self.keyring()
        if not keyring.encrypted:
            return
        others: set[str] = set()
        records = self.remotes()[0].list_records()
        try:
            checked = 0
            async for _, record in records:
                kid = manifest_key_id(record.manifest)
                if kid is not None and kid.hex() == keyring.key_id:
                    return
                if kid is not None:
                    others.add(kid.hex())
                checked += 1
                if checked >= _KEY_PROBE_RECORDS:
                    break
        finally:
            # Stopped early: close the listing now, so its connection is not reused.
            aclose = getattr(records, "aclose", None)
            if aclose is not None:
                await aclose()
        if others:
            raise WrongKeyError(
                f"no file named {name!r} is stored under this config's master key (key id "
                f"{keyring.key_id}), and what is stored was sealed with another master key "
                f"({', '.join(sorted(others))}): use the key it was stored with "
                "('splitstore key import')"
            )

    # -- the rest ------------------------------------------------------------------------

    async def stat(self, name: str) -> FileInfo:
        """What is stored under ``name`` (from the newest manifest; reads no data)."""
        versions = await self._candidates(validate_name(name))
        newest = versions.candidates[0]
        self._note_seen(versions.oid, newest)
        return FileInfo.from_manifest(newest.manifest, newest.committed_on)

    async def list(self) -> list[FileInfo]:
        """Every stored file, sorted by name.

        Entries this client cannot open (damaged, forged, or sealed with another key) are
        left out; ``stat`` or ``verify`` of a name says what is wrong with it. If there are
        entries and none opens because all were sealed with another key, WrongKeyError.
        """
        remotes = self.remotes()
        keyring = self.keyring()
        newest: dict[str, tuple[Manifest, set[str]]] = {}
        wrong_key: WrongKeyError | None = None
        # The same sealed manifest is on both servers: open each one once.
        opened: dict[tuple[str, bytes], Manifest | None] = {}

        def take(remote: Remote, oid: str, record: ObjectRecord) -> None:
            nonlocal wrong_key
            key = (oid, record.manifest)
            if key in opened:
                known = opened[key]
                if known is None:
                    return
                manifest = known
            else:
                opened[key] = None
                try:
                    manifest = keyring.open(oid, record.manifest, remote.label)
                except WrongKeyError as exc:
                    wrong_key = exc
                    return
                except (IntegrityError, ConfigError):
                    return
                if keyring.object_id(manifest.name) != oid:
                    return
                opened[key] = manifest
            entry = newest.get(oid)
            if entry is None or (manifest.created_ns, manifest.version_id) > (
                entry[0].created_ns,
                entry[0].version_id,
            ):
                newest[oid] = (manifest, {remote.kind})
            elif entry[0].version_id == manifest.version_id:
                entry[1].add(remote.kind)

        async def read(remote: Remote) -> None:
            # Each record is taken as it arrives, so opening manifests here overlaps the
            # servers reading theirs, rather than following the slower of the two.
            async for oid, record in remote.list_records():
                take(remote, oid, record)

        await _run_all([read(r) for r in remotes])
        if not newest and wrong_key is not None:
            raise wrong_key
        infos = [
            FileInfo.from_manifest(m, [r.kind for r in remotes if r.kind in kinds])
            for m, kinds in newest.values()
        ]
        return sorted(infos, key=lambda i: i.name)

    async def delete(self, name: str) -> None:
        """Delete ``name`` from both servers."""
        oid = self.object_id(name)
        outcomes = await asyncio.gather(
            *(r.delete(oid) for r in self.remotes()), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) < len(outcomes):
            # Deleted somewhere: from now on, a copy served again is a replay.
            seen = self._seen_versions()
            before = seen.get(oid)
            stamp = max(time.time_ns(), before.created_ns + 1 if before else 0)
            seen.note(oid, Seen(stamp, "", deleted=True))
        if len(errors) == len(outcomes) and all(isinstance(e, NotFoundError) for e in errors):
            raise NotFoundError(f"no file named {name!r} is stored")
        for error in errors:
            if not isinstance(error, NotFoundError):
                raise error


class Client:
    """The blocking face of AsyncClient: one event loop in a background thread.

    >>> with Client("splitstore.toml") as client:          # doctest: +SKIP
    ...     client.store("holiday.mp4")
    ...     client.fetch("holiday.mp4", "restored.mp4")
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None) -> None:
        self._async = AsyncClient(config)
        self.config = self._async.config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="splitstore-client", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            # Let the operation clean up (temp files, connections) before giving up.
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result(timeout=10)
            raise

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._async.close())
        finally:
            # An operation given up on (Ctrl-C, twice, or one slower to clean up than
            # ``_run`` waits) may still run: it ends here, cleaning up, before the loop stops.
            self._run(_settle_other_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def store(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: ProgressCallback | None = None,
        allow_unsafe: bool = False,
    ) -> FileInfo:
        return self._run(
            self._async.store(path, name, progress=progress, allow_unsafe=allow_unsafe)
        )

    def fetch(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
        allow_unsafe: bool = False,
        on_scan: ScanCallback | None = None,
    ) -> Path:
        return self._run(
            self._async.fetch(
                name,
                dest,
                force=force,
                progress=progress,
                allow_unsafe=allow_unsafe,
                on_scan=on_scan,
            )
        )

    def store_many(
        self,
        files: Iterable[FileSpec],
        *,
        allow_unsafe: bool = False,
        on_file: FileCallback | None = None,
    ) -> list[FileInfo]:
        """As AsyncClient.store_many; ``on_file`` is called from the client's own thread."""
        return self._run(self._async.store_many(files, allow_unsafe=allow_unsafe, on_file=on_file))

    def fetch_many(
        self,
        names: Iterable[str],
        folder: str | os.PathLike[str],
        *,
        force: bool = False,
        allow_unsafe: bool = False,
        on_file: FileCallback | None = None,
        on_scan: ManyScanCallback | None = None,
    ) -> list[Path]:
        """As AsyncClient.fetch_many; the callbacks are called from the client's thread."""
        return self._run(
            self._async.fetch_many(
                names,
                folder,
                force=force,
                allow_unsafe=allow_unsafe,
                on_file=on_file,
                on_scan=on_scan,
            )
        )

    def verify(self, name: str, *, progress: ProgressCallback | None = None) -> FileInfo:
        return self._run(self._async.verify(name, progress=progress))

    def stat(self, name: str) -> FileInfo:
        return self._run(self._async.stat(name))

    def list(self) -> list[FileInfo]:
        return self._run(self._async.list())

    def delete(self, name: str) -> None:
        self._run(self._async.delete(name))


# -- helpers ---------------------------------------------------------------------------


class _ScanningWriter:
    """The fetch's output file, scanning each block of plaintext as it is written, so the
    reassembled file is scanned without being read again.

    The file is written to be kept in the page cache, since the scan reads an archive
    again at the end to open its members. Once the first block shows that no engine will
    (it is not an archive), the disk writer is told to write it as an unscanned fetch
    does, past the cache: that is a large file's every byte not copied into fresh pages.
    """

    def __init__(self, disk: SyncingWriter, scanner: Scanner, name: str) -> None:
        self._raw = disk
        self._scanner = scanner
        self._name = name
        self._stream: ScanStream = scanner.stream(name)
        self._cached = True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        # Scanned first, then written (the same bytes): a first block that is already as
        # large as a background sync is then written knowing whether it may be dropped.
        self._stream.feed(data)
        if self._cached and not self._stream.reads_file():
            self._raw.drop_behind()
            self._cached = False
        return self._raw.write(data)

    def vouch_sha256(self, hexdigest: str) -> None:
        self._stream.vouch_sha256(hexdigest)

    def seek(self, offset: int, whence: int = 0) -> int:
        # Only ever to start again (an older version is read instead), before a byte was
        # written, so the file is still cached if the older one is an archive.
        self._stream = self._scanner.stream(self._name)
        return self._raw.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self._raw.truncate(size)

    def finish(self, path: Path) -> ScanReport:
        return self._stream.finish(path)


def _base_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


class _StripeMissing(SplitStoreError):
    def __init__(self, message: str, server: str) -> None:
        super().__init__(message)
        self.server = server


async def _run_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    # The first error that is ours says most; a CancelledError only follows from another.
    for error in errors:
        if isinstance(error, SplitStoreError):
            raise error
    for error in errors:
        if error is not None:
            raise error
    return [t.result() for t in tasks]


async def _settle_other_tasks() -> None:
    """Cancel every other task of this loop and wait until all have ended (as
    ``asyncio.run`` does on its way out)."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


async def _none_if_missing(aw: Awaitable[ObjectRecord]) -> ObjectRecord | None:
    try:
        return await aw
    except NotFoundError:
        return None


def _damaged_range(failed: SegmentFailed | None, chunk: int) -> str:
    """Where the first segment that failed to authenticate lies, for an error message."""
    if failed is None:
        return ""
    first, last = failed.start // chunk + 1, max(failed.start, failed.end - 1) // chunk + 1
    return (
        f"; the first bad segment is #{failed.index}, stored bytes {failed.start}-"
        f"{failed.end - 1}, chunks {first}-{last} counting from 1"
    )


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9))


def _output_path(name: str, dest: str | os.PathLike[str] | None) -> Path:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if dest is None or Path(dest).is_dir():
        if base in ("", ".", ".."):
            raise LocalFileError(f"{name!r} has no usable file name; say where to write it (-o)")
        return Path(dest or ".") / base
    target = Path(dest)
    if not target.parent.is_dir():
        raise LocalFileError(f"the folder {target.parent} does not exist")
    return target


def _read_umask() -> int:
    # os.umask can only be read by setting it, which races with other threads: do it once,
    # at import.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _apply_umask(path: Path) -> None:
    """mkstemp makes 0600 files; give the result the mode a new file normally gets."""
    os.chmod(path, 0o666 & ~_UMASK)


def _move_into_place(tmp: Path, target: Path, force: bool) -> None:
    try:
        if force:
            os.replace(tmp, target)
            return
        # link() fails if the target appeared meanwhile, so nothing is overwritten silently.
        try:
            os.link(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename.
            if target.exists():
                raise FileExistsError(target) from None
            os.replace(tmp, target)
            return
        tmp.unlink()
    except FileExistsError:
        raise LocalFileError(f"{target} already exists (use --force to overwrite it)") from None
    except IsADirectoryError:
        raise LocalFileError(f"{target} is a directory") from None
    except OSError as exc:
        raise LocalFileError(f"cannot write {target}: {exc.strerror}") from exc
