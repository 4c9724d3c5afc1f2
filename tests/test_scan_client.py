"""The malicious-file checks as users meet them: put refuses, get refuses to deliver,
the manifest records the scan, stat shows it, and ``splitstore scan`` reports."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from splitstore import Client, IntegrityError, MaliciousFileError, SplitStoreError
from splitstore import _client as splitstore_client
from splitstore._cli import main
from splitstore._pipeline import PieceSink
from splitstore._syncing import SyncingWriter
from splitstore.scanning import Finding, Policy, Scanner, ScanReport, ScanSettings, ScanStream

from .conftest import LiveServers
from .scan_samples import dropper_script, eicar, elf_binary, macro_docx, zip_of


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def stored_objects(servers: LiveServers) -> list[Path]:
    found = []
    for kind in ("https", "tcp"):
        found += list((servers.data_dir(kind) / "tenants").glob("*/objects/*/*"))
    return found


# -- put ----------------------------------------------------------------------------------


def test_put_refuses_a_malicious_file_and_sends_nothing(
    servers: LiveServers, tmp_path: Path
) -> None:
    bad = tmp_path / "invoice.txt"
    bad.write_bytes(eicar())
    with servers.client() as client, pytest.raises(MaliciousFileError) as caught:
        client.store(bad)
    assert "was not stored" in str(caught.value)
    assert "EICAR" in str(caught.value)
    report = caught.value.report
    assert isinstance(report, ScanReport)
    assert report.verdict == "malicious"
    assert stored_objects(servers) == []


@pytest.mark.parametrize("change", ["same-size", "grown"])
def test_put_of_a_file_changed_after_its_scan_commits_nothing(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The bytes sent must be the bytes scanned: a file rewritten between the scan and
    the read that sends it (here, as the scan ends) is refused, and the version stored
    before stays the current one. A large file, so the scan reads it in several blocks."""
    src = tmp_path / "ledger.bin"
    before = os.urandom(9 * 1024 * 1024)
    src.write_bytes(before)
    first = client.store(src)
    scanned = os.urandom(len(before))
    src.write_bytes(scanned)
    real_scan = Scanner.scan_open_file

    def scan_then_change(self: Scanner, *args: Any, **kwargs: Any) -> ScanReport:
        report = real_scan(self, *args, **kwargs)
        with src.open("r+b") as f:  # the same file, changed in place
            if change == "same-size":
                f.seek(5 * 1024 * 1024)
                f.write(b"tampered")
            else:
                f.seek(0, os.SEEK_END)
                f.write(b"more")
        return report

    monkeypatch.setattr(Scanner, "scan_open_file", scan_then_change)
    with pytest.raises(SplitStoreError, match="changed while it was being stored"):
        client.store(src)
    assert client.stat("ledger.bin").sha256 == first.sha256
    out = tmp_path / "out.bin"
    client.fetch("ledger.bin", out)
    assert out.read_bytes() == before


