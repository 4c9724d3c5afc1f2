"""Who may use a server: tenants, each with a token (stored only as a hash) and a quota.

The tenants file is TOML, shared by both servers of a local setup::

    [tenants.alice]
    token_sha256 = "9f86d0..."     # SHA-256 of the tenant's bearer token, hex
    quota_bytes = 10737418240      # optional; 0 or absent means no limit

Servers re-read it whenever it changes on disk, so ``splitstore tenant add`` and
``tenant revoke`` take effect on running servers without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ._config import read_token
from ._errors import ConfigError, UsageError

__all__ = [
    "Tenant",
    "TenantRegistry",
    "add_tenant",
    "is_tenant_name",
    "put_tenant",
    "read_tenants",
    "revoke_tenant",
    "token_digest",
    "validate_tenant_name",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_TENANTS_FILE_BYTES = 4 * 1024 * 1024
SINGLE_TENANT = "default"


@dataclass(frozen=True)
class Tenant:
    name: str
    quota_bytes: int = 0  # 0: no limit


def token_digest(token: str) -> bytes:
    """SHA-256 of the token's UTF-8; UnicodeEncodeError for one that is not Unicode."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def is_tenant_name(value: object) -> bool:
    """A tenant name is also a folder name on the servers, so it is kept this plain."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def validate_tenant_name(name: str) -> str:
    if not is_tenant_name(name):
        raise UsageError(
            "a tenant name is 1 to 63 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    return name


class TenantRegistry:
    """Maps tokens to tenants. Built from a tenants file (re-read on change) or one token."""

    def __init__(self, *, tenants_file: Path | None = None, token_file: Path | None = None) -> None:
        if (tenants_file is None) == (token_file is None):
            raise ConfigError("a server needs either a tenants file or a token file")
        self._file = tenants_file
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_digest: dict[bytes, Tenant] = {}
        if token_file is not None:
            self._by_digest = {token_digest(read_token(token_file)): Tenant(SINGLE_TENANT)}
        else:
            self._reload()

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant a bearer token belongs to, or None. Compares digests in constant time."""
        if not token:
            return None
        try:
            offered = token_digest(token)
        except UnicodeEncodeError:  # a lone surrogate: no token (not the same with "?")
            return None
        self._reload()
        found = None
        for digest, tenant in self._by_digest.items():
            if hmac.compare_digest(offered, digest):
                found = tenant
        return found

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError(f"cannot read the tenants file {self._file}") from exc
            return  # keep serving with what we had; the file may be mid-replace
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                tenants = _parse(self._file)
            except ConfigError:
                if self._stamp is None:
                    raise
                return  # a broken edit must not lock everyone out
            self._by_digest = tenants
            self._stamp = stamp


def _parse(path: Path) -> dict[bytes, Tenant]:
    try:
        raw = path.read_bytes()[: MAX_TENANTS_FILE_BYTES + 1]
        doc = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"the tenants file {path} cannot be read: {exc}") from exc
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ConfigError(f"the tenants file {path} needs [tenants.NAME] tables")
    out: dict[bytes, Tenant] = {}
    for name, entry in tenants.items():
        where = f"tenant {name!r} in {path}"
        try:
            validate_tenant_name(name)
            digest = bytes.fromhex(entry["token_sha256"])
            quota = int(entry.get("quota_bytes", 0))
        except (UsageError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{where} is malformed: {exc}") from exc
        if len(digest) != 32 or quota < 0:
            raise ConfigError(f"{where} is malformed")
        out[digest] = Tenant(name, quota)
    return out


def _render(entries: dict[str, dict[str, object]]) -> str:
    lines = [
        "# splitstore tenants: who may use these servers. Tokens are kept only as SHA-256",
        "# hashes. Servers re-read this file when it changes; edit with 'splitstore tenant'.",
        "",
    ]
    for name, entry in sorted(entries.items()):
        lines.append(f"[tenants.{name}]")
        lines.append(f'token_sha256 = "{entry["token_sha256"]}"')
        lines.append(f"quota_bytes = {int(str(entry.get('quota_bytes', 0)))}")
        lines.append("")
    return "\n".join(lines)


def _load_entries(path: Path) -> dict[str, dict[str, object]]:
    if not path.exists():
        return {}
    _parse(path)  # validates
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    return {k: dict(v) for k, v in doc.get("tenants", {}).items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_tenants(path: Path) -> list[Tenant]:
    """The tenants of a tenants file, by name (none if the file does not exist)."""
    if not path.exists():
        return []
    return sorted(_parse(path).values(), key=lambda t: t.name)


def add_tenant(path: Path, name: str, token: str, *, quota_bytes: int = 0) -> None:
    """Add a tenant to a tenants file (created if missing)."""
    validate_tenant_name(name)
    entries = _load_entries(path)
    if name in entries:
        raise UsageError(f"tenant {name!r} already exists in {path}")
    entries[name] = {"token_sha256": token_digest(token).hex(), "quota_bytes": quota_bytes}
    _write_atomic(path, _render(entries))


def put_tenant(path: Path, name: str, token: str, *, quota_bytes: int | None = None) -> None:
    """Add a tenant or give an existing one a new token, keeping every other tenant (and,
    unless ``quota_bytes`` is given, the tenant's quota)."""
    validate_tenant_name(name)
    entries = _load_entries(path)
    old = entries.get(name, {})
    quota = old.get("quota_bytes", 0) if quota_bytes is None else quota_bytes
    entries[name] = {"token_sha256": token_digest(token).hex(), "quota_bytes": quota}
    _write_atomic(path, _render(entries))


def revoke_tenant(path: Path, name: str) -> None:
    """Remove a tenant; servers refuse its token from their next request on."""
    entries = _load_entries(path)
    if name not in entries:
        raise UsageError(f"there is no tenant {name!r} in {path}")
    del entries[name]
    _write_atomic(path, _render(entries))
