"""The encrypted byte stream of a stored version, and cutting any stream into stripes.

With encryption on, what is cut into chunks is not the file but its ciphertext: the
(padded) plaintext sealed 64 KiB segment by segment (``_crypto.PayloadCipher``). Sealed
segments are 16 bytes longer than a chunk-aligned size, so the stream is cut with a
carry-over: every piece handed to the uploads is a whole number of chunk rounds, except
the stream's tail.

``StreamSealer``, ``RoundSealer`` and ``StreamOpener`` work a block at a time from one
worker thread, sealing and opening into buffers they reuse: a fresh multi-MiB buffer per
block costs more in page faults than the cipher does. Memory stays at a few blocks
whatever the file size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._crypto import SEGMENT_SIZE, TAG_SIZE, DecryptionFailed, PayloadCipher, segment_count

__all__ = [
    "PLAIN_BLOCK_BYTES",
    "RoundSealer",
    "SegmentFailed",
    "StreamOpener",
    "StreamSealer",
]

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

    @staticmethod
    def sealed_size(plain: int) -> int:
        """The most bytes ``seal_into`` writes for a block of ``plain`` bytes."""
        return plain + TAG_SIZE * max(1, -(-plain // SEGMENT_SIZE))

    def seal(self, block: bytes | memoryview) -> bytes:
        """Seal ``block``: whole segments, except that the plaintext's last may be short."""
        out = bytearray(self.sealed_size(len(block)))
        n = self.seal_into(memoryview(block), memoryview(out))
        return bytes(out[:n])

    def seal_into(self, block: memoryview, out: memoryview) -> int:
        """Seal ``block`` into ``out``; return the bytes written."""
        written = 0
        for start in range(0, max(len(block), 1), SEGMENT_SIZE):
            index = self._next
            if index >= self._segments:
                raise ValueError("more plaintext than declared")
            part = block[start : start + SEGMENT_SIZE]
            last = index == self._segments - 1
            if not last and len(part) != SEGMENT_SIZE:
                raise ValueError("only the last segment may be short")
            end = written + len(part) + TAG_SIZE
            self._cipher.seal_into(index, part, last, out[written:end])
            written = end
            self._next += 1
            if not block:
                break
        return written

    @property
    def done(self) -> bool:
        return self._next == self._segments


class RoundSealer:
    """Seals plaintext blocks into one reused buffer and hands out whole chunk rounds.

    ``seal`` returns a view of every whole round now sealed (all of the rest with
    ``last``); it stays valid until the next call. The few bytes short of a round wait at
    the front of the buffer for the next block.
    """

    def __init__(self, sealer: StreamSealer, round_bytes: int, block_bytes: int) -> None:
        self._sealer = sealer
        self._round = round_bytes
        self._buf = bytearray(round_bytes + StreamSealer.sealed_size(block_bytes))
        self._start = 0  # where the carried-over bytes are
        self._carry = 0

    def seal(self, block: memoryview, last: bool) -> memoryview:
        view = memoryview(self._buf)
        if self._carry:
            # Never overlapping: a carry is shorter than a round, and it sits at least a
            # round into the buffer (or already at its front).
            view[: self._carry] = view[self._start : self._start + self._carry]
        end = self._carry + self._sealer.seal_into(block, view[self._carry :])
        cut = end if last else end - end % self._round
        self._start, self._carry = cut, end - cut
        return view[:cut]


class StreamOpener:
    """Opens a sealed stream of known length fed in pieces of any size.

    ``feed`` returns the plaintext of every segment completed by the new bytes, as a view
    of a buffer it reuses (valid until the next call). A segment that does not
    authenticate raises SegmentFailed, and no byte of it is returned.
    """

    def __init__(self, cipher: PayloadCipher, stream_size: int) -> None:
        self._cipher = cipher
        self._size = stream_size
        self._segments = -(-stream_size // _SEALED_SEGMENT) if stream_size else 1
        self._partial = bytearray()  # a segment split across two feeds
        self._out = bytearray()
        self._index = 0
        self._offset = 0  # stream offset of the next segment

    def _want(self) -> int:
        if self._index == self._segments - 1:
            return self._size - self._offset
        return _SEALED_SEGMENT

    def feed(self, data: bytes | memoryview) -> memoryview:
        view = memoryview(data)
        most = len(self._partial) + len(view)
        if len(self._out) < most:
            self._out = bytearray(most)
        out = memoryview(self._out)
        produced = pos = 0
        if self._partial and self._index < self._segments:
            take = min(self._want() - len(self._partial), len(view))
            self._partial += view[:take]
            pos = take
            if len(self._partial) == self._want():
                produced = self._open(memoryview(self._partial), out)
                self._partial.clear()
        while self._index < self._segments and len(view) - pos >= self._want() > 0:
            want = self._want()
            produced += self._open(view[pos : pos + want], out[produced:])
            pos += want
        if self._index == self._segments - 1 and self._want() == 0:
            produced += self._open(view[pos:pos], out[produced:])  # the empty stream
        self._partial += view[pos:]
        return out[:produced]

    def _open(self, sealed: memoryview, out: memoryview) -> int:
        last = self._index == self._segments - 1
        plain = len(sealed) - TAG_SIZE
        if plain < 0:
            raise SegmentFailed(self._index, self._offset, self._offset + len(sealed))
        try:
            self._cipher.open_into(self._index, sealed, last, out[:plain])
        except DecryptionFailed:
            raise SegmentFailed(self._index, self._offset, self._offset + len(sealed)) from None
        self._offset += len(sealed)
        self._index += 1
        return plain

    def finish(self) -> None:
        """Check that the whole stream arrived (a short stream never reaches its last flag)."""
        if self._index != self._segments or self._partial:
            want = self._want() if self._index < self._segments else 0
            raise SegmentFailed(self._index, self._offset, self._offset + want)