@pytest.mark.parametrize("setup", ["servers", "plain_servers"], ids=["encrypted", "plain"])
def test_a_scanned_put_records_the_files_own_sha256(
    setup: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Scanned, the store takes the file's SHA-256 from the scan (and checks what it sends
    against it with BLAKE3): the manifest holds the hash ``sha256sum`` gives."""
    servers: LiveServers = request.getfixturevalue(setup)
    src = tmp_path / "photo.raw"
    data = os.urandom(6 * 1024 * 1024 + 3)
    src.write_bytes(data)
    with servers.client() as client:
        info = client.store(src)
        assert info.scan is not None
        assert info.sha256 == info.scan.sha256 == hashlib.sha256(data).hexdigest()
        assert client.stat("photo.raw").sha256 == hashlib.sha256(data).hexdigest()
        client.fetch("photo.raw", tmp_path / "back.raw")
    assert (tmp_path / "back.raw").read_bytes() == data


def test_put_with_allow_unsafe_stores_and_records_the_verdict(
    client: Client, tmp_path: Path
) -> None:
    bad = tmp_path / "eicar.com"
    bad.write_bytes(eicar())
    info = client.store(bad, allow_unsafe=True)
    assert info.scan is not None
    assert info.scan.verdict == "malicious"
    assert client.stat("eicar.com").scan == info.scan


def test_clean_file_records_clean_scan_with_engines(client: Client, tmp_path: Path) -> None:
    good = tmp_path / "notes.txt"
    good.write_text("shopping list: apples, pears\n" * 100)
    info = client.store(good)
    stat = client.stat("notes.txt")
    assert stat.scan is not None
    assert stat.scan.verdict == "clean"
    assert stat.scan.sha256 == info.sha256
    assert {"signatures", "yara", "filetype", "archive"} <= set(stat.scan.engines)
    assert "rules" in stat.scan.engines["yara"]


def test_suspicious_file_is_stored_with_its_warning(client: Client, tmp_path: Path) -> None:
    doc = tmp_path / "report.docx"
    doc.write_bytes(macro_docx())
    info = client.store(doc)
    assert info.scan is not None
    assert info.scan.verdict == "suspicious"
    assert any(r.finding.category == "macro" for r in info.scan.reasons)


def test_scan_off_in_config_stores_without_a_record(servers: LiveServers, tmp_path: Path) -> None:
    config = dataclasses.replace(servers.config, scan=ScanSettings(enabled=False))
    bad = tmp_path / "eicar.txt"
    bad.write_bytes(eicar())
    with Client(config) as client:
        assert client.store(bad).scan is None
        assert client.stat("eicar.txt").scan is None


# -- get ----------------------------------------------------------------------------------


def test_get_refuses_to_deliver_a_malicious_file(client: Client, tmp_path: Path) -> None:
    bad = tmp_path / "sample.bin"
    bad.write_bytes(b"padding " * 100 + eicar() + b" more")
    client.store(bad, allow_unsafe=True)
    out = tmp_path / "out" / "sample.bin"
    out.parent.mkdir()
    with pytest.raises(MaliciousFileError) as caught:
        client.fetch("sample.bin", out)
    assert "not delivered" in str(caught.value)
    assert list(out.parent.iterdir()) == []  # not even a temp file
    seen: list[tuple[ScanReport, ScanReport | None]] = []
    path = client.fetch("sample.bin", out, allow_unsafe=True, on_scan=lambda *a: seen.append(a))
    assert path.read_bytes() == bad.read_bytes()
    ((now, then),) = seen
    assert now.verdict == "malicious"
    assert then is not None
    assert then.verdict == "malicious"


def test_an_unencrypted_scanned_get_checks_the_bytes_written_against_the_manifest(
    plain_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unencrypted, a client-side fault after reassembly is caught by the sink's hash of
    what it writes, before the scan (which took the manifest's digest) is used: nothing
    is delivered."""
    client = plain_client
    original = tmp_path / "report.txt"
    original.write_bytes(b"quarterly figures\n" * 5000)
    client.store(original)
    real_write = PieceSink._write

    def flipping(self: PieceSink, block: bytes | memoryview) -> None:
        damaged = bytearray(block)
        damaged[0] ^= 1
        real_write(self, memoryview(damaged))

    monkeypatch.setattr(PieceSink, "_write", flipping)
    out = tmp_path / "out" / "report.txt"
    out.parent.mkdir()
    with pytest.raises(IntegrityError, match="different bytes than were stored"):
        client.fetch("report.txt", out)
    assert list(out.parent.iterdir()) == []


def _recording_vouches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    vouched: list[str] = []
    real = ScanStream.vouch_sha256

    def recording(self: ScanStream, hexdigest: str) -> None:
        vouched.append(hexdigest)
        real(self, hexdigest)

    monkeypatch.setattr(ScanStream, "vouch_sha256", recording)
    return vouched


