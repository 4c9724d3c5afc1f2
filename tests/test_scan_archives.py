"""The archive engine, on archives built at test time: clean ones, bombs, hostile names and
links, encryption, damage, nesting and the limits. Bombs finish in a second or two
because the limits stop them, with memory that does not grow with the bomb."""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import random
import tarfile
import tempfile
import threading
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import py7zr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitstore.scanning import CATEGORIES, Finding
from splitstore.scanning._archives import (
    ArchiveEngine,
    ArchiveLimits,
    MemberScan,
    display_name,
    inner_name,
    link_problem,
    sniff,
)
from tests.samples_archives import (
    RawEntry,
    deflate_zeros,
    nested_zip,
    overlap_bomb,
    raw_zip,
    tar_of,
    zeros_gzip,
    zeros_zip,
    zip_of,
)
from tests.scan_samples import eicar

MiB = 1 << 20


# --- helpers -----------------------------------------------------------------------------


def eicar_check(path: Path) -> list[Finding]:
    """A stand-in for the content engines: the EICAR string anywhere in the member."""
    needle = eicar()
    with path.open("rb") as f:
        carry = b""
        while block := f.read(MiB):
            if needle in carry + block:
                return [Finding("test", "test-signature", "eicar", "EICAR test string")]
            carry = block[-len(needle) :]
    return []


DEFAULT = ArchiveLimits()


def recursive(limits: ArchiveLimits = DEFAULT, seen: list[Path] | None = None) -> MemberScan:
    """A scan_member like the scanner's: content check plus an archive engine one deeper."""

    def scan_member(display: str, path: Path, depth: int) -> list[Finding]:
        if seen is not None:
            seen.append(path)
        assert path.is_file()
        engine = ArchiveEngine(limits, scan_member, depth)
        return eicar_check(path) + scan(path, engine, name=display.rsplit("/", 1)[-1])

    return scan_member


def engine(limits: ArchiveLimits = DEFAULT, seen: list[Path] | None = None) -> ArchiveEngine:
    return ArchiveEngine(limits, recursive(limits, seen))


def scan(
    path: Path, eng: ArchiveEngine | None = None, name: str | None = None, block: int = 1 << 20
) -> list[Finding]:
    eng = eng or engine()
    session = eng.session(name or path.name, path.stat().st_size)
    with path.open("rb") as f:
        while data := f.read(block):
            session.feed(memoryview(data))
    return session.finish(path)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def kinds(found: list[Finding]) -> set[tuple[str, str]]:
    return {(f.category, f.rule) for f in found}


def by_member(found: list[Finding]) -> dict[str | None, set[str]]:
    out: dict[str | None, set[str]] = {}
    for f in found:
        out.setdefault(f.member, set()).add(f.category)
    return out


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.linkname = link
    return t


def seven_zip(path: Path, members: dict[str, bytes], **kwargs: object) -> Path:
    with py7zr.SevenZipFile(path, "w", **kwargs) as z:  # type: ignore[arg-type]
        for name, data in members.items():
            z._writestr(data, name)  # the private one: the public one refuses '../x'
    return path


# --- what is an archive ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (zip_of({"a": b"1"}), "zip"),
        (b"PK\x05\x06" + bytes(18), "zip"),
        (gzip.compress(b"x"), "gzip"),
        (bz2.compress(b"x"), "bzip2"),
        (bz2.compress(b""), "bzip2"),
        (lzma.compress(b"x"), "xz"),
        (tar_of([(info("a"), b"1")]), "tar"),
        (b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(24), "7z"),
        (b"PK but not a zip", None),
        (b"BZh9 not bzip2", None),
        (b"plain text " * 100, None),
        (b"", None),
    ],
)
def test_sniff_tells_kinds_from_content(data: bytes, kind: str | None) -> None:
    assert sniff(data[:512]) == kind


def test_non_archives_cost_nothing_and_find_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, "looks.zip", b"not a zip at all\n" * 1000)
    assert scan(path) == []
    session = engine().session("x.bin", None)
    session.feed(memoryview(b"\x00" * (4 * MiB)))
    assert session.finish(None) == []


def test_streamed_archive_is_not_scanned(tmp_path: Path) -> None:
    session = engine().session("a.zip", None)
    session.feed(memoryview(zip_of({"a.txt": b"hello"})))
    assert kinds(session.finish(None)) == {("not-scanned", "streamed-only")}


