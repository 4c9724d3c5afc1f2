"""Encryption as a user meets it: setups, keys, padding and the client's memory of versions."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from splitstore import Client, ConfigError, IntegrityError, UsageError, WrongKeyError, load_config
from splitstore._cli import main
from splitstore._client import AsyncClient
from splitstore._crypto import ciphertext_size, padme
from splitstore._keyring import Keyring
from splitstore._keys import PASSPHRASE_ENV_VAR, create_key_file, read_key_file
from splitstore._setup import free_loopback_port as free_port
from splitstore._state import SeenVersions
from splitstore._stripes import stripe_lengths

from .conftest import LiveServers


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *mentions: str) -> None:
    assert err.startswith("splitstore: error: "), err
    assert err.count("\n") == 1, err
    for text in mentions:
        assert text in err, err


def rewrite_config(path: Path, **changes: str | None) -> None:
    """Set (or with None, drop) top-level keys of a config file."""
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.split("=")[0].strip() not in changes]
    extra = [f"{k} = {json.dumps(v)}" for k, v in changes.items() if v is not None]
    path.write_text("\n".join(extra + kept) + "\n")


# -- padding ---------------------------------------------------------------------------


def test_padme_rounds_up_by_at_most_12_percent() -> None:
    assert [padme(n) for n in (0, 1, 2, 3, 9, 1000)] == [0, 1, 2, 3, 10, 1024]
    for n in (10**3, 10**6 + 7, 3 * 2**20 + 1, 10**9 + 11):
        assert n <= padme(n) <= n * 1.12
        assert padme(padme(n)) == padme(n)


def test_padding_hides_the_exact_size(servers: LiveServers, tmp_path: Path) -> None:
    rewrite_config(servers.config_path, padding="padme")
    sizes = [100_100, 100_200, 100_300]  # all pad to 100,352
    with Client(servers.config_path) as client:
        held = set()
        for i, size in enumerate(sizes):
            data = os.urandom(size)
            (tmp_path / "in").write_bytes(data)
            info = client.store(tmp_path / "in", f"f{i}")
            assert info.size == size
            stored = ciphertext_size(padme(size))
            assert list(info.bytes_per_server.values()) == stripe_lengths(stored, 1024, 2)
            held.add(tuple(info.bytes_per_server.values()))
            assert client.fetch(f"f{i}", tmp_path / f"out{i}").read_bytes() == data
            assert client.stat(f"f{i}").size == size
    assert len(held) == 1  # three different sizes look the same to the servers


# -- setups and keys --------------------------------------------------------------------


def test_init_encryption_none_stores_raw_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "init", "--dir", tmp_path / "s", "--encryption", "none")
    assert (code, err) == (0, "")
    assert "encryption   OFF" in out
    raw = tomllib.loads((tmp_path / "s" / "splitstore.toml").read_text())
    assert raw["encryption"] == "none"
    assert "key_file" not in raw
    assert not (tmp_path / "s" / "key").exists()


def test_init_makes_a_private_key_and_says_to_back_it_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "init", "--dir", tmp_path / "s")
    assert (code, err) == (0, "")
    assert "key export" in out
    key = tmp_path / "s" / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_config(tmp_path / "s" / "splitstore.toml").encrypted


def test_init_with_a_passphrase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV_VAR, "correct horse battery")
    code, _, err = run(capsys, "init", "--dir", tmp_path / "s", "--passphrase")
    assert (code, err) == (0, "")
    kf = read_key_file(tmp_path / "s" / "key")
    assert (kf.kind, kf.key) == ("scrypt", None)  # the file alone holds no secret
    code, out, _ = run(capsys, "--config", tmp_path / "s" / "splitstore.toml", "key", "show")
    assert code == 0
    assert "passphrase (scrypt)" in out
    assert kf.key_id in out


def test_init_refuses_a_passphrase_without_encryption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "init", "--dir", tmp_path / "s", "--encryption", "none", "--passphrase"
    )
    assert code == 2
    one_line(err, "--passphrase")


def test_init_force_keeps_the_master_key(tmp_path: Path) -> None:
    from splitstore._setup import init_setup

    paths = init_setup(tmp_path, https_port=free_port(), tcp_port=free_port())
    before = paths.key.read_bytes()
    init_setup(tmp_path, https_port=free_port(), tcp_port=free_port(), force=True)
    assert paths.key.read_bytes() == before  # a new key would orphan every stored file


def test_export_import_moves_the_key_to_another_machine(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = servers.config_path
    data = os.urandom(5000)
    (tmp_path / "in").write_bytes(data)
    with Client(cfg) as client:
        client.store(tmp_path / "in", "doc")

    backup = tmp_path / "backup.key"
    code, out, err = run(capsys, "--config", cfg, "key", "export", "-o", backup)
    assert (code, err) == (0, "")
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    code, out, _ = run(capsys, "--config", cfg, "key", "export")
    assert json.loads(out) == json.loads(backup.read_text())
    code, _, err = run(capsys, "--config", cfg, "key", "export", "-o", backup)
    assert code == 2
    one_line(err, "already exists")

    # "another machine": the same config and token, no key yet
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text())
    rewrite_config(other, key_file=str(tmp_path / "other.key"), state_file=str(tmp_path / "o.st"))
    rewrite_config(other, token_file=str(servers.paths.token), ca_file=str(servers.paths.ca_cert))
    code, _, err = run(capsys, "--config", other, "get", "doc", "-o", tmp_path / "x")
    assert code == 2
    one_line(err, "key file", "does not exist", "key import")

    code, out, err = run(capsys, "--config", other, "key", "import", backup)
    assert (code, err) == (0, "")
    assert "imported master key" in out
    assert stat.S_IMODE((tmp_path / "other.key").stat().st_mode) == 0o600
    code, _, err = run(capsys, "--config", other, "get", "doc", "-o", tmp_path / "x")
    assert (code, err) == (0, "")
    assert (tmp_path / "x").read_bytes() == data
    # importing the same key again is fine; another one is refused without --force
    assert run(capsys, "--config", other, "key", "import", backup)[0] == 0
    cfg2 = tmp_path / "s2"
    assert run(capsys, "init", "--dir", cfg2, "-q")[0] == 0
    code, _, err = run(capsys, "--config", other, "key", "import", cfg2 / "key")
    assert code == 2
    one_line(err, "holds another key", "--force")


def test_import_refuses_what_is_not_a_key(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk").write_text("not a key\n")
    code, _, err = run(capsys, "--config", servers.config_path, "key", "import", tmp_path / "junk")
    assert code == 2
    one_line(err, "not a splitstore key")


def test_key_commands_need_encryption(
    plain_servers: LiveServers, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--config", plain_servers.config_path, "key", "show")
    assert code == 2
    one_line(err, "encryption off")


def test_a_config_with_encryption_on_needs_a_key_file(servers: LiveServers) -> None:
    rewrite_config(servers.config_path, key_file=None)
    with pytest.raises(ConfigError, match="key_file"):
        load_config(servers.config_path)


def test_a_wrong_passphrase_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV_VAR, "correct horse battery")
    assert run(capsys, "init", "--dir", tmp_path / "s", "--passphrase", "-q")[0] == 0
    monkeypatch.setenv(PASSPHRASE_ENV_VAR, "wrong horse battery")
    code, _, err = run(capsys, "--config", tmp_path / "s" / "splitstore.toml", "key", "export")
    assert code == 2
    one_line(err, "wrong passphrase")


def test_reading_encrypted_files_with_encryption_off_is_explained(
    servers: LiveServers, tmp_path: Path
) -> None:
    oid, record = stored_record(servers, tmp_path)
    # A config with encryption off finds the object only under the keyed id: ask raw.
    rewrite_config(servers.config_path, encryption="none", key_file=None)
    load_config(servers.config_path)  # such a config loads; opening the record explains
    with pytest.raises(ConfigError, match="encryption off"):
        Keyring(None).open(oid, record, "https server")


def test_an_unsealed_manifest_that_claims_encryption_is_refused_as_forged(
    servers: LiveServers, tmp_path: Path
) -> None:
    """With encryption off nothing is sealed, so a manifest carrying a file key was
    written by someone else: its data and digest would be whatever they chose."""
    oid, record = stored_record(servers, tmp_path)
    with Client(servers.config_path) as client:
        manifest = client._async.keyring().open(oid, record, "https server")
    assert manifest.encrypted
    with pytest.raises(IntegrityError, match=r"unsealed manifest .* says the file is encrypted"):
        Keyring(None).open(oid, manifest.to_bytes(), "https server")


def stored_record(servers: LiveServers, tmp_path: Path) -> tuple[str, bytes]:
    """Store a small file as "doc"; return its object id and the manifest as stored."""
    (tmp_path / "in").write_bytes(b"x" * 10)
    with Client(servers.config_path) as client:
        client.store(tmp_path / "in", "doc")
        oid = client._async.object_id("doc")

    async def get_record() -> bytes:
        async with AsyncClient(servers.config) as raw:
            return (await raw.remotes()[0].get_record(oid)).manifest

    return oid, servers.loop.run(get_record())


def test_a_file_stored_with_another_key_is_a_wrong_key_error(
    servers: LiveServers, tmp_path: Path
) -> None:
    oid, record = stored_record(servers, tmp_path)
    other = Keyring(create_key_file(tmp_path / "other.key"))
    with pytest.raises(WrongKeyError, match="another master key"):
        other.open(oid, record, "tcp server")


# -- the client's memory of versions ---------------------------------------------------


def test_state_file_remembers_versions_across_sessions(
    servers: LiveServers, tmp_path: Path
) -> None:
    (tmp_path / "in").write_bytes(b"v1")
    with Client(servers.config_path) as client:
        first = client.store(tmp_path / "in", "doc")
        oid = client._async.object_id("doc")
    state = servers.config.state_path()
    assert state is not None
    assert state.exists()
    seen = SeenVersions(state)
    assert seen.get(oid) is not None
    assert seen.get(oid).version_id == first.version_id  # type: ignore[union-attr]
    seen.close()
    with Client(servers.config_path) as client:
        second = client.store(tmp_path / "in", "doc")
        client.delete("doc")
    assert second.stored_at > first.stored_at
    seen = SeenVersions(state)
    assert seen.get(oid).deleted  # type: ignore[union-attr]
    seen.close()


def test_versions_stay_ordered_when_the_clock_goes_back(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    (tmp_path / "in").write_bytes(b"a")
    with Client(servers.config_path) as client:
        first = client.store(tmp_path / "in", "doc")
        real = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real() - 3600 * 10**9)
        (tmp_path / "in").write_bytes(b"b")
        second = client.store(tmp_path / "in", "doc")
        assert second.stored_at >= first.stored_at  # not an hour earlier
        assert client.fetch("doc", tmp_path / "out").read_bytes() == b"b"


def test_an_unusable_state_file_is_a_clear_error(servers: LiveServers, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    rewrite_config(servers.config_path, state_file=str(tmp_path / "state"))
    (tmp_path / "in").write_bytes(b"a")
    with Client(servers.config_path) as client, pytest.raises(UsageError, match="state file"):
        client.store(tmp_path / "in", "doc")


def test_a_damaged_state_file_is_a_clear_error(servers: LiveServers, tmp_path: Path) -> None:
    """A state file whose table pages are damaged (its header still readable) is named in
    a ConfigError by every operation that reads it, not raised as sqlite3's own error."""
    import sqlite3

    state = tmp_path / "damaged.state"
    rewrite_config(servers.config_path, state_file=str(state))
    with Client(servers.config_path) as client:  # makes the file, as any client does
        (tmp_path / "in").write_bytes(b"a")
        client.store(tmp_path / "in", "doc")
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        rows = [(f"{i:064x}", i, "v" * 32, 0) for i in range(5000)]
        db.executemany("INSERT INTO seen VALUES (?, ?, ?, ?)", rows)
    with state.open("r+b") as f:  # every page after the first few, the schema's kept
        f.seek(4096 * 3)
        f.write(b"\xff" * (state.stat().st_size - 4096 * 4))
    with Client(servers.config_path) as client:
        for call in (
            lambda: client.store(tmp_path / "in", "doc"),
            lambda: client.fetch("doc", tmp_path / "out"),
        ):
            with pytest.raises(ConfigError, match="client state file"):
                call()


