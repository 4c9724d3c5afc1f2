"""The GIL-free search the YARA engine's window gates use (scanning/_search.py)."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore.scanning import _search
from splitstore.scanning._search import contains

BIG = 256 * 1024  # above the size from which memmem is used


@pytest.mark.skipif(sys.platform != "linux", reason="memmem is checked where CI runs")
def test_memmem_is_used_on_this_system() -> None:
    assert _search._MEMMEM is not None


def test_a_c_library_that_cannot_be_loaded_leaves_pythons_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def failing(name: object) -> object:
        raise TypeError("no C library here")  # what CDLL(None) raises on Windows

    monkeypatch.setattr(ctypes, "CDLL", failing)
    assert _search._load_memmem() is None


def test_a_binding_that_raises_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    class Library:
        def memmem(self, *args: object) -> int:
            raise ctypes.ArgumentError("wrong types")

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Library())
    assert _search._load_memmem() is None


@settings(max_examples=60, deadline=None)
@given(
    needle=st.binary(min_size=1, max_size=80),
    where=st.one_of(st.none(), st.integers(min_value=0, max_value=BIG)),
    near_misses=st.booleans(),
)
def test_contains_answers_as_in_does(needle: bytes, where: int | None, near_misses: bool) -> None:
    # Filled with the needle cut short (near misses), or with its first byte repeated.
    filler = needle[:-1] or needle[:1] if near_misses else needle[:1]
    haystack = bytearray((filler + b"\xff") * (BIG // (len(filler) + 1) + 1))[:BIG]
    if where is not None:
        start = min(where, len(haystack) - len(needle))
        haystack[start : start + len(needle)] = needle
    assert contains(haystack, needle) == (needle in haystack)


@pytest.mark.parametrize("where", [0, BIG - 34, BIG // 2])
def test_a_needle_at_either_end_or_inside_is_found(where: int) -> None:
    needle = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
    haystack = bytearray(os.urandom(BIG))
    assert not contains(haystack, needle)
    haystack[where : where + len(needle)] = needle
    assert contains(haystack, needle)
    haystack += b"more"  # the search let go of the buffer: it can grow again


def test_a_needle_cut_by_the_end_is_not_found() -> None:
    haystack = bytearray(os.urandom(BIG)) + b"EICAR-STAND"
    assert not contains(haystack, b"EICAR-STANDARD")


def test_other_buffers_are_searched_by_python() -> None:
    haystack = bytes(BIG) + b"needle"
    assert contains(haystack, b"needle")  # type: ignore[arg-type]
    assert contains(memoryview(bytearray(haystack)).tobytes(), b"needle")  # type: ignore[arg-type]


def test_without_memmem_python_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_search, "_MEMMEM", None)
    haystack = bytearray(BIG) + b"needle"
    assert contains(haystack, b"needle")
    assert not contains(haystack, b"needles")


def test_a_binding_that_answers_wrong_is_not_used() -> None:
    assert not _search._answers_right(lambda start, size, needle, n: None)
    assert not _search._answers_right(lambda start, size, needle, n: start)