def test_describe() -> None:
    described = ArchiveEngine().describe()
    assert described["version"] == "1"
    assert "depth 5" in described["limits"]
    assert "512 MiB" in described["limits"]


def test_limits_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        ArchiveLimits(max_depth=-1)


# --- clean archives ------------------------------------------------------------------------


def _ordinary_files() -> dict[str, bytes]:
    return {
        "README.txt": b"Read me.\n" * 50,
        "src/module.py": b"def f():\n    return 1\n" * 100,
        "data/table.csv": b"a,b,c\n1,2,3\n" * 500,
        "data/random.bin": bytes(range(256)) * 64,
        "empty.txt": b"",
    }


def test_clean_zip_has_no_findings_and_every_member_is_scanned(tmp_path: Path) -> None:
    seen: list[Path] = []
    path = write(tmp_path, "clean.zip", zip_of(_ordinary_files()))
    assert scan(path, engine(seen=seen)) == []
    assert len(seen) == 5
    assert not any(p.exists() for p in seen), "extracted members are deleted after scanning"
    assert not any(p.parent.exists() for p in seen), "and so is their private directory"


def test_clean_tar_gz_and_7z_have_no_findings(tmp_path: Path) -> None:
    tar = tar_of(
        [(info(n), d) for n, d in _ordinary_files().items()] + [(info("d", tarfile.DIRTYPE), None)]
    )
    assert scan(write(tmp_path, "clean.tar.gz", gzip.compress(tar))) == []
    assert scan(write(tmp_path, "clean.tar.bz2", bz2.compress(tar))) == []
    assert scan(write(tmp_path, "clean.tar.xz", lzma.compress(tar))) == []
    assert scan(seven_zip(tmp_path / "clean.7z", _ordinary_files())) == []


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_every_zip_method_is_read(tmp_path: Path, method: int) -> None:
    path = write(tmp_path, "m.zip", zip_of({"a.txt": b"x" * 5000, "e.com": eicar()}, method))
    found = scan(path)
    assert kinds(found) == {("test-signature", "eicar")}
    assert [f.member for f in found] == ["e.com"]


def test_payload_found_through_nested_archives_with_member_path(tmp_path: Path) -> None:
    inner = zip_of({"docs/readme.txt": b"hi", "evil.com": eicar()})
    tar = tar_of([(info("inner.zip"), inner), (info("other.txt"), b"x")])
    path = write(tmp_path, "bundle.tar.gz", gzip.compress(tar))
    found = scan(path)
    assert [(f.category, f.member) for f in found] == [
        ("test-signature", "bundle.tar/inner.zip/evil.com")
    ]


def test_compressed_tarball_larger_than_a_member_is_read_as_it_streams(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_member_bytes=16 * 1024)
    members = [(info(f"f{i}.txt"), bytes([65 + i]) * 10_000) for i in range(6)]
    tar = tar_of([*members, (info("last/e.com"), eicar())])
    assert len(tar) > 4 * limits.max_member_bytes
    for name, data in [("big.tar.gz", gzip.compress(tar)), ("big.tar.xz", lzma.compress(tar))]:
        found = scan(write(tmp_path, name, data), engine(limits))
        assert [(f.category, f.member) for f in found] == [("test-signature", "big.tar/last/e.com")]


def test_damage_in_a_streamed_tar_is_reported_on_the_tar(tmp_path: Path) -> None:
    tar = bytearray(tar_of([(info("a.txt"), b"a"), (info("b.txt"), b"b")]))
    tar[1024:1124] = b"\xff" * 100  # the second header
    found = scan(write(tmp_path, "d.tar.gz", gzip.compress(bytes(tar))))
    assert [(f.category, f.rule, f.member) for f in found] == [
        ("archive-malformed", "bad-header", "d.tar")
    ]


def test_multi_stream_gzip_is_read_to_the_end(tmp_path: Path) -> None:
    data = gzip.compress(b"harmless " * 100) + gzip.compress(eicar())
    found = scan(write(tmp_path, "two.gz", data))
    assert [(f.category, f.member) for f in found] == [("test-signature", "two")]


def test_gzip_trailing_zeros_and_garbage_are_ignored(tmp_path: Path) -> None:
    assert scan(write(tmp_path, "z.gz", gzip.compress(b"x") + bytes(1000))) == []
    assert scan(write(tmp_path, "g.gz", gzip.compress(b"x") + b"trailing junk")) == []


