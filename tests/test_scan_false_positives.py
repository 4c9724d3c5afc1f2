"""Ordinary files stay clean: the default policy warns on none of a sample of the files
this machine has (the Python standard library and its tests, /usr/share documentation,
icons). The benchmark suite runs the same check on more files and lists what it finds."""

from __future__ import annotations

from benchmarks._scan import false_positives


def test_ordinary_files_are_clean_at_the_default_policy() -> None:
    result = false_positives(1500)
    assert result["files"] >= 1000  # the stdlib alone has more than that
    assert result["flagged"] == []
