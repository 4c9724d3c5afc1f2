"""The sealed stream and the cutting of it into pieces, without servers."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._crypto import SEGMENT_SIZE, PayloadCipher, ciphertext_size
from splitstore._errors import LocalFileError
from splitstore._payload import RoundSealer, SegmentFailed, StreamOpener, StreamSealer
from splitstore._pipeline import PieceSink, PieceSource
from splitstore._stripes import join_block, stripe_lengths

OID, VID = "ab" * 32, "cd" * 16


def cipher(key: bytes = b"k" * 32) -> PayloadCipher:
    return PayloadCipher(key, OID, VID)


def seal_all(data: bytes, padded: int | None = None) -> bytes:
    padded = len(data) if padded is None else padded
    sealer = StreamSealer(cipher(), padded)
    plain = data + bytes(padded - len(data))
    out = [
        sealer.seal(plain[i : i + 64 * SEGMENT_SIZE])
        for i in range(0, max(padded, 1), 64 * SEGMENT_SIZE)
    ]
    assert sealer.done
    return b"".join(out)


def store_and_fetch(
    data: bytes, padded: int | None = None, chunk: int = 1024
) -> tuple[bytes, list[bytes]]:
    """Run a file through PieceSource and back through PieceSink; return output and stripes."""
    size = len(data)
    padded = size if padded is None else padded
    source = PieceSource(io.BytesIO(data), size, chunk, 2, StreamSealer(cipher(), padded), padded)
    stripes = [bytearray(), bytearray()]
    while (pieces := source.next_pieces()) is not None:
        for stripe, piece in zip(stripes, pieces, strict=True):
            stripe += piece
    stored = ciphertext_size(padded)
    assert [len(s) for s in stripes] == stripe_lengths(stored, chunk, 2)
    out = io.BytesIO()
    made = [d.digest() for d in source.stripes]
    assert all(d.startswith("blake3:") for d in made)
    sink = PieceSink(size, chunk, 2, out, StreamOpener(cipher(), stored), stripe_digests=made)
    # Hand the stripes back in uneven blocks of whole rounds, as the client does.
    done, block = 0, 3 * 2 * chunk
    while done < stored:
        n = min(block, stored - done)
        wanted = stripe_lengths(n, chunk, 2)
        offsets = stripe_lengths(done, chunk, 2)
        sink.take([bytes(s[o : o + w]) for s, o, w in zip(stripes, offsets, wanted, strict=True)])
        done += n
    sink.finish()
    assert sink.failed is None
    assert [d.digest() for d in sink.stripes] == made
    assert sink.whole is None  # the segments' tags checked every byte
    assert hashlib.sha256(out.getvalue()).hexdigest() == source.whole.hexdigest()
    return out.getvalue(), [bytes(s) for s in stripes]


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        1023,
        1024,
        2048,
        SEGMENT_SIZE - 1,
        SEGMENT_SIZE,
        SEGMENT_SIZE + 1,
        5 * SEGMENT_SIZE + 3,
    ],
)
def test_file_through_sealed_pieces_and_back(size: int) -> None:
    data = os.urandom(size)
    out, stripes = store_and_fetch(data)
    assert out == data
    # The stripes interleave to exactly the sealed stream.
    assert bytes(join_block(stripes, 1024)) == seal_all(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * SEGMENT_SIZE), st.integers(0, 5000), st.sampled_from([1, 7, 1024]))
def test_any_file_and_padding_round_trip(data: bytes, extra: int, chunk: int) -> None:
    out, _ = store_and_fetch(data, len(data) + extra, chunk)
    assert out == data  # padding authenticated, never output


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * SEGMENT_SIZE), st.sampled_from([1, 7, 1024]))
def test_round_sealer_gives_whole_rounds_of_the_sealed_stream(data: bytes, chunk: int) -> None:
    sealed = seal_all(data)
    rounds = RoundSealer(StreamSealer(cipher(), len(data)), 2 * chunk, 2 * SEGMENT_SIZE)
    out = bytearray()
    blocks = range(0, max(len(data), 1), 2 * SEGMENT_SIZE)
    for i, start in enumerate(blocks):
        view = rounds.seal(memoryview(data)[start : start + 2 * SEGMENT_SIZE], i == len(blocks) - 1)
        if i < len(blocks) - 1:
            assert len(view) % (2 * chunk) == 0
        out += view
    assert bytes(out) == sealed


def test_opener_names_the_failing_segment_and_releases_nothing_of_it() -> None:
    sealed = bytearray(seal_all(os.urandom(3 * SEGMENT_SIZE)))
    bad = SEGMENT_SIZE + 16 + 100  # inside the second sealed segment
    sealed[bad] ^= 1
    opener = StreamOpener(cipher(), len(sealed))
    first = opener.feed(bytes(sealed[: SEGMENT_SIZE + 16]))
    assert len(first) == SEGMENT_SIZE
    with pytest.raises(SegmentFailed) as info:
        opener.feed(bytes(sealed[SEGMENT_SIZE + 16 :]))
    assert (info.value.index, info.value.start) == (1, SEGMENT_SIZE + 16)
    assert info.value.end == 2 * (SEGMENT_SIZE + 16)


def open_all(sealed: bytes) -> bytes:
    opener = StreamOpener(cipher(), len(sealed))
    out = bytes(opener.feed(sealed))
    opener.finish()
    return out


@pytest.mark.parametrize("segments", [1, 2])
def test_truncation_at_a_segment_boundary_is_caught(segments: int) -> None:
    """The last-segment flag: a stream cut after a whole segment does not pass as complete."""
    sealed = seal_all(os.urandom(2 * SEGMENT_SIZE + 5))
    with pytest.raises(SegmentFailed):
        open_all(sealed[: segments * (SEGMENT_SIZE + 16)])


def test_reordered_segments_do_not_open() -> None:
    data = os.urandom(2 * SEGMENT_SIZE)
    sealed = seal_all(data)
    seg = SEGMENT_SIZE + 16
    swapped = sealed[seg : 2 * seg] + sealed[:seg]
    opener = StreamOpener(cipher(), len(swapped))
    with pytest.raises(SegmentFailed) as info:
        opener.feed(swapped)
    assert info.value.index == 0


def test_a_segment_of_another_version_does_not_open() -> None:
    sealed = seal_all(b"x" * 100)
    other = PayloadCipher(b"k" * 32, OID, "ee" * 16)
    with pytest.raises(SegmentFailed):
        StreamOpener(other, len(sealed)).feed(sealed)


def read_through(source: PieceSource) -> None:
    while source.next_pieces() is not None:
        pass


def test_a_file_that_changes_while_read_is_an_error() -> None:
    with pytest.raises(LocalFileError, match="grew"):
        read_through(PieceSource(io.BytesIO(b"abcdef"), 5, 1024, 2))
    with pytest.raises(LocalFileError, match="shrank"):
        read_through(PieceSource(io.BytesIO(b"abc"), 5, 1024, 2))


def test_a_small_file_gets_small_buffers() -> None:
    """Storing many small files must not zero a whole block's buffers for each one."""
    data = os.urandom(4096)

    def store() -> None:
        source = PieceSource(io.BytesIO(data), len(data), 1024, 2, StreamSealer(cipher(), 4096))
        while source.next_pieces() is not None:
            pass

    store()  # first use imports numpy; that is not what is measured
    tracemalloc.start()
    try:
        store()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # a block is 4 MiB