@pytest.mark.parametrize(
    ("name", "inner"),
    [("a.tar.gz", "a.tar"), ("a.tgz", "a.tar"), ("x.GZ", "x"), ("notes.txt.xz", "notes.txt"),
     ("photo.jpg", "photo"), ("noext", "noext"), (".gz", ".gz"), ("dir/b.tbz2", "b.tar")],
)  # fmt: skip
def test_inner_name_of_compressed_files(name: str, inner: str) -> None:
    assert inner_name(name) == inner


# --- names and links ------------------------------------------------------------------------


HOSTILE_NAMES = {
    "../evil": "parent-directory",
    "a/../../evil": "parent-directory",
    "a\\..\\..\\evil": "parent-directory",
    "/etc/passwd": "absolute-path",
    "\\\\server\\share\\x": "absolute-path",
    "C:\\Windows\\evil.dll": "drive-letter",
    "c:relative": "drive-letter",
}
HARMLESS_NAMES = ["dir\\file.txt", "a..b/c", "..hidden", "dir/./x", "x/y/z.txt"]


def test_zip_member_names(tmp_path: Path) -> None:
    members = {n: b"x" for n in [*HOSTILE_NAMES, *HARMLESS_NAMES]}
    found = scan(write(tmp_path, "names.zip", zip_of(members)))
    assert {f.member: f.rule for f in found} == HOSTILE_NAMES
    assert {f.category for f in found} == {"archive-path"}


def test_tar_member_names(tmp_path: Path) -> None:
    members = [(info(n), b"x") for n in [*HOSTILE_NAMES, *HARMLESS_NAMES]]
    found = scan(write(tmp_path, "names.tar", tar_of(members)))
    assert {f.member: f.rule for f in found} == HOSTILE_NAMES


def test_7z_member_names_are_reported_and_not_extracted(tmp_path: Path) -> None:
    path = seven_zip(tmp_path / "n.7z", {"../evil.com": eicar(), "ok/e.com": eicar()})
    found = scan(path)
    assert kinds(found) == {
        ("archive-path", "parent-directory"),
        ("not-scanned", "unsafe-name"),
        ("test-signature", "eicar"),
    }
    assert by_member(found) == {
        "../evil.com": {"archive-path", "not-scanned"},
        "ok/e.com": {"test-signature"},
    }


def test_display_names_escape_control_characters() -> None:
    assert display_name("a\nb\x1b[31m") == "a\\x0ab\\x1b[31m"
    assert display_name("naïve.txt") == "naïve.txt"
    assert display_name("") == "(no name)"
    assert len(display_name("x" * 100_000)) < 1100


def test_tar_links_that_reach_out(tmp_path: Path) -> None:
    members = [
        (info("etc", tarfile.SYMTYPE, "/etc"), None),
        (info("a/up", tarfile.SYMTYPE, "../../outside"), None),
        (info("hard", tarfile.LNKTYPE, "../outside"), None),
        (info("a/inside", tarfile.SYMTYPE, "../target.txt"), None),  # stays inside
        (info("target.txt"), b"t"),
        (info("hard-inside", tarfile.LNKTYPE, "target.txt"), None),
        (info("lib.so", tarfile.SYMTYPE, "lib.so.1"), None),
        (info("dotlink", tarfile.SYMTYPE, "."), None),
        (info("dotlink/written-through"), b"x"),
    ]
    found = scan(write(tmp_path, "links.tar", tar_of(members)))
    assert {f.member: f.rule for f in found} == {
        "etc": "symlink",
        "a/up": "symlink",
        "hard": "hardlink",
        "dotlink/written-through": "through-link",
    }
    assert {f.category for f in found} == {"archive-link"}
    assert "absolute" in next(f.detail for f in found if f.member == "etc")


@pytest.mark.parametrize(
    ("name", "target", "hard", "escapes"),
    [("l", "/x", False, True), ("l", "x", False, False), ("d/l", "../x", False, False),
     ("d/l", "../../x", False, True), ("d/l", "../x", True, True), ("l", "C:\\x", False, True),
     ("d/l", "a/../../x", False, False), ("d/l", "a/../../../x", False, True)],
)  # fmt: skip
def test_link_problem(name: str, target: str, hard: bool, escapes: bool) -> None:
    assert (link_problem(name, target, hard) is not None) == escapes


