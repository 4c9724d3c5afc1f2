"""The YARA engine: every shipped rule family on samples built from bytes, no findings on
clean data, streaming in windows (matches across boundaries, file offsets, the same result
whatever the block sizes), user rule files, and failures reported as not-scanned."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import pytest
import yara
from hypothesis import given, settings
from hypothesis import strategies as st

from splitstore._errors import ConfigError
from splitstore.scanning import CATEGORIES, Finding
from splitstore.scanning._yara import YaraEngine

from . import samples_yara as samples


def small_engine(
    rule_files: Sequence[Path] = (), timeout: int = 10, file_timeout: float = 60
) -> YaraEngine:
    """Small windows, so that tests cross window boundaries with little data. The overlap
    is above the longest sample match (a dropper line of about 100 bytes)."""
    return YaraEngine(
        rule_files,
        head_size=512,
        window_size=1024,
        overlap=192,
        timeout=timeout,
        file_timeout=file_timeout,
    )


def scan(
    engine: YaraEngine, data: bytes, name: str = "sample", cuts: list[int] | None = None
) -> list[Finding]:
    """Feed ``data`` in blocks split at ``cuts`` (one block if None)."""
    session = engine.session(name, len(data))
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts or [])})
    for start, end in itertools.pairwise(bounds):
        session.feed(memoryview(data)[start:end])
    return session.finish(None)


def found(engine: YaraEngine, data: bytes, name: str = "sample") -> set[tuple[str, str]]:
    return {(f.category, f.rule) for f in scan(engine, data, name)}


def categories(engine: YaraEngine, data: bytes, name: str = "sample") -> set[str]:
    return {f.category for f in scan(engine, data, name)}


@pytest.fixture(scope="module")
def engine() -> YaraEngine:
    return YaraEngine()


@pytest.fixture(scope="module")
def small() -> YaraEngine:
    return small_engine()


# --- executables ------------------------------------------------------------------------

EXECUTABLES = {
    "pe": (samples.pe(), "PE_Executable"),
    "elf64-le": (samples.elf(), "ELF_Executable"),
    "elf32-be": (samples.elf(bits=32, little=False), "ELF_Executable"),
    "elf-shared-library": (samples.elf(e_type=3), "ELF_Executable"),
    "macho64-le": (samples.macho(), "MachO_Executable"),
    "macho64-be": (samples.macho(little=False), "MachO_Executable"),
    "macho32-le": (samples.macho(bits=32), "MachO_Executable"),
    "macho32-be": (samples.macho(bits=32, little=False), "MachO_Executable"),
    "macho-dylib": (samples.macho(filetype=6), "MachO_Executable"),
    "macho-fat": (samples.macho_fat(), "MachO_Universal_Binary"),
    "macho-fat-one": (samples.macho_fat(1), "MachO_Universal_Binary"),
}


@pytest.mark.parametrize(("data", "rule"), EXECUTABLES.values(), ids=EXECUTABLES.keys())
def test_executables(engine: YaraEngine, data: bytes, rule: str) -> None:
    results = scan(engine, data, "program")
    assert [(f.category, f.rule, f.offset) for f in results] == [("executable", rule, 0)]
    assert results[0].engine == "yara"


NOT_EXECUTABLES = {
    "dos-mz-without-pe": samples.dos_mz_only(),
    "java-class": samples.java_class(),
    "elf-object-file": samples.elf(e_type=1),
    "macho-object-file": samples.macho(filetype=1),
    "fat-header-too-many-arches": samples.macho_fat(40),
    "mz-text": b"MZ is how the header starts\n" * 4,
    "truncated-pe": samples.pe()[:0x40],
}


@pytest.mark.parametrize("data", NOT_EXECUTABLES.values(), ids=NOT_EXECUTABLES.keys())
def test_look_alikes_are_not_executables(engine: YaraEngine, data: bytes) -> None:
    assert scan(engine, data, "data.bin") == []


@pytest.mark.parametrize(
    "name",
    ["report.pdf", "photo.JPG", "scan.jpeg", "logo.png", "notes.txt", "letter.docx", "song.mp3",
     "clip.mp4", "sheet.xlsx", "report.pdf.", "report.pdf ", "invoice.pdf.exe",
     "invoice\u202efdp.exe"],
)  # fmt: skip
def test_disguised_executables(engine: YaraEngine, name: str) -> None:
    assert found(engine, samples.elf(), name) == {
        ("executable", "ELF_Executable"),
        ("disguised-executable", "Disguised_Executable"),
    }
    assert "disguised-executable" in categories(engine, samples.pe(), name)


@pytest.mark.parametrize(
    "name", ["tool.bin", "tool", "setup.exe", "libz.so.1", ".pdf", "archive.tar.gz", "a.sh"]
)
def test_programs_under_their_own_names_are_not_disguised(engine: YaraEngine, name: str) -> None:
    assert categories(engine, samples.elf(), name) == {"executable"}
    assert categories(engine, samples.pe(), name) == {"executable"}


def test_a_document_is_not_disguised(engine: YaraEngine) -> None:
    assert scan(engine, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "a.pdf") == []


# --- macros -----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["word", "xl", "ppt"])
def test_ooxml_with_macros(engine: YaraEngine, folder: str) -> None:
    assert found(engine, samples.ooxml(macros=True, folder=folder), f"a.{folder}m") == {
        ("macro", "Office_OOXML_Macros")
    }


def test_ooxml_without_macros(engine: YaraEngine) -> None:
    assert scan(engine, samples.ooxml(macros=False), "a.docx") == []


def test_ole_with_vba_project(engine: YaraEngine) -> None:
    data = samples.ole(vba=True)
    results = scan(engine, data, "old.doc")
    assert [(f.category, f.rule) for f in results] == [("macro", "Office_OLE_Macros")]
    assert results[0].offset == data.index("_VBA_PROJECT".encode("utf-16-le"))


def test_ole_without_vba_project(engine: YaraEngine) -> None:
    assert scan(engine, samples.ole(vba=False), "old.doc") == []
    # The name alone, not as a directory entry of the stream, is not a VBA project.
    bare = samples.ole(vba=False) + "_VBA_PROJECT".encode("utf-16-le")
    assert scan(engine, bare, "old.doc") == []


def test_macros_found_far_beyond_the_first_window(small: YaraEngine) -> None:
    ole = samples.ole(vba=True, pad=5000)
    assert found(small, ole, "big.doc") == {("macro", "Office_OLE_Macros")}
    docm = samples.ooxml(macros=True)
    padded = docm[:30] + os.urandom(3000) + docm[30:]  # the entries move far back
    assert ("macro", "Office_OOXML_Macros") in found(small, padded, "big.docm")


# --- script droppers --------------------------------------------------------------------


@pytest.mark.parametrize("line", samples.DROPPERS.values(), ids=samples.DROPPERS.keys())
@pytest.mark.parametrize("name", ["payload.ps1", "install.sh", "install", "run", "a.vbs"])
def test_droppers(engine: YaraEngine, line: bytes, name: str) -> None:
    script = b"# setup\n" + line + b"\nexit 0\n"
    assert categories(engine, script, name) == {"script-dropper"}


@pytest.mark.parametrize("text", samples.HARMLESS_TEXTS.values(), ids=samples.HARMLESS_TEXTS)
def test_mentions_are_not_droppers(engine: YaraEngine, text: bytes) -> None:
    assert scan(engine, text, "notes.ps1") == []


@pytest.mark.parametrize(
    "name", ["README.md", "guide.rst", "notes.txt", "page.html", "README", "INSTALL", "METADATA"]
)
def test_documentation_showing_an_install_one_liner_is_not_a_dropper(
    engine: YaraEngine, name: str
) -> None:
    readme = b"Install:\n\n```sh\n" + samples.DROPPERS["curl-sh"] + b"\n```\n"
    assert scan(engine, readme, name) == []
    assert categories(engine, readme, "install.sh") == {"script-dropper"}


def test_dropper_beyond_the_first_window_of_a_text_file(small: YaraEngine) -> None:
    line = samples.DROPPERS["iex-webclient"]
    script = b"# filler line\n" * 300 + line + b"\n"
    results = scan(small, script, "a.ps1")
    assert [(f.category, f.offset) for f in results] == [("script-dropper", script.index(line))]


def test_dropper_in_a_binary_file_only_in_its_first_window(small: YaraEngine) -> None:
    line = samples.DROPPERS["curl-sh"]
    assert categories(small, b"\0\x01\x02\n" + line + b"\n", "blob") == {"script-dropper"}
    late = b"\0\x01\x02\n" + b"x" * 4000 + b"\n" + line + b"\n"
    assert scan(small, late, "blob") == []


# --- EICAR ------------------------------------------------------------------------------


def test_eicar_embedded_anywhere(engine: YaraEngine) -> None:
    data = os.urandom(1000) + samples.eicar() + os.urandom(1000)
    results = scan(engine, data, "x.bin")
    assert [(f.category, f.rule, f.offset) for f in results] == [
        ("test-signature", "EICAR_Test_String", 1000)
    ]


@pytest.mark.parametrize("where", [0, 400, 480, 511, 512, 1300, 1500, 2500])
def test_eicar_across_window_boundaries_reported_once(small: YaraEngine, where: int) -> None:
    # Windows here: [0, 512), [320, 1536), [1344, 2560)...: each position is in one or two.
    data = bytearray(os.urandom(3000))
    data[where : where + 68] = samples.eicar()
    results = scan(small, bytes(data), "x.bin", cuts=[100, 513, 1000, 2000])
    assert [(f.rule, f.offset) for f in results] == [("EICAR_Test_String", where)]


def test_eicar_in_a_large_file_with_default_windows(engine: YaraEngine) -> None:
    where = (1 << 20) - 30  # across the end of the first window
    data = bytearray(os.urandom(6 << 20))
    data[where : where + 68] = samples.eicar()
    results = scan(engine, bytes(data), "big.bin", cuts=list(range(0, 6 << 20, 1 << 20)))
    assert [(f.rule, f.offset) for f in results] == [("EICAR_Test_String", where)]


# --- clean data and block sizes ---------------------------------------------------------


def test_clean_files_have_no_findings(engine: YaraEngine, small: YaraEngine) -> None:
    # Python code that runs programs and fetches URLs, but drops nothing.
    stdlib = Path(os.__file__).parent
    modules = ["subprocess.py", "shutil.py", "zipfile.py", "urllib/request.py", "http/client.py"]
    source = b"".join((stdlib / m).read_bytes() for m in modules)
    assert scan(engine, source, "tests.py") == []
    assert scan(small, source, "tests.py") == []
    assert scan(engine, b"", "empty") == []
    for _ in range(3):
        assert scan(engine, os.urandom(200_000), "noise.bin") == []


# A file built from parts, some of which match, placed at random offsets.
PARTS = st.one_of(
    st.binary(min_size=1, max_size=700),
    st.sampled_from(
        [samples.eicar(), samples.DROPPERS["curl-sh"], samples.DROPPERS["ps-enc"], b"\n"]
    ),
)


@settings(max_examples=40, deadline=None)
@given(
    parts=st.lists(PARTS, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=16),
    text=st.booleans(),
)
def test_same_result_whatever_the_block_sizes(
    parts: list[bytes], cuts: list[int], text: bool
) -> None:
    engine = small_engine()
    data = b"".join(parts)
    if text:
        data = data.replace(b"\0", b" ")
    whole = scan(engine, data, "f.sh")
    assert scan(engine, data, "f.sh", cuts) == whole
    # Every EICAR string's first occurrence is found, at its offset, once.
    eicars = [f for f in whole if f.rule == "EICAR_Test_String"]
    expected = data.find(samples.eicar())
    assert [f.offset for f in eicars] == ([expected] if expected >= 0 else [])


@pytest.mark.parametrize(("data", "calls"), [(b"\0" + os.urandom(4999), 1), (b"t" * 5000, 6)])
def test_later_windows_scanned_only_when_a_rule_could_match(data: bytes, calls: int) -> None:
    # YARA reads every byte it is given at about 300 MB/s, so big binary files are not
    # given to it past the first window unless some rule's needs hold there.
    matched: list[int] = []

    class Counting:
        def match(self, **kwargs: object) -> list[object]:
            matched.append(1)
            return []

    engine = small_engine()
    engine.rule_sets[0].rules = Counting()
    scan(engine, data, "data")
    assert len(matched) == calls


def test_blocks_of_one_byte(small: YaraEngine) -> None:
    data = samples.elf() + b"\0" * 200 + samples.eicar() + b"\0" * 1200
    session = small.session("report.pdf", None)
    for i in range(len(data)):
        session.feed(memoryview(data)[i : i + 1])
    assert {(f.category, f.offset) for f in session.finish(None)} == {
        ("executable", 0),
        ("disguised-executable", 0),
        ("test-signature", len(samples.elf()) + 200),
    }


def test_odd_names_do_not_break_the_scan(engine: YaraEngine) -> None:
    assert categories(engine, samples.elf(), "") == {"executable"}
    for name in ["a\0b.pdf", "bad\udcff.pdf", "dir/sub\\x.PDF", "x" * 5000 + ".pdf"]:
        assert "disguised-executable" in categories(engine, samples.elf(), name)


# --- user rules -------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


USER_RULES = """
rule Secret_Marker {
    meta:
        category = "macro"
        description = "a marker"
    strings:
        $a = "TOP-SECRET-MARKER"
    condition:
        $a
}

