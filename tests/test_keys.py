"""Master key files: private, checked, and a wrong passphrase is named as such."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from splitstore import ConfigError, UsageError
from splitstore._crypto import key_id
from splitstore._keys import create_key_file, load_master_key, read_key_file

FAST_N = 2**10  # tests only: real files use 2**17


def test_raw_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    master = create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key(path) == master
    assert read_key_file(path).key_id == key_id(master).hex()
    with pytest.raises(UsageError, match="exists"):
        create_key_file(path)


def test_passphrase_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "key"
    master = create_key_file(path, passphrase="correct horse", scrypt_n=FAST_N)
    assert "correct" not in path.read_text()
    assert load_master_key(path, passphrase="correct horse") == master
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_master_key(path, passphrase="wrong horse!")
    monkeypatch.setenv("SPLITSTORE_PASSPHRASE", "correct horse")
    assert load_master_key(path) == master
    with pytest.raises(UsageError, match="8 characters"):
        create_key_file(tmp_path / "k2", passphrase="short", scrypt_n=FAST_N)


SCRYPT = '{"format": 1, "kind": "scrypt", "key_id": "%s", "salt": "%s", "n": %s, "r": 8, "p": 1}'
SALT = "AAAAAAAAAAAAAAAAAAAAAA=="  # 16 bytes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        '{"format": 9}',
        '{"format": 1, "kind": "raw", "key": "AA==", "key_id": "00"}',
        "[" * 4000,  # nested too deep for the parser
        SCRYPT % ("0123456789abcdef", "", 1024),  # no salt
        SCRYPT % ("0123456789abcdef", "AAAA", 1024),  # a salt of 3 bytes
        SCRYPT % ("zz", SALT, 1024),  # not a key id
        SCRYPT % ("0123456789abcdef", SALT, 1024.7),  # not a whole number
        SCRYPT % ("0123456789abcdef", SALT, '"1024"'),
        SCRYPT % ("0123456789abcdef", SALT, "true"),
    ],
)
def test_damaged_key_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "key"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_master_key(path)


def test_missing_key_file_says_how_to_restore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key import"):
        load_master_key(tmp_path / "nope")


def test_a_secret_file_is_never_written_over_a_folder(tmp_path: Path) -> None:
    from splitstore._keys import write_secret_file

    (tmp_path / "usb").mkdir()
    for force in (False, True):
        with pytest.raises(UsageError, match="is a folder"):
            write_secret_file(tmp_path / "usb", "secret", force=force)
    assert list((tmp_path / "usb").iterdir()) == []