def test_zip_symlinks(tmp_path: Path) -> None:
    unix = 3 << 8
    link = (0o120777) << 16
    entries = [
        RawEntry(b"passwd", b"/etc/passwd", made_by=unix, external=link),
        RawEntry(b"ok", b"target.txt", made_by=unix, external=link),
        RawEntry(b"target.txt", b"t"),
    ]
    found = scan(write(tmp_path, "links.zip", raw_zip(entries)))
    assert [(f.category, f.rule, f.member) for f in found] == [
        ("archive-link", "symlink", "passwd")
    ]


def test_7z_symlinks_are_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "t.txt").write_bytes(b"t")
    (src / "link").symlink_to("t.txt")
    path = tmp_path / "l.7z"
    with py7zr.SevenZipFile(path, "w") as z:
        z.writeall(src, "src")
    assert kinds(scan(path)) == {("archive-link", "symlink")}


# --- encryption -----------------------------------------------------------------------------


def test_encrypted_zip_member_is_reported_not_extracted(tmp_path: Path) -> None:
    seen: list[Path] = []
    entries = [
        RawEntry(b"secret.com", b"\x00" * 12 + eicar(), flags=1),
        RawEntry(b"plain.txt", b"p"),
    ]
    found = scan(write(tmp_path, "enc.zip", raw_zip(entries)), engine(seen=seen))
    assert [(f.category, f.member) for f in found] == [("archive-encrypted", "secret.com")]
    assert len(seen) == 1  # only plain.txt


def test_encrypted_7z(tmp_path: Path) -> None:
    members = {"a.txt": b"hello", "b.txt": b"world"}
    found = scan(seven_zip(tmp_path / "e.7z", members, password="secret"))
    assert [(f.category, f.rule) for f in found] == [("archive-encrypted", "encrypted-member")] * 2
    hidden = seven_zip(tmp_path / "h.7z", members, password="secret", header_encryption=True)
    assert kinds(scan(hidden)) == {("archive-encrypted", "encrypted-header")}


# --- bombs ----------------------------------------------------------------------------------