@pytest.mark.parametrize("setup", ["servers", "plain_servers"], ids=["encrypted", "plain"])
def test_a_scanned_get_takes_the_manifests_digest_and_still_checks_lists(
    setup: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan takes the file's SHA-256 from the manifest instead of hashing the file
    again (encrypted, every segment's tag is checked against the sealed manifest that
    carries it; unencrypted, the sink compares the file's own hash with it), and the
    known-bad lists still catch the file by it."""
    servers: LiveServers = request.getfixturevalue(setup)
    src = tmp_path / "dump.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    listed = tmp_path / "bad.sha256"
    listed.write_text(f"{digest}  leaked-dump\n")
    vouched = _recording_vouches(monkeypatch)
    with servers.client() as client:
        client.store(src)  # not listed yet: clean
        assert vouched == []  # a store hashes what it reads
        seen: list[ScanReport] = []
        client.fetch("dump.bin", tmp_path / "clean.bin", on_scan=lambda now, _: seen.append(now))
    assert vouched == [digest]
    assert seen[0].sha256 == digest
    assert (tmp_path / "clean.bin").read_bytes() == src.read_bytes()
    config = dataclasses.replace(servers.config, scan=ScanSettings(hash_lists=(listed,)))
    with Client(config) as client, pytest.raises(MaliciousFileError, match="leaked-dump"):
        client.fetch("dump.bin", tmp_path / "out.bin")
    assert vouched == [digest, digest]
    assert not (tmp_path / "out.bin").exists()


_BLOCK = 4 * 1024 * 1024


@pytest.mark.parametrize(
    "where",
    [100, _BLOCK - 30, 5 * 1024 * 1024 - 20, 3 * _BLOCK],
    ids=["first-window", "across-blocks", "across-windows", "deep"],
)
def test_a_file_scanned_from_disk_reads_as_when_fed_in_pieces(tmp_path: Path, where: int) -> None:
    """``scan_path`` hashes in one thread while the engines read in another: its report
    is the one a caller feeding the same bytes in odd pieces gets, offsets included."""
    data = bytearray(os.urandom(3 * _BLOCK + 12345))
    data[where : where + len(eicar())] = eicar()
    big = tmp_path / "big.bin"
    big.write_bytes(data)
    listed = tmp_path / "bad.sha256"
    listed.write_text(f"{hashlib.sha256(data).hexdigest()}  whole-file\n")
    scanner = Scanner(ScanSettings(hash_lists=(listed,)))
    from_disk = scanner.scan_path(big)
    stream = scanner.stream(big.name, len(data))
    for start in range(0, len(data), 777_777):
        stream.feed(data[start : start + 777_777])
    fed = stream.finish(big)

    def found(report: ScanReport) -> list[tuple[str, str, int | None]]:
        return sorted((r.finding.engine, r.finding.rule, r.finding.offset) for r in report.reasons)

    assert from_disk.sha256 == fed.sha256 == hashlib.sha256(data).hexdigest()
    assert found(from_disk) == found(fed)
    assert found(from_disk) == [
        ("signatures", "whole-file", None),
        ("yara", "EICAR_Test_String", where),
    ]


def test_a_file_of_a_block_and_a_byte_is_hashed_whole(tmp_path: Path) -> None:
    data = os.urandom(_BLOCK + 1)
    f = tmp_path / "edge.bin"
    f.write_bytes(data)
    report = Scanner(ScanSettings()).scan_path(f)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.size == len(data)  # the engines saw the one-byte tail too


def test_a_scan_stream_takes_a_vouched_digest_only_before_its_first_block() -> None:
    scanner = Scanner(ScanSettings())
    stream = scanner.stream("a.bin")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        stream.vouch_sha256("ab" * 31)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        stream.vouch_sha256("AB" * 32)
    stream.vouch_sha256("ab" * 32)
    stream.feed(b"what the caller vouches for")
    assert stream.finish(None).sha256 == "ab" * 32
    late = scanner.stream("b.bin")
    late.feed(b"x")
    with pytest.raises(RuntimeError, match="before feeding"):
        late.vouch_sha256("ab" * 32)
    assert late.finish(None).sha256 == hashlib.sha256(b"x").hexdigest()


def test_only_an_archive_is_read_again_at_the_end_of_a_scan(tmp_path: Path) -> None:
    scanner = Scanner(ScanSettings())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        member = tarfile.TarInfo("a.txt")
        member.size = 5000
        t.addfile(member, io.BytesIO(os.urandom(5000)))
    for head, reads in (
        (os.urandom(100), True),  # too little yet to tell
        (os.urandom(4096), False),
        (b"plain text\n" * 400, False),
        (zip_of({"a.txt": os.urandom(5000)}), True),
        (tar.getvalue(), True),  # its magic is at byte 257
    ):
        stream = scanner.stream("f.bin")
        stream.feed(head[:100])
        assert stream.reads_file()  # 100 bytes tell nothing yet
        stream.feed(head[100:])
        assert stream.reads_file() is reads


class _SmallSyncs(SyncingWriter):
    """The fetch's disk writer, with a background sync every 256 KiB instead of 16 MiB,
    so that a small test file goes through the drops and O_DIRECT of a large one."""

    def __init__(self, raw: Any, sync_every: int = 0, **options: Any) -> None:
        super().__init__(raw, 256 * 1024, **options)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
@pytest.mark.parametrize("archive", [False, True], ids=["other", "zip"])
def test_a_scanned_get_keeps_only_an_archive_cached_for_its_scan(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: bool
) -> None:
    """A fetched file is written past the page cache as soon as its first block shows the
    scan will not read it again; an archive stays cached, and its members are still
    scanned from the file on disk."""
    body = os.urandom(3 * 2**20)
    data = zip_of({"big.bin": body, "eicar.com": eicar()}) if archive else body
    (tmp_path / "f").write_bytes(data)
    client.store(tmp_path / "f", "f", allow_unsafe=True)
    monkeypatch.setattr(splitstore_client, "SyncingWriter", _SmallSyncs)
    dropped: list[int] = []
    real_advise = os.posix_fadvise

    def spying(fd: int, offset: int, length: int, advice: int) -> None:
        dropped.append(offset)
        real_advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spying)
    seen: list[ScanReport] = []
    out = client.fetch(
        "f", tmp_path / "out", allow_unsafe=True, on_scan=lambda r, _: seen.append(r)
    )
    assert out.read_bytes() == data
    if archive:
        assert dropped == []  # kept for the archive's scan, which found its member:
        assert seen[0].verdict == "malicious"
    else:
        assert dropped[0] == 0  # all of it let go, from the start
        assert seen[0].verdict == "clean"


def test_get_reports_the_scan_of_store_time(client: Client, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(os.urandom(3 * 1024 * 1024))  # several blocks through the scanner
    client.store(src)
    seen: list[tuple[ScanReport, ScanReport | None]] = []
    client.fetch("a.txt", tmp_path / "b.txt", on_scan=lambda *a: seen.append(a))
    ((now, then),) = seen
    assert now.verdict == "clean"
    assert then is not None
    assert then.verdict == "clean"
    assert now.sha256 == then.sha256  # the fetch scanned exactly the bytes stored
    assert now.size == src.stat().st_size


def test_get_blocks_what_a_newer_rule_catches(servers: LiveServers, tmp_path: Path) -> None:
    """Rules change: a file clean when stored is checked again on the way out."""
    src = tmp_path / "plan.txt"
    src.write_bytes(b"the secret word is xylophone-42\n")
    with servers.client() as client:
        assert client.store(src).scan.verdict == "clean"  # type: ignore[union-attr]
    rules = tmp_path / "mine.yar"
    rules.write_text(
        'rule secret_word { meta: category = "custom-rule" '
        'strings: $a = "xylophone-42" condition: $a }\n'
    )
    policy = Policy(actions={**Policy().actions, "custom-rule": "block"})
    scan = ScanSettings(yara_rules=(rules,), policy=policy)
    with Client(dataclasses.replace(servers.config, scan=scan)) as client:
        with pytest.raises(MaliciousFileError, match="custom-rule"):
            client.fetch("plan.txt", tmp_path / "out.txt")
        assert not (tmp_path / "out.txt").exists()


# -- the scanner itself -------------------------------------------------------------------


class _Broken:
    name = "broken"

    def describe(self) -> dict[str, str]:
        return {"version": "0"}

    def session(self, name: str, size: int | None) -> _Broken:
        return self

    def feed(self, block: memoryview) -> None:
        raise RuntimeError("engine bug")

    def finish(self, path: Path | None) -> list[Finding]:
        return []


def test_an_engine_that_fails_never_makes_a_file_clean(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes(b"hello")
    report = Scanner(engines=[_Broken()]).scan_path(f)
    assert report.verdict == "suspicious"
    assert report.reasons[0].finding.category == "not-scanned"
    assert "engine bug" in report.reasons[0].finding.detail


def test_policy_allows_and_blocks_by_category(tmp_path: Path) -> None:
    f = tmp_path / "invoice.pdf"
    f.write_bytes(elf_binary())
    default = Scanner().scan_path(f)
    assert default.verdict == "suspicious"  # a program posing as a PDF
    lenient = Policy(actions={**Policy().actions, "disguised-executable": "allow"})
    assert Scanner(ScanSettings(policy=lenient)).scan_path(f).verdict == "clean"
    strict = Policy(actions={**Policy().actions, "disguised-executable": "block"})
    assert Scanner(ScanSettings(policy=strict)).scan_path(f).verdict == "malicious"


def test_archive_member_findings_name_the_member(tmp_path: Path) -> None:
    f = tmp_path / "bundle.zip"
    f.write_bytes(zip_of({"docs/readme.txt": b"hi", "docs/test.com": eicar()}))
    report = Scanner().scan_path(f)
    assert report.verdict == "malicious"
    members = {r.finding.member for r in report.blocking}
    assert any(m is not None and m.endswith("docs/test.com") for m in members)


def test_report_round_trips_and_stays_bounded() -> None:
    many = [
        Finding("archive", "archive-path", "dotdot", "x" * 2000, member=f"m{i}/" + "y" * 500)
        for i in range(500)
    ]
    from splitstore.scanning import Reason

    report = ScanReport.build("n", [Reason(f, "warn") for f in many], {}, 1, "0" * 64, 0.1, 0.0)
    bounded = report.bounded()
    assert len(json.dumps(bounded.to_json())) <= 12 * 1024
    assert bounded.omitted + len(bounded.reasons) == 500
    assert ScanReport.from_json(bounded.to_json()) == bounded


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def no_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPLITSTORE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("no_config")
def test_cli_scan_verdicts_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean, bad, odd = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.ps1"
    clean.write_text("hello\n")
    bad.write_bytes(eicar())
    odd.write_bytes(dropper_script())
    assert run(capsys, "scan", clean) == (0, f"{clean}: clean\n", "")
    code, out, err = run(capsys, "scan", clean, bad, odd)
    assert code == 1
    assert err == ""
    assert f"{bad}: malicious" in out
    assert "EICAR" in out
    assert f"{odd}: suspicious" in out
    assert "script-dropper" in out
    code, out, _ = run(capsys, "scan", "--json", clean, bad)
    docs = json.loads(out)
    assert code == 1
    assert [d["verdict"] for d in docs] == ["clean", "malicious"]
    assert docs[1]["findings"][0]["action"] == "block"
    code, out, err = run(capsys, "scan", clean, tmp_path / "missing")
    assert code == 2
    assert "missing" in err
    assert err.count("\n") == 1


@pytest.mark.usefixtures("no_config")
def test_cli_scan_reads_the_policy_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "scan.toml"
    cfg.write_text(
        'token_file = "t"\nencryption = "none"\n'
        '[[servers]]\nkind = "https"\nport = 1\n[[servers]]\nkind = "tcp"\nport = 2\n'
        '[scan.policy]\nmacro = "block"\n'
    )
    doc = tmp_path / "q.docx"
    doc.write_bytes(macro_docx())
    code, out, _ = run(capsys, "--config", cfg, "scan", doc)
    assert code == 1
    assert "malicious" in out
    cfg.write_text(cfg.read_text().replace('macro = "block"', 'macro = "sometimes"'))
    code, _, err = run(capsys, "--config", cfg, "scan", doc)
    assert code == 2
    assert "scan.policy.macro" in err


def test_cli_put_get_stat_with_scans(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(servers.config_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(eicar())
    code, out, err = run(capsys, "--config", cfg, "-q", "put", bad)
    assert code == 7
    assert out == ""
    assert "was not stored" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, "--config", cfg, "-q", "put", bad, "--allow-unsafe")
    assert code == 0
    assert "warning" in err
    assert "--allow-unsafe" in err
    code, out, _ = run(capsys, "--config", cfg, "stat", "bad.txt")
    assert code == 0
    assert "scan:       malicious" in out
    assert "EICAR" in out
    code, _, err = run(capsys, "--config", cfg, "-q", "get", "bad.txt", "-o", tmp_path / "o")
    assert code == 7
    assert "not delivered" in err
    assert not (tmp_path / "o").exists()
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    assert run(capsys, "--config", cfg, "-q", "put", good)[0] == 0
    code, out, err = run(capsys, "--config", cfg, "get", "good.txt", "-o", tmp_path / "g")
    assert code == 0
    assert err == ""
    assert "scan: clean when stored" in out


def test_malicious_file_error_is_a_splitstore_error() -> None:
    assert issubclass(MaliciousFileError, SplitStoreError)


# -- with a real clamd ----------------------------------------------------------------------


def test_put_through_clamd_blocks_and_records_clamav(
    servers: LiveServers, clamd_address: str, tmp_path: Path
) -> None:
    scan = ScanSettings(clamd=clamd_address, clamd_timeout=10.0)
    config = dataclasses.replace(servers.config, scan=scan)
    bad = tmp_path / "mixed.bin"
    bad.write_bytes(os.urandom(100_000) + eicar() + os.urandom(1000))
    good = tmp_path / "fine.bin"
    good.write_bytes(os.urandom(100_000))
    with Client(config) as client:
        with pytest.raises(MaliciousFileError) as caught:
            client.store(bad)
        report = caught.value.report
        assert isinstance(report, ScanReport)
        assert any(r.finding.engine == "clamav" for r in report.blocking)
        info = client.store(good)
        assert info.scan is not None
        assert info.scan.verdict == "clean"
        assert info.scan.engines["clamav"]["version"].startswith("ClamAV")


# -- review: edge cases -----------------------------------------------------------------


def test_get_blocks_an_older_version_it_falls_back_to(servers: LiveServers, tmp_path: Path) -> None:
    """v2's data is gone from one server: a fresh client falls back to v1, which is
    scanned like any other (and, malicious, not delivered)."""
    bad, good = tmp_path / "v1", tmp_path / "v2"
    bad.write_bytes(b"padding " * 100 + eicar())
    good.write_bytes(b"nothing to see\n" * 100)
    folder = servers.object_dir("tcp", "doc.txt")
    snapshot = tmp_path / "snapshot"
    with servers.client() as client:
        client.store(bad, "doc.txt", allow_unsafe=True)
        shutil.copytree(folder, snapshot)
        second = client.store(good, "doc.txt")
    for saved in snapshot.iterdir():  # as if the tcp server never got v2's commit
        shutil.copy2(saved, folder / saved.name)
    for suffix in (".stripe", ".meta"):
        (folder / f"{second.version_id}{suffix}").unlink()
    out = tmp_path / "out"
    out.mkdir()
    fresh = dataclasses.replace(servers.config, state_file=tmp_path / "fresh.state")
    with Client(fresh) as client, pytest.raises(MaliciousFileError):
        client.fetch("doc.txt", out / "doc.txt")
    assert list(out.iterdir()) == []
    with Client(fresh) as client:  # it was v1 that was read, and blocked
        path = client.fetch("doc.txt", out / "doc.txt", allow_unsafe=True)
    assert path.read_bytes() == bad.read_bytes()


def test_get_with_bad_rule_file_leaves_no_temp_file(servers: LiveServers, tmp_path: Path) -> None:
    src = tmp_path / "plain.txt"
    src.write_text("hello\n")
    with servers.client() as client:
        client.store(src)
    rules = tmp_path / "broken.yar"
    rules.write_text("rule { this does not compile")
    config = dataclasses.replace(servers.config, scan=ScanSettings(yara_rules=(rules,)))
    out = tmp_path / "out"
    out.mkdir()
    with Client(config) as client, pytest.raises(SplitStoreError, match=r"broken\.yar"):
        client.fetch("plain.txt", out / "plain.txt")
    assert list(out.iterdir()) == []


def test_scanner_is_not_built_on_the_event_loop(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the scanner compiles the YARA rules and loads libmagic (most of a second):
    not on the event loop, which other transfers share."""
    import threading

    import splitstore._client as client_module

    built_on: list[str] = []

    class Recording(Scanner):
        def __init__(self, *args: object, **kwargs: object) -> None:
            built_on.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_module, "Scanner", Recording)
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    loop_threads: list[str] = []

    def progress(done: int, total: int) -> None:
        loop_threads.append(threading.current_thread().name)

    with servers.client() as client:
        client.store(src, progress=progress)
    assert built_on
    assert loop_threads
    assert built_on[0] not in loop_threads


@pytest.mark.usefixtures("no_config")
def test_cli_scan_of_special_files_does_not_hang(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result: list[tuple[int, str, str]] = []
    worker = threading.Thread(target=lambda: result.append(run(capsys, "scan", fifo)))
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock it: a writer that closes at once
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("scan waited for a writer on a FIFO")
    ((code, out, err),) = result
    assert code == 2
    assert out == ""
    assert "not a regular file" in err
    assert err.count("\n") == 1


@pytest.mark.usefixtures("no_config")
def test_cli_scan_directories_empty_and_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty, folder = tmp_path / "empty.txt", tmp_path / "folder"
    empty.write_bytes(b"")
    folder.mkdir()
    assert run(capsys, "scan", empty) == (0, f"{empty}: clean\n", "")
    code, out, err = run(capsys, "scan", folder, tmp_path / "missing", empty)
    assert code == 2
    assert out == f"{empty}: clean\n"
    assert err.count("\n") == 2
    assert "is a directory" in err
    assert "missing" in err
    code, out, err = run(capsys, "scan", "--json", folder, empty)
    assert code == 2
    docs = json.loads(out)
    assert sorted(docs[0]) == ["error", "name"]
    assert docs[0]["name"] == str(folder)
    assert docs[1]["verdict"] == "clean"
    assert docs[1]["size"] == 0


def _plain_manifest_with_scan(record: object) -> bytes:
    from splitstore._manifest import Manifest, StripeInfo

    manifest = Manifest(
        name="f.txt",
        size=0,
        chunk_size=65536,
        sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        version_id="0" * 32,
        created_ns=1,
        stripes=(
            StripeInfo("https", 0, "blake3:" + "0" * 64),
            StripeInfo("tcp", 0, "blake3:" + "0" * 64),
        ),
    )
    doc = json.loads(manifest.to_bytes())
    doc["scan"] = record
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "change",
    [
        {"size": 1e999},
        {"omitted": -1e999},
        {
            "findings": [
                {"engine": "x", "category": "macro", "rule": "r", "action": "warn", "offset": 1e999}
            ]
        },
        {"seconds": "soon"},
        {"scanned_at": 1e300},
        {"scanned_at": float("nan")},
        {"size": -1},
        {"size": "12"},
        {
            "findings": [
                {"engine": "x", "category": "macro", "rule": "r", "action": "warn", "offset": [1]}
            ]
        },
    ],
)
def test_a_malformed_scan_record_is_a_malformed_manifest(change: dict[str, object]) -> None:
    """Whatever a (plain-mode) server makes of the record, reading it fails as an
    IntegrityError, never as some other exception."""
    from splitstore._errors import IntegrityError
    from splitstore._manifest import Manifest

    record: dict[str, object] = {
        "verdict": "clean",
        "size": 0,
        "sha256": "0" * 64,
        "engines": {},
        "findings": [],
    }
    record.update(change)
    with pytest.raises(IntegrityError, match="malformed"):
        Manifest.from_bytes(_plain_manifest_with_scan(record))


def test_a_record_from_a_newer_version_stays_readable() -> None:
    """A category this version does not know (added later) must not make a stored file
    unreadable: it is kept, under custom-rule, with its name in the detail."""
    finding = Finding.from_json(
        {"engine": "yara", "category": "phishing", "rule": "r", "detail": "d"}
    )
    assert finding.category == "custom-rule"
    assert finding.detail == "[phishing] d"


@pytest.mark.usefixtures("no_config")
def test_cli_scan_bug_is_an_error_not_a_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hi\n")

    def broken(self: Scanner, path: object, name: object = None) -> ScanReport:
        raise RuntimeError("boom")

    monkeypatch.setattr(Scanner, "scan_path", broken)
    code, out, err = run(capsys, "scan", "--json", f)
    assert code == 2  # not 1, "found"
    assert json.loads(out)[0]["error"].startswith("internal error")
    assert err.count("\n") == 1


def test_known_bad_hash_through_the_scanner_uses_its_one_hash(tmp_path: Path) -> None:
    """The signature engine reads the scanner's own SHA-256 (one hash per file), across
    several blocks, and still finds a listed file."""
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(9 * 1024 * 1024))
    listed = tmp_path / "bad.txt"
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    listed.write_text(f"{digest}  my-bad-file\n")
    report = Scanner(ScanSettings(hash_lists=(listed,))).scan_path(f)
    assert report.verdict == "malicious"
    assert report.sha256 == digest
    assert [r.finding.rule for r in report.blocking] == ["my-bad-file"]