rule Anywhere_Marker {
    meta:
        scope = "anywhere"
        category = "no-such-category"
    strings:
        $a = "LATE-MARKER"
    condition:
        $a
}

rule Many_Markers {
    meta:
        category = "custom-rule"
    strings:
        $a = "REPEATED"
    condition:
        #a >= 3
}

rule Named_Csv {
    condition:
        extension == "csv" and filename matches /^secret/
}
"""


def test_user_rules(tmp_path: Path) -> None:
    engine = small_engine([write(tmp_path, "mine.yar", USER_RULES)])
    results = scan(engine, b"x TOP-SECRET-MARKER y", "a.txt")
    assert [(f.category, f.rule, f.offset) for f in results] == [("macro", "Secret_Marker", 2)]
    assert "mine.yar" in results[0].detail
    # No valid category: custom-rule. Scope anywhere: found beyond the first window.
    late = b"\0" + b"." * 3000 + b"LATE-MARKER"
    assert found(engine, late) == {("custom-rule", "Anywhere_Marker")}
    # Default scope is head: the same marker past the first window is not looked for.
    assert scan(engine, b"." * 3000 + b"TOP-SECRET-MARKER") == []
    # Counts work (user rules are not scanned in fast mode), and externals are there.
    assert found(engine, b"REPEATED " * 3) == {("custom-rule", "Many_Markers")}
    assert scan(engine, b"REPEATED " * 2) == []
    assert found(engine, b"a,b\n", "secret-list.csv") == {("custom-rule", "Named_Csv")}
    assert scan(engine, b"a,b\n", "public.csv") == []
    # The shipped rules still run.
    assert "executable" in categories(engine, samples.elf())


def test_user_rules_change_describe(tmp_path: Path) -> None:
    shipped = YaraEngine().describe()
    assert shipped["version"] == yara.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", shipped["rules"])
    mine = YaraEngine([write(tmp_path, "mine.yar", USER_RULES)]).describe()
    assert mine["rules"] != shipped["rules"]
    assert YaraEngine().describe() == shipped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rule broken { condition: nosuchthing }", 'undefined identifier "nosuchthing"'),
        ("rule broken {", "syntax error"),
        ('rule r { meta: needs = "bytes:XYZ" condition: true }', "rule r: meta needs"),
    ],
    ids=["undefined", "syntax", "bad-needs"],
)
def test_bad_user_rule_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "broken.yar", text)
    with pytest.raises(ConfigError) as info:
        YaraEngine([path])
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_user_rule_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        YaraEngine([tmp_path / "missing.yar"])


# --- failures ---------------------------------------------------------------------------


class FailingRules:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def match(self, **kwargs: object) -> list[object]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "rule"),
    [(yara.TimeoutError("scanning timed out"), "timeout"), (yara.Error("boom"), "yara-error")],
)
def test_yara_failure_is_not_scanned(error: Exception, rule: str) -> None:
    engine = small_engine()
    engine.rule_sets[0].rules = FailingRules(error)
    session = engine.session("a.bin", None)
    session.feed(memoryview(os.urandom(5000)))
    results = session.finish(None)
    assert [(f.category, f.rule) for f in results] == [("not-scanned", rule)]


def test_real_yara_timeout_is_not_scanned(tmp_path: Path) -> None:
    # A quadratic condition: about 400 million steps on 20 kB, far over one second.
    slow = write(
        tmp_path,
        "slow.yar",
        "rule Slow { condition: for all i in (0..filesize-1) :"
        " (for all j in (0..filesize-1) : (uint8(j) != 0xFF)) }",
    )
    engine = YaraEngine([slow], timeout=1)
    results = scan(engine, samples.elf() + b"a" * 20000, "x")
    # What the shipped rules found before stays.
    assert [(f.category, f.rule) for f in results] == [
        ("executable", "ELF_Executable"),
        ("not-scanned", "timeout"),
    ]


def test_time_limit_for_the_whole_file_keeps_what_was_found() -> None:
    engine = small_engine(file_timeout=-1)  # spent from the first window on
    results = scan(engine, samples.elf() + b"\0" * 3000, "report.pdf")
    assert [(f.category, f.rule) for f in results] == [
        ("executable", "ELF_Executable"),
        ("disguised-executable", "Disguised_Executable"),
        ("not-scanned", "timeout"),
    ]
    assert "on the file" in results[-1].detail


def test_timeout_is_passed_to_yara(tmp_path: Path) -> None:
    calls: list[dict[str, object]] = []

    class Recording:
        def match(self, **kwargs: object) -> list[object]:
            calls.append(kwargs)
            return []

    engine = small_engine(timeout=3)
    engine.rule_sets[0].rules = Recording()
    scan(engine, b"abc", "x.PDF")
    assert calls[0]["timeout"] == 3
    assert calls[0]["externals"] == {"extension": "pdf", "filename": "x.PDF"}


# --- the shipped rules ------------------------------------------------------------------


def test_shipped_rules_meta() -> None:
    info = YaraEngine().rule_sets[0].info
    assert len(info) >= 13
    for (_, rule), meta in info.items():
        assert meta.category in CATEGORIES, rule
        assert meta.scope in ("head", "anywhere"), rule
        assert meta.description, rule
        # An anywhere rule without needs would make YARA read every window of every file.
        assert meta.scope == "head" or meta.needs is not None, rule


def test_shipped_rules_never_hold_the_eicar_string() -> None:
    folder = files("splitstore.scanning")
    for entry in [*(folder / "data" / "rules").iterdir(), folder / "_signatures.py"]:
        assert samples.eicar() not in entry.read_bytes(), entry.name