def test_no_fallback_to_a_version_older_than_seen(servers: LiveServers, tmp_path: Path) -> None:
    """A server that drops the newest data (and shows an old record) cannot roll the file back.

    A client that never saw the newer version still gets the newest one both servers can
    serve, as before.
    """
    import shutil

    from splitstore import IntegrityError

    (tmp_path / "v1").write_bytes(b"one" * 1000)
    (tmp_path / "v2").write_bytes(b"two" * 1000)
    with Client(servers.config_path) as client:
        client.store(tmp_path / "v1", "doc")
        shutil.copyfile(servers.object_dir("tcp", "doc") / "record.json", tmp_path / "old.json")
        client.store(tmp_path / "v2", "doc")
        v2_stripe = servers.stripe_path("tcp", "doc")
        shutil.copyfile(tmp_path / "old.json", servers.object_dir("tcp", "doc") / "record.json")
        v2_stripe.unlink()
        v2_stripe.with_suffix(".meta").unlink()
        tcp = servers.config.server("tcp").label
        with pytest.raises(IntegrityError) as info:
            client.fetch("doc", tmp_path / "out")
        assert info.value.server == tcp
        assert "no longer holds" in str(info.value)
        assert not (tmp_path / "out").exists()
    # a client with no memory of v2 (another machine) gets v1, which both servers hold
    rewrite_config(servers.config_path, state_file=str(tmp_path / "fresh.state"))
    with Client(servers.config_path) as fresh:
        assert fresh.fetch("doc", tmp_path / "out").read_bytes() == b"one" * 1000