def test_a_store_cancelled_during_its_scan_ends_with_the_scan(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan reads the open source file in a worker thread: a cancelled store (Ctrl-C,
    a caller's time-out) returns only once that thread has ended, never closing the file
    under it."""
    import asyncio
    import threading
    import time

    from splitstore import AsyncClient

    source = tmp_path / "big"
    source.write_bytes(os.urandom(8 << 20))
    started, ends = threading.Event(), []
    feed, scan = ScanStream._feed_engines, Scanner.scan_open_file

    def slow_feed(self: ScanStream, view: memoryview) -> None:
        time.sleep(0.05)  # an engine as slow as a large archive's, or clamd's
        feed(self, view)

    def traced(self: Scanner, f: Any, *args: Any, **kwargs: Any) -> ScanReport:
        started.set()
        try:
            return scan(self, f, *args, **kwargs)
        finally:
            ends.append(f.closed)

    monkeypatch.setattr(ScanStream, "_feed_engines", slow_feed)
    monkeypatch.setattr(Scanner, "scan_open_file", traced)

    async def scenario() -> None:
        async with AsyncClient(servers.config) as client:
            assert client.scanner() is not None
            store = asyncio.ensure_future(client.store(source, "big"))
            while not started.is_set():
                await asyncio.sleep(0.01)
            store.cancel()
            with pytest.raises(asyncio.CancelledError):
                await store
            assert ends == [False]  # the scan had ended, with the file still open

    asyncio.run(scenario())
