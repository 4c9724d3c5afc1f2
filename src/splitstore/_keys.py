"""The master key file: created by ``init``, needed for every read, backed up by export.

Two kinds, both JSON (docs/format.md):

- ``raw``: the 32-byte master key itself, base64. The file is the key: keep it private.
- ``scrypt``: only a salt and scrypt parameters; the key is derived from a passphrase
  (from $SPLITSTORE_PASSPHRASE, or asked at the terminal). The file alone reveals nothing.

Both record the key id (a public fingerprint) so a wrong key or passphrase is reported as
such instead of as damaged data.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ._crypto import KEY_SIZE, key_id
from ._errors import ConfigError, UsageError

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "PASSPHRASE_ENV_VAR",
    "KeyFile",
    "ask_new_passphrase",
    "check_passphrase",
    "create_key_file",
    "export_key",
    "import_key",
    "load_master_key",
    "read_key_file",
    "write_key_file",
    "write_secret_file",
]

PASSPHRASE_ENV_VAR = "SPLITSTORE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
KEY_FILE_FORMAT = 1
# scrypt cost: 2**17 takes ~0.3 s and 128 MiB, the strength age and restic choose.
DEFAULT_SCRYPT_N = 2**17
MAX_KEY_FILE_BYTES = 4096
MIN_PASSPHRASE_CHARS = 8
SALT_BYTES = 16  # scrypt's salt (docs/format.md, "Key file")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class KeyFile:
    kind: str  # "raw" or "scrypt"
    key_id: str
    key: bytes | None = None  # raw only
    salt: bytes | None = None  # scrypt only
    n: int = DEFAULT_SCRYPT_N
    r: int = 8
    p: int = 1

    def to_text(self) -> str:
        doc: dict[str, object] = {
            "format": KEY_FILE_FORMAT,
            "kind": self.kind,
            "key_id": self.key_id,
        }
        if self.kind == "raw" and self.key is not None:
            doc["key"] = base64.b64encode(self.key).decode()
        elif self.salt is not None:
            doc.update(salt=base64.b64encode(self.salt).decode(), n=self.n, r=self.r, p=self.p)
        return json.dumps(doc, indent=2) + "\n"


def create_key_file(
    path: Path, *, passphrase: str | None = None, scrypt_n: int = DEFAULT_SCRYPT_N
) -> bytes:
    """Make a new master key (random, or from ``passphrase``), write its file, return it."""
    if passphrase is None:
        master = os.urandom(KEY_SIZE)
        kf = KeyFile("raw", key_id(master).hex(), key=master)
    else:
        check_passphrase(passphrase)
        salt = os.urandom(SALT_BYTES)
        master = _scrypt(passphrase, salt, scrypt_n, 8, 1)
        kf = KeyFile("scrypt", key_id(master).hex(), salt=salt, n=scrypt_n)
    write_key_file(path, kf)
    return master


def check_passphrase(passphrase: str) -> None:
    """Refuse a passphrase too short to protect a key (before anything is written)."""
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise UsageError(f"a passphrase needs at least {MIN_PASSPHRASE_CHARS} characters")


def write_key_file(path: Path, kf: KeyFile, *, force: bool = False) -> None:
    """Write a key file readable only by its owner, atomically; never clobber silently."""
    write_secret_file(path, kf.to_text(), force=force)


def write_secret_file(path: Path, text: str, *, force: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600: temp file, fsync, rename."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: name the file to write")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):  # a full disk, say: nothing was replaced
            raise UsageError(f"cannot write {path}: {exc.strerror}") from exc
        raise


def read_key_file(path: Path) -> KeyFile:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"the key file {path} does not exist; without it stored files cannot be read "
            "(restore it with 'splitstore key import')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from exc
    return parse_key_text(raw, str(path))


def parse_key_text(raw: bytes | str, path: str) -> KeyFile:
    """A key file's contents, checked; ConfigError naming ``path`` if they are not one."""
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"the key file {path} is too large to be a splitstore key")
    try:
        doc = json.loads(raw)
        if doc["format"] != KEY_FILE_FORMAT:
            raise ConfigError(f"the key file {path} has an unknown format; upgrade splitstore")
        kind, kid = doc["kind"], doc["key_id"]
        if kind == "raw":
            key = base64.b64decode(doc["key"], validate=True)
            if len(key) != KEY_SIZE or key_id(key).hex() != kid:
                raise ValueError("key and key id do not match")
            return KeyFile("raw", kid, key=key)
        if kind == "scrypt":
            salt = base64.b64decode(doc["salt"], validate=True)
            if len(salt) != SALT_BYTES:
                raise ValueError(f"the salt must be {SALT_BYTES} bytes")
            if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
                raise ValueError("the key id must be 16 lowercase hex digits")
            n, r, p = (doc[k] for k in ("n", "r", "p"))
            if not all(type(v) is int for v in (n, r, p)):
                raise ValueError("scrypt parameters must be whole numbers")
            if not (2**10 <= n <= 2**22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError("scrypt parameters out of range")
            return KeyFile("scrypt", kid, salt=salt, n=n, r=r, p=p)
        raise ValueError(f"unknown kind {kind!r}")
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError(
            f"the key file {path} is damaged or not a splitstore key ({exc})"
        ) from exc


def load_master_key(path: Path, *, passphrase: str | None = None) -> bytes:
    """The master key of a key file; asks for the passphrase if the file needs one."""
    kf = read_key_file(path)
    if kf.kind == "raw" and kf.key is not None:
        return kf.key
    if passphrase is None:
        passphrase = os.environ.get(PASSPHRASE_ENV_VAR)
    if passphrase is None:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"the key file {path} needs a passphrase: set ${PASSPHRASE_ENV_VAR} "
                "or run at a terminal"
            )
        passphrase = getpass.getpass("splitstore passphrase: ")
    if kf.salt is None:
        raise ConfigError(f"the key file {path} has no salt")
    master = _scrypt(passphrase, kf.salt, kf.n, kf.r, kf.p)
    if key_id(master).hex() != kf.key_id:
        raise ConfigError("wrong passphrase for the key file " + str(path))
    return master


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    kdf = Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p)
    return kdf.derive(passphrase.encode("utf-8"))