def _timed_scan(path: Path, eng: ArchiveEngine | None = None) -> tuple[list[Finding], float, int]:
    """Findings, seconds and peak traced Python memory of a scan."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        found = scan(path, eng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return found, time.monotonic() - start, peak


def test_gzip_of_a_gibibyte_of_zeros_is_a_bomb(tmp_path: Path) -> None:
    path = tmp_path / "zeros.gz"
    zeros_gzip(path, 1024)
    assert path.stat().st_size < 2 * MiB
    found, seconds, peak = _timed_scan(path)
    assert kinds(found) == {("archive-bomb", "measured-ratio")}
    assert found[0].member == "zeros"
    assert seconds < 5
    assert peak < 16 * MiB, "decompression is bounded, not the whole member in memory"


def test_zip_of_a_gibibyte_of_zeros_is_a_bomb_from_its_sizes(tmp_path: Path) -> None:
    path = tmp_path / "zeros.zip"
    zeros_zip(path, 1024)
    found, seconds, _ = _timed_scan(path)
    assert kinds(found) == {("archive-bomb", "declared-ratio")}
    assert seconds < 1


def test_zip_that_lies_about_its_size_is_caught_by_what_it_expands_to(tmp_path: Path) -> None:
    path = tmp_path / "lying.zip"
    zeros_zip(path, 1024, declared=1000)
    found, seconds, peak = _timed_scan(path)
    assert kinds(found) == {("archive-bomb", "measured-ratio")}
    assert seconds < 5
    assert peak < 16 * MiB


def test_small_lie_about_size_is_malformed(tmp_path: Path) -> None:
    entry = RawEntry(b"a.txt", zlib.compress(b"a" * 1000)[2:-4], method=8, unpacked=10,
                     crc=zlib.crc32(b"a" * 1000))  # fmt: skip
    found = scan(write(tmp_path, "lie.zip", raw_zip([entry])))
    assert kinds(found) == {("archive-malformed", "size-mismatch")}


def test_overlapping_entries_are_a_bomb(tmp_path: Path) -> None:
    seen: list[Path] = []
    path = write(tmp_path, "overlap.zip", overlap_bomb(entries=200, kernel_mib=4))
    found = scan(path, engine(seen=seen))
    assert kinds(found) == {("archive-bomb", "overlapping-entries")}
    assert seen == [], "nothing is extracted from a bomb"


def test_entries_sharing_one_local_header_are_a_bomb(tmp_path: Path) -> None:
    e = RawEntry(b"same", b"data")
    path = write(tmp_path, "shared.zip", raw_zip([e, e, e], offsets=[0, 0, 0]))
    assert kinds(scan(path)) == {("archive-bomb", "overlapping-entries")}


def test_total_expansion_of_many_members_is_a_bomb(tmp_path: Path) -> None:
    limits = ArchiveLimits(ratio_min_bytes=1 * MiB, max_ratio=50)
    members = {f"z{i}.bin": bytes(512 * 1024) for i in range(8)}  # each under 1 MiB
    found = scan(write(tmp_path, "many.zip", zip_of(members)), engine(limits))
    assert kinds(found) == {("archive-bomb", "declared-ratio")}


def test_7z_bomb_from_its_sizes(tmp_path: Path) -> None:
    limits = ArchiveLimits(ratio_min_bytes=1 * MiB, max_ratio=50)
    path = seven_zip(tmp_path / "z.7z", {"zeros.bin": bytes(4 * MiB)})
    assert kinds(scan(path, engine(limits))) == {("archive-bomb", "declared-ratio")}


def test_compressible_but_small_members_are_not_bombs(tmp_path: Path) -> None:
    path = write(tmp_path, "small.zip", zip_of({"zeros.bin": bytes(4 * MiB)}))
    assert scan(path) == []  # 1000x, but under the 8 MiB floor


def test_tar_gz_bomb_is_caught_as_it_streams(tmp_path: Path) -> None:
    """A tarball whose one member is 1 GiB of zeros: too large to scan, and read through
    (to reach the next header) only until the byte budget runs out."""
    header = tarfile.TarInfo("zeros.bin")
    header.size = 1024 * MiB
    head = header.tobuf(tarfile.PAX_FORMAT)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    _, pieces = deflate_zeros(1024)
    path = tmp_path / "zeros.tar.gz"
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first)
        for piece in pieces:
            f.write(piece)
        f.write(bytes(8))  # CRC and size: never reached
    found, seconds, peak = _timed_scan(path, engine(ArchiveLimits(max_total_bytes=128 * MiB)))
    assert kinds(found) == {("not-scanned", "member-too-large"), ("archive-bomb", "measured-ratio")}
    assert {f.member for f in found} == {"zeros.tar/zeros.bin", "zeros.tar"}
    assert seconds < 5
    assert peak < 16 * MiB


def test_7z_extraction_memory_is_bounded(tmp_path: Path) -> None:
    members = {"big.bin": random.Random(7).randbytes(MiB) * 40, "e.com": eicar()}
    path = seven_zip(tmp_path / "m.7z", members, filters=[{"id": py7zr.FILTER_COPY}])
    found, _, peak = _timed_scan(path)
    assert [(f.category, f.member) for f in found] == [("test-signature", "e.com")]
    # The header's LZMA dictionary (16 MiB) is most of it; the 40 MiB member is not.
    assert peak < 24 * MiB, "py7zr hands over the member in steps, not whole"


def test_7z_with_a_huge_dictionary_is_not_decoded(tmp_path: Path) -> None:
    filters = [{"id": py7zr.FILTER_LZMA2, "dict_size": 192 * MiB}]
    path = seven_zip(tmp_path / "d.7z", {"a.txt": b"hello"}, filters=filters)
    found = scan(path)
    assert [(f.category, f.rule) for f in found] == [("not-scanned", "dictionary-too-large")]


# --- nesting --------------------------------------------------------------------------------


def test_nesting_beyond_the_limit(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_depth=3)
    path = write(tmp_path, "level1.zip", nested_zip(6, eicar(), name="deep.com"))
    found = scan(path, engine(limits))
    assert [(f.category, f.member) for f in found] == [
        ("archive-nesting", "level2.zip/level3.zip/level4.zip")
    ]


def test_nesting_within_the_limit_is_followed(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_depth=3)
    path = write(tmp_path, "level1.zip", nested_zip(3, eicar(), name="deep.com"))
    found = scan(path, engine(limits))
    assert [(f.category, f.member) for f in found] == [
        ("test-signature", "level2.zip/level3.zip/deep.com")
    ]


def test_a_gzip_quine_like_chain_stops_at_the_depth_limit(tmp_path: Path) -> None:
    data = b"core"
    for _ in range(12):
        data = gzip.compress(data)
    found = scan(write(tmp_path, "deep.gz", data))
    assert kinds(found) == {("archive-nesting", "too-deep")}


# --- damage ---------------------------------------------------------------------------------


def _samples(tmp_path: Path) -> dict[str, bytes]:
    files = _ordinary_files()
    tar = tar_of([(info(n), d) for n, d in files.items()])
    sz = (seven_zip(tmp_path / "s.7z", files)).read_bytes()
    return {
        "a.zip": zip_of(files),
        "a.tar": tar,
        "a.tar.gz": gzip.compress(tar),
        "a.tar.bz2": bz2.compress(tar),
        "a.tar.xz": lzma.compress(tar),
        "a.7z": sz,
    }


@pytest.mark.parametrize("name", ["a.zip", "a.tar.gz", "a.tar.bz2", "a.tar.xz", "a.7z"])
def test_truncated_archives_are_malformed(tmp_path: Path, name: str) -> None:
    data = _samples(tmp_path)[name]
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        found = scan(write(tmp_path, name, data[:cut]))
        assert "archive-malformed" in {f.category for f in found}, (name, cut, found)


def test_truncated_tar_is_malformed(tmp_path: Path) -> None:
    data = _samples(tmp_path)["a.tar"]
    for cut in (700, 1500, len(data) // 2 + 100):
        found = scan(write(tmp_path, "a.tar", data[:cut]))
        assert "archive-malformed" in {f.category for f in found}, (cut, found)


def test_damaged_tar_header_is_malformed(tmp_path: Path) -> None:
    data = bytearray(_samples(tmp_path)["a.tar"])
    second = data.index(b"src/module.py") // 512 * 512
    data[second : second + 100] = b"\xff" * 100
    assert "archive-malformed" in {f.category for f in scan(write(tmp_path, "d.tar", bytes(data)))}


def test_zip_crc_mismatch_is_malformed_and_still_scanned(tmp_path: Path) -> None:
    entry = RawEntry(b"e.com", eicar(), crc=1234)
    found = scan(write(tmp_path, "crc.zip", raw_zip([entry])))
    assert kinds(found) == {("archive-malformed", "crc-mismatch"), ("test-signature", "eicar")}


def test_zip_layout_damage(tmp_path: Path) -> None:
    good = raw_zip([RawEntry(b"a.txt", b"hello")])
    cd = good.index(b"PK\x01\x02")
    bad_cd = good[:cd] + b"XX" + good[cd + 2 :]
    assert kinds(scan(write(tmp_path, "cd.zip", bad_cd))) == {
        ("archive-malformed", "bad-central-directory")
    }
    out_of_range = raw_zip([RawEntry(b"a.txt", b"hello", packed=10_000)])
    assert ("archive-malformed", "entry-out-of-range") in kinds(
        scan(write(tmp_path, "range.zip", out_of_range))
    )
    other_name = raw_zip([RawEntry(b"a.txt", b"hello", local_name=b"b.exe")])
    assert ("archive-malformed", "name-mismatch") in kinds(
        scan(write(tmp_path, "name.zip", other_name))
    )
    bad_offset = raw_zip([RawEntry(b"a.txt", b"hello")], offsets=[3])
    assert ("archive-malformed", "bad-local-header") in kinds(
        scan(write(tmp_path, "off.zip", bad_offset))
    )


def test_corrupt_deflate_data_is_malformed(tmp_path: Path) -> None:
    entry = RawEntry(b"a.txt", b"\xff" * 200, method=8, unpacked=1000)
    assert ("archive-malformed", "corrupt") in kinds(
        scan(write(tmp_path, "c.zip", raw_zip([entry])))
    )


def test_unsupported_zip_method_is_not_scanned(tmp_path: Path) -> None:
    entry = RawEntry(b"a.txt", b"whatever", method=9)  # deflate64
    assert kinds(scan(write(tmp_path, "d64.zip", raw_zip([entry])))) == {
        ("not-scanned", "unsupported-method")
    }


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_archives_never_raise(tmp_path: Path, data: st.DataObject) -> None:
    """Any damage to any kind of archive gives findings, never an exception or a hang."""
    samples = _cached_samples()
    name = data.draw(st.sampled_from(sorted(samples)))
    blob = bytearray(samples[name])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    start = time.monotonic()
    found = scan(write(tmp_path, name, bytes(blob[:cut])))
    assert time.monotonic() - start < 5
    assert all(f.category in CATEGORIES for f in found)


@functools.cache
def _cached_samples() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        return _samples(Path(tmp))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sizes=st.lists(st.integers(1, 700), min_size=1, max_size=30))
def test_findings_do_not_depend_on_block_sizes(tmp_path: Path, sizes: list[int]) -> None:
    tar = tar_of([(info("../x"), b"1"), (info("in.zip"), zip_of({"e.com": eicar()}))])
    path = write(tmp_path, "b.tar", tar)
    expected = scan(path)
    session = engine().session("b.tar", None)
    data = memoryview(path.read_bytes())
    pos = 0
    for n in sizes * (len(data) // sum(sizes) + 1):
        session.feed(data[pos : pos + n])
        pos += n
    assert session.finish(path) == expected
    assert kinds(expected) == {("archive-path", "parent-directory"), ("test-signature", "eicar")}


# --- limits ---------------------------------------------------------------------------------


def test_member_limit(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_members=3)
    path = write(tmp_path, "m.zip", zip_of({f"{i}.txt": b"x" for i in range(10)}))
    assert kinds(scan(path, engine(limits))) == {("not-scanned", "member-limit")}


def test_member_limit_is_shared_with_nested_archives(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_members=5)
    inner = zip_of({f"{i}.txt": b"x" for i in range(4)})
    path = write(tmp_path, "o.zip", zip_of({"a.zip": inner, "b.zip": inner}))
    found = scan(path, engine(limits))
    assert ("not-scanned", "member-limit") in kinds(found)


def test_member_too_large(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_member_bytes=1000)
    data = {"big.bin": bytes(range(256)) * 10, "small.txt": b"s"}
    for name, blob in [
        ("a.zip", zip_of(data)),
        ("a.tar", tar_of([(info(n), d) for n, d in data.items()])),
    ]:
        found = scan(write(tmp_path, name, blob), engine(limits))
        assert [(f.category, f.rule, f.member) for f in found] == [
            ("not-scanned", "member-too-large", "big.bin")
        ]
    found = scan(write(tmp_path, "big.gz", gzip.compress(bytes(range(256)) * 10)), engine(limits))
    assert kinds(found) == {("not-scanned", "member-too-large")}


def test_total_byte_limit(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_total_bytes=5000)
    path = write(tmp_path, "t.zip", zip_of({f"{i}.bin": bytes([i]) * 2000 for i in range(5)}))
    found = scan(path, engine(limits))
    assert ("not-scanned", "total-bytes-limit") in kinds(found)


def test_time_limit(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_seconds=0)
    path = write(tmp_path, "t.zip", zip_of({"a.txt": b"x"}))
    assert kinds(scan(path, engine(limits))) == {("not-scanned", "time-limit")}


def test_oversized_tar_extended_header(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_header_bytes=4096)
    t = info("x")
    t.pax_headers = {"comment": "c" * 10_000}
    found = scan(write(tmp_path, "pax.tar", tar_of([(t, b"1")])), engine(limits))
    assert kinds(found) == {("not-scanned", "header-too-large")}


def test_repeated_findings_are_capped(tmp_path: Path) -> None:
    path = write(tmp_path, "many.zip", zip_of({f"../{i}": b"x" for i in range(50)}))
    found = scan(path, engine(ArchiveLimits(max_listed=5)))
    assert len(found) == 6
    assert found[-1].member is None
    assert "45 more" in found[-1].detail


def test_engine_is_usable_from_threads(tmp_path: Path) -> None:
    path = write(tmp_path, "e.zip", zip_of({"x/e.com": eicar()}))
    eng = engine()
    results: list[list[Finding]] = []

    def work() -> None:
        results.extend(scan(path, eng) for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40
    assert all([f.member for f in r] == ["x/e.com"] for r in results)


def test_metadata_checks_run_without_scan_member(tmp_path: Path) -> None:
    path = write(tmp_path, "n.zip", zip_of({"../evil": b"x", "e.com": eicar()}))
    found = scan(path, ArchiveEngine())
    assert kinds(found) == {("archive-path", "parent-directory")}


def test_scanner_style_member_findings_are_not_prefixed_twice(tmp_path: Path) -> None:
    def scan_member(display: str, path: Path, depth: int) -> list[Finding]:
        return [Finding("archive", "not-scanned", "member-unreadable", "x", member=display)]

    path = write(tmp_path, "s.zip", zip_of({"d/a.txt": b"x"}))
    found = scan(path, ArchiveEngine(scan_member=scan_member))
    assert [f.member for f in found] == ["d/a.txt"]


# --- crafted data that a decoder itself refuses --------------------------------------------


def test_a_member_no_decoder_can_read_keeps_what_was_found_before_it(tmp_path: Path) -> None:
    """An LZMA member whose properties liblzma refuses (lc=8) raises in the decoder's own
    setup: reported as not scanned, beside the malware already found, never instead of it
    (the verdict would drop from block to warn)."""
    import io
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("payload.txt", eicar())
        z.writestr("b.bin", b"hello world" * 10)
    data = bytearray(buf.getvalue())
    local = data.find(b"PK\x03\x04", 10)  # b.bin's headers: method 14 (LZMA)
    central = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)
    struct.pack_into("<H", data, local + 8, 14)
    struct.pack_into("<H", data, central + 10, 14)
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    start = local + 30 + name_len + extra_len
    data[start : start + 9] = b"\x09\x14\x05\x00" + bytes([8]) + struct.pack("<I", 1 << 16)
    found = scan(write(tmp_path, "docs.zip", bytes(data)))
    assert ("test-signature", "eicar") in kinds(found)
    assert ("not-scanned", "engine-error") in kinds(found)


def test_links_with_absurdly_deep_names_stop_the_scan_not_the_machine(tmp_path: Path) -> None:
    """Each link's path components are kept to catch members written through it: a
    crafted name of a million components is refused, not kept (some 150 MB a link)."""
    deep = "/".join(["d"] * 1_000_000)
    tracemalloc.start()
    try:
        found = scan(
            write(tmp_path, "deep.tar", tar_of([(info(deep, tarfile.SYMTYPE, "x"), None)]))
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ("not-scanned", "too-many-links") in kinds(found)
    assert peak < 64 * MiB


def test_ppmd_model_memory_is_bounded_but_7zip_presets_pass() -> None:
    """py7zr allocates a PPMd model of the size a 7z block declares (up to 4 GiB); 7-Zip's
    strongest preset (192 MiB) still scans."""
    import struct

    from splitstore.scanning._archives import _7z_too_costly

    def folder(model: int) -> object:
        ppmd = {"method": b"\x03\x04\x01", "properties": bytes([6]) + struct.pack("<I", model)}
        return type("Folder", (), {"coders": [ppmd]})()

    assert _7z_too_costly(folder(1 << 30)) == (1 << 30, "PPMd model")
    assert _7z_too_costly(folder(192 * MiB)) is None


def _gnu_sparse_tar(map_blocks: int) -> bytes:
    """An old GNU sparse member ('S') whose map goes on for ``map_blocks`` extension
    blocks of 21 regions each."""

    def octal(n: int, width: int = 12) -> bytes:
        return b"%0*o\0" % (width - 1, n)

    head = bytearray(512)
    head[0:10] = b"sparse.bin"
    head[100:124] = b"0000644\0" + b"0000000\0" + b"0000000\0"
    head[124:148] = octal(0) + octal(0)
    head[156:157] = b"S"
    head[257:265] = b"ustar  \0"
    head[482] = 1  # isextended
    head[483:495] = octal(1000)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    block = bytearray(512)
    for i in range(21):
        block[i * 24 : i * 24 + 24] = octal(1000 + i) + octal(1)
    block[504] = 1  # and another one follows
    return bytes(head) + bytes(block) * map_blocks + bytes(1024)


def test_a_sparse_map_is_read_within_the_header_bound(tmp_path: Path) -> None:
    """tarfile reads an old GNU sparse member's whole map in one step, an entry per
    region: read through a counter, it stops at the extended headers' bound."""
    path = write(tmp_path, "sparse.tar", _gnu_sparse_tar(4 * 2048))  # 4 MiB of map
    tracemalloc.start()
    try:
        found = scan(path)  # the default bound: 16 MiB of headers, a 16th of it for maps
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ("not-scanned", "header-too-large") in kinds(found)
    assert peak < 16 * MiB  # the whole map's entries would be some 40 MiB
