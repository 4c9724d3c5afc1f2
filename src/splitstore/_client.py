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
import hashlib
import os
import stat as stat_mod
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ._config import Config, load_config
from ._errors import (
    IntegrityError,
    LocalFileError,
    NotFoundError,
    SplitStoreError,
)
from ._http_client import HttpsRemote
from ._manifest import Manifest, StripeInfo
from ._names import new_version_id, object_id_for, validate_name
from ._remote import Remote, StripeReader
from ._storage import ObjectRecord
from ._stripes import block_size_for, join_block, split_block, stripe_chunk_counts, stripe_lengths
from ._tcp_client import TcpRemote
from ._tls import client_ssl_context

__all__ = ["AsyncClient", "Client", "FileInfo", "ProgressCallback"]

#: Called with (bytes done, bytes in all) as a transfer moves on.
ProgressCallback = Callable[[int, int], None]

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

    @classmethod
    def from_manifest(cls, m: Manifest, committed_on: Sequence[str] = ()) -> FileInfo:
        servers = [s.server for s in m.stripes]
        counts = stripe_chunk_counts(m.size, m.chunk_size, len(servers))
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
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["committed_on"] = list(self.committed_on)
        doc["stored_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.stored_at))
        return doc


@dataclass(frozen=True)
class _Candidate:
    manifest: Manifest
    committed_on: tuple[str, ...]


class AsyncClient:
    """A session with both servers; connections stay open across operations.

    ``config`` is a Config, a path to a config file, or None to find one as the CLI does.
    Use it as an async context manager, or call ``close()``.
    """

    def __init__(self, config: Config | str | os.PathLike[str] | None = None) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self._remotes: list[Remote] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        remotes, self._remotes = self._remotes, None
        for remote in remotes or ():
            await remote.close()

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
            self._remotes = remotes
        return self._remotes

    # -- store ---------------------------------------------------------------------------

    async def store(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> FileInfo:
        """Store a local file under ``name`` (default: its base name); return what was stored."""
        source = Path(path)
        name = validate_name(source.name if name is None else name)
        remotes = self.remotes()
        with _open_source(source) as f:
            await _run_all([r.ping() for r in remotes])
            size = os.fstat(f.fileno()).st_size
            chunk, k = self.config.chunk_size, len(remotes)
            object_id, version_id = object_id_for(name), new_version_id()
            lengths = stripe_lengths(size, chunk, k)
            queues: list[asyncio.Queue[bytes | None]] = [
                asyncio.Queue(maxsize=QUEUE_DEPTH) for _ in remotes
            ]
            hashes = _StoreHashes(k)

            async def produce() -> None:
                block_size, done = block_size_for(chunk, k), 0
                while True:
                    pieces = await asyncio.to_thread(hashes.read_split, f, block_size, chunk)
                    if pieces is None:
                        break
                    for queue, piece in zip(queues, pieces, strict=True):
                        await queue.put(piece)
                    done += sum(len(p) for p in pieces)
                    if progress:
                        progress(min(done, size), size)
                if done != size:
                    raise LocalFileError(f"{source} changed size while it was being stored")
                for queue in queues:
                    await queue.put(None)

            async def drain(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
                while (piece := await queue.get()) is not None:
                    if piece:
                        yield piece

            uploads = [
                r.put_stripe(object_id, version_id, n, drain(q))
                for r, n, q in zip(remotes, lengths, queues, strict=True)
            ]
            results = await _run_all([produce(), *uploads])
        if progress and size == 0:
            progress(0, 0)
        stripes = []
        for remote, length, local, remote_digest in zip(
            remotes, lengths, hashes.stripes, results[1:], strict=True
        ):
            if remote_digest != local.hexdigest():
                raise IntegrityError(
                    f"the {remote.label} received different bytes than were sent",
                    server=remote.label,
                )
            stripes.append(StripeInfo(remote.kind, length, remote_digest))
        manifest = Manifest(
            name=name,
            size=size,
            chunk_size=chunk,
            sha256=hashes.whole.hexdigest(),
            version_id=version_id,
            created_ns=time.time_ns(),
            stripes=tuple(stripes),
        )
        body = manifest.to_bytes()
        # Both commits run to their end, even if one fails, so we can say where it landed.
        outcomes = await asyncio.gather(
            *(
                r.commit(object_id, ObjectRecord(version_id, s.length, s.sha256, body))
                for r, s in zip(remotes, stripes, strict=True)
            ),
            return_exceptions=True,
        )
        failed = [o for o in outcomes if o is not None]
        if failed:
            error = failed[0]
            committed = [r.label for r, o in zip(remotes, outcomes, strict=True) if o is None]
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

    # -- fetch and verify ----------------------------------------------------------------

    async def fetch(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Rebuild ``name`` into ``dest`` (default: its base name in the current folder).

        Nothing appears at ``dest`` unless every byte checked out; an existing file there
        is replaced only with ``force``. Returns the path written.
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
        candidates = await self._candidates(name)
        try:
            fd, tmp_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name[:64]}.", suffix=".splitstore-part"
            )
        except OSError as exc:
            raise LocalFileError(f"cannot write in {target.parent}: {exc.strerror}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                await self._read_newest(name, candidates, out, progress)
                out.flush()
                os.fsync(out.fileno())
            _apply_umask(tmp)
            _move_into_place(tmp, target, force)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return target

    async def verify(self, name: str, *, progress: ProgressCallback | None = None) -> FileInfo:
        """Read back and check every byte both servers hold for ``name``; write nothing."""
        name = validate_name(name)
        candidates = await self._candidates(name)
        newest = candidates[0]
        missing = [r.label for r in self.remotes() if r.kind not in newest.committed_on]
        if missing:
            raise IntegrityError(
                f"{name!r}: the {', '.join(missing)} does not hold the current version's "
                "manifest (a store was cut off; store the file again)",
                server=missing[0],
            )
        try:
            await self._read_version(name, newest.manifest, None, progress)
        except _StripeMissing as exc:
            raise IntegrityError(str(exc), server=exc.server) from None
        return FileInfo.from_manifest(newest.manifest, newest.committed_on)

    async def _read_newest(
        self,
        name: str,
        candidates: list[_Candidate],
        out: BinaryIO,
        progress: ProgressCallback | None,
    ) -> None:
        for i, candidate in enumerate(candidates):
            try:
                await self._read_version(name, candidate.manifest, out, progress)
                return
            except _StripeMissing as exc:
                if i + 1 == len(candidates):
                    raise IntegrityError(str(exc), server=exc.server) from None
                out.seek(0)
                out.truncate()

    async def _read_version(
        self,
        name: str,
        manifest: Manifest,
        out: BinaryIO | None,
        progress: ProgressCallback | None,
    ) -> None:
        remotes = self.remotes()
        object_id, chunk, k = object_id_for(name), manifest.chunk_size, len(remotes)
        expected = [manifest.stripe_for(r.kind) for r in remotes]
        async with contextlib.AsyncExitStack() as stack:
            readers: list[StripeReader] = []
            for remote in remotes:
                try:
                    reader = await stack.enter_async_context(
                        remote.get_stripe(object_id, manifest.version_id)
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
            hashes = _FetchHashes(k)
            block_size, done, size = block_size_for(chunk, k), 0, manifest.size
            writing: asyncio.Future[None] | None = None
            try:
                while done < size:
                    block = min(block_size, size - done)
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
                        await writing
                    writing = asyncio.ensure_future(
                        asyncio.to_thread(hashes.join_write, pieces, chunk, out)
                    )
                    done += block
                    if progress:
                        progress(done, size)
                if writing is not None:
                    await writing
            finally:
                if writing is not None:
                    # On failure, a write may still run in its thread: let it end before
                    # the caller closes ``out``; the error being raised says more than its own.
                    await asyncio.wait([writing])
                    if not writing.cancelled():
                        writing.exception()
        if progress and size == 0:
            progress(0, 0)
        for remote, info, digest in zip(remotes, expected, hashes.stripes, strict=True):
            if digest.hexdigest() != info.sha256:
                raise IntegrityError(
                    f"the {remote.label}'s data of {name!r} is damaged "
                    "(its SHA-256 does not match the manifest); nothing was written",
                    server=remote.label,
                )
        if hashes.whole.hexdigest() != manifest.sha256:
            raise IntegrityError(
                f"{name!r} reassembled to different bytes than were stored; nothing was written"
            )

    async def _candidates(self, name: str) -> list[_Candidate]:
        """The versions of ``name`` the servers hold, newest first."""
        remotes = self.remotes()
        object_id = object_id_for(name)
        outcomes = await _run_all([_none_if_missing(r.get_record(object_id)) for r in remotes])
        found: dict[str, tuple[Manifest, bytes, list[str]]] = {}
        for remote, record in zip(remotes, outcomes, strict=True):
            if record is None:
                continue
            manifest = Manifest.from_bytes(record.manifest, server=remote.label)
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
                or (record.stripe_length, record.stripe_sha256) != (info.length, info.sha256)
                or record.version_id != manifest.version_id
            ):
                raise IntegrityError(
                    f"the {remote.label}'s record of {name!r} does not match its manifest",
                    server=remote.label,
                )
            seen = found.get(manifest.version_id)
            if seen is None:
                found[manifest.version_id] = (manifest, record.manifest, [remote.kind])
            elif seen[1] != record.manifest:
                raise IntegrityError(
                    f"the servers hold different manifests for the same version of {name!r}",
                    server=remote.label,
                )
            else:
                seen[2].append(remote.kind)
        if not found:
            raise NotFoundError(f"no file named {name!r} is stored")
        ordered = sorted(found.values(), key=lambda v: (v[0].created_ns, v[0].version_id))
        return [_Candidate(m, tuple(kinds)) for m, _, kinds in reversed(ordered)]

    # -- the rest ------------------------------------------------------------------------

    async def stat(self, name: str) -> FileInfo:
        """What is stored under ``name`` (from the newest manifest; reads no data)."""
        newest = (await self._candidates(validate_name(name)))[0]
        return FileInfo.from_manifest(newest.manifest, newest.committed_on)

    async def list(self) -> list[FileInfo]:
        """Every stored file, sorted by name."""
        remotes = self.remotes()
        listings = await _run_all([_collect(r.list_records()) for r in remotes])
        newest: dict[str, tuple[Manifest, set[str]]] = {}
        for remote, listing in zip(remotes, listings, strict=True):
            for object_id, record in listing:
                try:
                    manifest = Manifest.from_bytes(record.manifest, server=remote.label)
                except IntegrityError:
                    continue  # a damaged entry shows up in stat/verify of its name
                if object_id_for(manifest.name) != object_id:
                    continue
                seen = newest.get(object_id)
                if seen is None or manifest.created_ns > seen[0].created_ns:
                    newest[object_id] = (manifest, {remote.kind})
                elif seen[0].version_id == manifest.version_id:
                    seen[1].add(remote.kind)
        infos = [
            FileInfo.from_manifest(m, [r.kind for r in remotes if r.kind in kinds])
            for m, kinds in newest.values()
        ]
        return sorted(infos, key=lambda i: i.name)

    async def delete(self, name: str) -> None:
        """Delete ``name`` from both servers."""
        object_id = object_id_for(validate_name(name))
        outcomes = await asyncio.gather(
            *(r.delete(object_id) for r in self.remotes()), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
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
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def store(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: ProgressCallback | None = None,
    ) -> FileInfo:
        return self._run(self._async.store(path, name, progress=progress))

    def fetch(
        self,
        name: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Path:
        return self._run(self._async.fetch(name, dest, force=force, progress=progress))

    def verify(self, name: str, *, progress: ProgressCallback | None = None) -> FileInfo:
        return self._run(self._async.verify(name, progress=progress))

    def stat(self, name: str) -> FileInfo:
        return self._run(self._async.stat(name))

    def list(self) -> list[FileInfo]:
        return self._run(self._async.list())

    def delete(self, name: str) -> None:
        self._run(self._async.delete(name))


# -- helpers ---------------------------------------------------------------------------


class _StripeMissing(SplitStoreError):
    def __init__(self, message: str, server: str) -> None:
        super().__init__(message)
        self.server = server


class _StoreHashes:
    """Hashes kept while storing; used from one worker thread at a time."""

    def __init__(self, servers: int) -> None:
        self.whole = hashlib.sha256()
        self.stripes = [hashlib.sha256() for _ in range(servers)]

    def read_split(self, f: BinaryIO, block_size: int, chunk: int) -> list[bytes] | None:
        try:
            block = f.read(block_size)
        except OSError as exc:
            raise LocalFileError(f"cannot read the file: {exc.strerror}") from exc
        if not block:
            return None
        self.whole.update(block)
        pieces = split_block(block, chunk, len(self.stripes))
        for digest, piece in zip(self.stripes, pieces, strict=True):
            digest.update(piece)
        return pieces


class _FetchHashes:
    def __init__(self, servers: int) -> None:
        self.whole = hashlib.sha256()
        self.stripes = [hashlib.sha256() for _ in range(servers)]

    def join_write(self, pieces: Sequence[bytes], chunk: int, out: BinaryIO | None) -> None:
        for digest, piece in zip(self.stripes, pieces, strict=True):
            digest.update(piece)
        block = join_block(pieces, chunk)
        self.whole.update(block)
        if out is not None:
            try:
                out.write(block)
            except OSError as exc:
                raise LocalFileError(f"cannot write the output: {exc.strerror}") from exc


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


async def _none_if_missing(aw: Awaitable[ObjectRecord]) -> ObjectRecord | None:
    try:
        return await aw
    except NotFoundError:
        return None


async def _collect(it: AsyncIterator[T]) -> list[T]:
    return [item async for item in it]


_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)


def _open_source(path: Path) -> BinaryIO:
    try:
        # Non-blocking: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK)
    except FileNotFoundError:
        raise LocalFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise LocalFileError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise LocalFileError(f"{path} cannot be read (permission denied)") from None
    except OSError as exc:
        raise LocalFileError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat_mod.S_ISDIR(mode):
            raise LocalFileError(f"{path} is a directory, not a file")
        if not stat_mod.S_ISREG(mode):
            raise LocalFileError(f"{path} is not a regular file")
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


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