def ask_new_passphrase() -> str:
    """A new passphrase: $SPLITSTORE_PASSPHRASE, or asked twice at the terminal."""
    passphrase = os.environ.get(PASSPHRASE_ENV_VAR)
    if passphrase is not None:
        return passphrase
    if not sys.stdin.isatty():
        raise UsageError(f"set ${PASSPHRASE_ENV_VAR}, or run at a terminal to type a passphrase")
    first = getpass.getpass("new splitstore passphrase: ")
    if getpass.getpass("the same passphrase again: ") != first:
        raise UsageError("the two passphrases differ")
    return first


def export_key(path: Path) -> str:
    """The master key of ``path`` as a raw key file's text (asks for a passphrase if needed).

    The export is a complete key file: ``key import`` installs it, and a config can name
    it as its ``key_file`` directly.
    """
    master = load_master_key(path)
    return KeyFile("raw", key_id(master).hex(), key=master).to_text()


def import_key(
    dest: Path, source: Path | None, text: str | None = None, *, force: bool = False
) -> str:
    """Install an exported key (or key file) at ``dest``; return its key id.

    Importing the key that is already there changes nothing; a different key is only
    replaced with ``force``, since files it sealed could then no longer be read.
    """
    where = "standard input" if source is None else str(source)
    if source is not None:
        try:
            with source.open("rb") as f:
                raw: bytes | str = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {where}: {exc.strerror}") from exc
    else:
        raw = text or ""
    kf = parse_key_text(raw, where)
    if dest.exists():
        try:
            current: KeyFile | None = read_key_file(dest)
        except ConfigError:
            if not force:
                raise UsageError(
                    f"{dest} is damaged or not a splitstore key; use --force to replace it"
                ) from None
            current = None  # a damaged key is what a restore is for
        if current is not None and current.key_id == kf.key_id:
            return kf.key_id
        if current is not None and not force:
            raise UsageError(
                f"{dest} holds another key (key id {current.key_id}); files sealed with it "
                "could no longer be read. Export it first, then use --force to replace it"
            )
    write_key_file(dest, kf, force=True)
    return kf.key_id
