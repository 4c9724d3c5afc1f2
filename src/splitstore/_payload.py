"""The encrypted byte stream of a stored version, and cutting any stream into stripes.

With encryption on, what is cut into chunks is not the file but its ciphertext: the
(padded) plaintext sealed 64 KiB segment by segment (``_crypto.PayloadCipher``). Sealed
segments are 16 bytes longer than a chunk-aligned size, so the stream is cut with a
carry-over (``RoundCutter``): every piece handed to the uploads is a whole number of
chunk rounds, except the stream's tail.

``StreamSealer`` and ``StreamOpener`` work a block at a time from one worker thread;
memory stays at about a block whatever the file size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._crypto import SEGMENT_SIZE, TAG_SIZE, DecryptionFailed, PayloadCipher, segment_count
from ._stripes import split_block

__all__ = ["PLAIN_BLOCK_BYTES", "RoundCutter", "SegmentFailed", "StreamOpener", "StreamSealer"]

# Plaintext read and sealed at once: 64 segments, 4 MiB.
PLAIN_BLOCK_BYTES = 64 * SEGMENT_SIZE
_SEALED_SEGMENT = SEGMENT_SIZE + TAG_SIZE


@dataclass(frozen=True)
class SegmentFailed(Exception):
    """A segment did not authenticate; ``start``/``end`` are its offsets in the stream."""

    index: int
    start: int
    end: int


class StreamSealer:
    """Seals a plaintext of known size, handed over in blocks of whole segments."""

    def __init__(self, cipher: PayloadCipher, size: int) -> None:
        self._cipher = cipher
        self._segments = segment_count(size)
        self._next = 0

    def seal(self, block: bytes | memoryview) -> bytes:
        """Seal ``block``: whole segments, except that the plaintext's last may be short."""
        view = memoryview(block)
        out = []
        for start in range(0, max(len(view), 1), SEGMENT_SIZE):
            index = self._next
            if index >= self._segments:
                raise ValueError("more plaintext than declared")
            part = view[start : start + SEGMENT_SIZE]
            last = index == self._segments - 1
            if not last and len(part) != SEGMENT_SIZE:
                raise ValueError("only the last segment may be short")
            out.append(self._cipher.seal(index, part, last))
            self._next += 1
            if not view:
                break
        return b"".join(out)

    @property
    def done(self) -> bool:
        return self._next == self._segments


class StreamOpener:
    """Opens a sealed stream of known length fed in pieces of any size.

    ``feed`` returns the plaintext of every segment completed by the new bytes; a segment
    that does not authenticate raises SegmentFailed, and no byte of it is returned.
    """

    def __init__(self, cipher: PayloadCipher, stream_size: int) -> None:
        self._cipher = cipher
        self._size = stream_size
        self._segments = -(-stream_size // _SEALED_SEGMENT) if stream_size else 1
        self._buffer = bytearray()
        self._index = 0
        self._offset = 0  # stream offset of the buffer's first byte

    def _want(self) -> int:
        if self._index == self._segments - 1:
            return self._size - self._offset
        return _SEALED_SEGMENT

    def feed(self, data: bytes | memoryview) -> bytes:
        self._buffer += data
        out = []
        view = memoryview(self._buffer)
        used = 0
        try:
            while self._index < self._segments:
                want = self._want()
                if len(view) - used < want:
                    break
                # bytes, not a slice of the view: a live slice would pin the buffer.
                sealed = bytes(view[used : used + want])
                last = self._index == self._segments - 1
                try:
                    out.append(self._cipher.open(self._index, sealed, last))
                except DecryptionFailed:
                    raise SegmentFailed(self._index, self._offset, self._offset + want) from None
                used += want
                self._offset += want
                self._index += 1
        finally:
            view.release()
            del self._buffer[:used]
        return b"".join(out)

    def finish(self) -> None:
        """Check that the whole stream arrived (a short stream never reaches its last flag)."""
        if self._index != self._segments or self._buffer:
            want = self._want() if self._index < self._segments else 0
            raise SegmentFailed(self._index, self._offset, self._offset + want)


class RoundCutter:
    """Cuts a stream fed in pieces of any size into per-server pieces of whole rounds."""

    def __init__(self, chunk_size: int, servers: int) -> None:
        self._chunk = chunk_size
        self._servers = servers
        self._round = chunk_size * servers
        self._carry = b""

    def push(self, data: bytes) -> list[bytes] | None:
        """Per-server pieces of every whole round now available, or None if none is."""
        buffered = self._carry + data if self._carry else data
        whole = len(buffered) - len(buffered) % self._round
        self._carry = buffered[whole:]
        if not whole:
            return None
        return split_block(memoryview(buffered)[:whole], self._chunk, self._servers)

    def finish(self) -> list[bytes] | None:
        """The pieces of the stream's last, partial round (None if it ended on a round)."""
        tail, self._carry = self._carry, b""
        if not tail:
            return None
        return split_block(tail, self._chunk, self._servers)
