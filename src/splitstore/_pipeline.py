"""A file to per-server pieces (storing), and pieces back to the file (fetching).

Both directions hash as they go: the whole plaintext (storing always, as SHA-256 or on a
scanned store the caller's BLAKE3, to compare with the scan's read; fetching only with
encryption off), and each server's stripe exactly as that server holds it (a stripe
digest, ``_digest``). With encryption on, the
stream between the file and the pieces is the sealed ciphertext (``_payload``); with it
off, it is the file itself. Each call handles one block and runs in a worker thread, one
at a time, so memory stays at a few blocks.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import BinaryIO

from ._digest import Hasher, hasher_for, new_stripe_hasher
from ._errors import LocalFileError
from ._payload import PLAIN_BLOCK_BYTES, RoundSealer, SegmentFailed, StreamOpener, StreamSealer
from ._stripes import block_size_for, join_block, split_block

__all__ = ["PieceSink", "PieceSource"]


class PieceSource:
    """Reads a file of known size and yields one piece per server per block.

    The plaintext stream is the file's ``size`` bytes, then zeros up to ``padded_size``
    (padding only exists when encrypting). A file that grows or shrinks while it is read
    is an error, never a silently different stored version. The file is read into one
    reused buffer; the pieces are fresh bytes, free to queue.
    """

    def __init__(
        self,
        f: io.BufferedIOBase,
        size: int,
        chunk_size: int,
        servers: int,
        sealer: StreamSealer | None = None,
        padded_size: int | None = None,
        *,
        whole: Hasher | None = None,
    ) -> None:
        self._f = f
        self.size = size
        self._padded = size if padded_size is None else padded_size
        self._chunk = chunk_size
        self._servers = servers
        # Encrypting: whole segments per block; else whole chunk rounds per block.
        self._block = PLAIN_BLOCK_BYTES if sealer else block_size_for(chunk_size, servers)
        # No block is longer than the stream: a small file gets small buffers, not 4 MiB
        # of zeroed memory each (half a millisecond per store of a 4 KiB file).
        largest = min(self._block, max(self._padded, 1))
        self._rounds = (
            RoundSealer(sealer, chunk_size * servers, largest) if sealer is not None else None
        )
        self._buf = bytearray(largest)
        # The file's bytes: SHA-256 for the manifest unless the caller has that already.
        self.whole: Hasher = hashlib.sha256() if whole is None else whole
        self.stripes = [new_stripe_hasher() for _ in range(servers)]
        self.done = 0  # plaintext bytes of the stream consumed (file and padding)
        self._ended = False

    def next_pieces(self) -> list[bytes] | None:
        """The next block's pieces, one per server; None once the stream has ended."""
        if self._ended:
            return None
        block = self._read(min(self._block, self._padded - self.done))
        self._ended = self.done == self._padded
        if self._rounds is None:
            if not block:
                return None
            stream = block
        else:
            stream = self._rounds.seal(block, self._ended)
        pieces = split_block(stream, self._chunk, self._servers)
        for digest, piece in zip(self.stripes, pieces, strict=True):
            digest.update(piece)
        return pieces

    def _read(self, n: int) -> memoryview:
        view = memoryview(self._buf)[:n]
        from_file = max(0, min(n, self.size - self.done))
        try:
            got = 0
            while got < from_file:
                count = self._f.readinto(view[got:from_file])
                if not count:
                    raise LocalFileError("the file shrank while it was being stored")
                got += count
            if self.done + from_file == self.size and self._f.read(1):
                raise LocalFileError("the file grew while it was being stored")
        except OSError as exc:
            raise LocalFileError(f"cannot read the file: {exc.strerror}") from exc
        self.whole.update(view[:from_file])
        self.done += n
        if n > from_file:
            view[from_file:] = bytes(n - from_file)
        return view


class PieceSink:
    """Takes one piece per server per block, checks and writes the plaintext.

    With an opener, every byte is checked by its segment's tag, so the plaintext is not
    hashed (``whole`` is None): the manifest's plaintext hash could only repeat what the
    STREAM tags prove. Without one, the plaintext is hashed for the manifest, and with
    ``stripe_digests`` (the manifest's) each stripe too, by the algorithm each names. A
    segment that does not authenticate stops the writing but not the reading, so the
    stripe hashes can still tell which server's data is bad. ``failed`` then holds the
    first failing segment.
    """

    def __init__(
        self,
        size: int,
        chunk_size: int,
        servers: int,
        out: BinaryIO | None,
        opener: StreamOpener | None = None,
        *,
        stripe_digests: Sequence[str] = (),
    ) -> None:
        self._size = size
        self._chunk = chunk_size
        self._out = out
        self._opener = opener
        self.whole = hashlib.sha256() if opener is None else None
        # Without digests (the caller hashes the stripes only if something fails), empty.
        self.stripes = [hasher_for(d) for d in stripe_digests]
        self.failed: SegmentFailed | None = None
        self._written = 0
        self._joined = bytearray()  # reused for each block's interleaved stream

    def take(self, pieces: Sequence[bytes]) -> None:
        if self.stripes:
            for digest, piece in zip(self.stripes, pieces, strict=True):
                digest.update(piece)
        if self.failed is not None:
            return
        block: bytes | memoryview = join_block(pieces, self._chunk, self._joined)
        if self._opener is not None:
            try:
                block = self._opener.feed(block)
            except SegmentFailed as exc:
                self.failed = exc
                return
        self._write(block)

    def finish(self) -> None:
        if self._opener is not None and self.failed is None:
            try:
                self._opener.finish()
            except SegmentFailed as exc:
                self.failed = exc

    def _write(self, block: bytes | memoryview) -> None:
        # Beyond the file's size is padding (authenticated with the rest): not output.
        keep = memoryview(block)[: max(0, self._size - self._written)]
        self._written += len(keep)
        if self.whole is not None:
            self.whole.update(keep)
        if self._out is not None and keep:
            try:
                self._out.write(keep)
            except OSError as exc:
                raise LocalFileError(f"cannot write the output: {exc.strerror}") from exc
