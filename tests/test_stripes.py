"""Chunk placement: split and join are exact inverses, and match the spec's formulas."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from splitstore._stripes import (
    block_size_for,
    chunk_count,
    join_block,
    split_block,
    stripe_chunk_counts,
    stripe_lengths,
)


def naive_split(data: bytes, chunk: int, k: int) -> list[bytes]:
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    return [b"".join(chunks[i::k]) for i in range(k)]


@given(st.binary(max_size=10_000), st.integers(1, 300), st.integers(1, 4))
def test_split_matches_the_definition(data: bytes, chunk: int, k: int) -> None:
    assert split_block(data, chunk, k) == naive_split(data, chunk, k)


@given(st.binary(max_size=10_000), st.integers(1, 300), st.integers(1, 4))
def test_join_inverts_split(data: bytes, chunk: int, k: int) -> None:
    assert bytes(join_block(split_block(data, chunk, k), chunk)) == data


@given(st.integers(0, 10**12), st.integers(1, 5000), st.integers(1, 4))
def test_stripe_lengths_add_up(size: int, chunk: int, k: int) -> None:
    lengths = stripe_lengths(size, chunk, k)
    assert sum(lengths) == size
    assert lengths == sorted(lengths, reverse=True)  # earlier servers never hold less
    counts = stripe_chunk_counts(size, chunk, k)
    assert sum(counts) == chunk_count(size, chunk)


@given(st.binary(max_size=5000), st.integers(1, 100), st.integers(1, 4))
def test_lengths_match_split(data: bytes, chunk: int, k: int) -> None:
    assert [len(p) for p in split_block(data, chunk, k)] == stripe_lengths(len(data), chunk, k)


@given(st.binary(min_size=1, max_size=20_000), st.integers(1, 64))
def test_blockwise_split_equals_whole_split(data: bytes, chunk: int) -> None:
    """Splitting block by block (as the client streams) gives the same stripes."""
    k = 2
    block = 4 * chunk * k
    stripes = [b"", b""]
    for start in range(0, len(data), block):
        for i, piece in enumerate(split_block(data[start : start + block], chunk, k)):
            stripes[i] += piece
    assert stripes == naive_split(data, chunk, k)


def test_spec_examples() -> None:
    assert stripe_lengths(0, 1024, 2) == [0, 0]
    assert stripe_lengths(1, 1024, 2) == [1, 0]
    assert stripe_lengths(1025, 1024, 2) == [1024, 1]
    assert stripe_lengths(2049, 1024, 2) == [1025, 1024]


def test_join_rejects_pieces_of_the_wrong_shape() -> None:
    import pytest

    with pytest.raises(ValueError, match="lengths"):
        join_block([b"a" * 10, b"b" * 20], 10)


def test_block_size_is_whole_rounds() -> None:
    for chunk in (1, 1000, 1024, 3 * 1024 * 1024, 16 * 1024 * 1024):
        size = block_size_for(chunk, 2)
        assert size % (2 * chunk) == 0
        assert size > 0