def test_no_fallback_past_a_seen_version_when_a_newer_one_is_withheld(
    servers: LiveServers, tmp_path: Path
) -> None:
    """Another client stores v3; the servers withhold v3's data and show v1 again: the
    client that saw v2 must not accept v1 (the version it falls back to is what counts)."""
    import shutil

    from splitstore import IntegrityError

    (tmp_path / "v1").write_bytes(b"one" * 1000)
    (tmp_path / "v2").write_bytes(b"two" * 1000)
    (tmp_path / "v3").write_bytes(b"three" * 1000)
    a_state = tmp_path / "a.state"
    rewrite_config(servers.config_path, state_file=str(a_state))
    with Client(servers.config_path) as a:
        a.store(tmp_path / "v1", "doc")
        saved = {k: tmp_path / f"v1-{k}" for k in ("https", "tcp")}
        for kind, folder in saved.items():
            shutil.copytree(servers.object_dir(kind, "doc"), folder)
        a.store(tmp_path / "v2", "doc")
    rewrite_config(servers.config_path, state_file=str(tmp_path / "b.state"))
    with Client(servers.config_path) as b:
        b.store(tmp_path / "v3", "doc")
    v3_tcp = servers.stripe_path("tcp", "doc")
    for kind, folder in saved.items():
        for f in folder.iterdir():
            if f.suffix in (".stripe", ".meta"):
                shutil.copy2(f, servers.object_dir(kind, "doc") / f.name)
    shutil.copy2(saved["tcp"] / "record.json", servers.object_dir("tcp", "doc") / "record.json")
    v3_tcp.unlink()
    v3_tcp.with_suffix(".meta").unlink()
    rewrite_config(servers.config_path, state_file=str(a_state))
    with Client(servers.config_path) as a, pytest.raises(IntegrityError) as info:
        a.fetch("doc", tmp_path / "out")
    assert info.value.server == servers.config.server("tcp").label
    assert not (tmp_path / "out").exists()


def test_key_import_force_replaces_a_damaged_key_file(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = servers.config_path
    backup = tmp_path / "backup.key"
    assert run(capsys, "--config", cfg, "key", "export", "-o", backup)[0] == 0
    servers.paths.key.write_text("garbage\n")
    code, _, err = run(capsys, "--config", cfg, "key", "import", backup)
    assert code == 2
    one_line(err, "damaged", "--force")
    code, out, err = run(capsys, "--config", cfg, "key", "import", backup, "--force")
    assert (code, err) == (0, "")
    assert read_key_file(servers.paths.key).key_id in out
