"""``splitstore tenant``: add, revoke and list the tenants of a local setup.

A tenant is one user of the servers, with a token of its own, a namespace of its own on
each server, and an optional quota. The servers know tenants only from the tenants file
their config names (``tenants_file``), which they re-read when it changes, so these
commands take effect on running servers without a restart.

``add`` writes, beside the setup's config::

    NAME.toml    a client config: the setup's servers, CA, chunk size and encryption
    NAME.token   the tenant's token (mode 0600); the tenants file gets only its hash
    NAME.key     the tenant's own master key (mode 0600), unless encryption is off

and adds the tenant to the tenants file last, so the token works only once every file a
client needs is in place.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ._config import ENCRYPTION_ON, Config
from ._errors import ConfigError, UsageError
from ._keys import create_key_file
from ._setup import _toml_string, _write_atomic
from ._storage import tenant_folder, tenant_stored_bytes
from ._tenants import (
    SINGLE_TENANT,
    put_tenant,
    read_tenants,
    revoke_tenant,
    validate_tenant_name,
)

__all__ = [
    "AddedTenant",
    "TenantUsage",
    "add_setup_tenant",
    "list_setup_tenants",
    "parse_size",
    "revoke_setup_tenant",
]

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class AddedTenant:
    name: str
    quota_bytes: int
    config: Path
    token: Path
    key: Path | None  # None: encryption is off
    key_kept: bool  # an existing key file was kept rather than replaced
    tenants_files: tuple[Path, ...]
    #: Data folders that already held data under this name (only with ``force``).
    inherited: tuple[Path, ...]


@dataclass(frozen=True)
class TenantUsage:
    name: str
    quota_bytes: int
    #: Bytes stored per server kind, where the data folder is on this machine.
    stored: dict[str, int]


def parse_size(text: str) -> int:
    """A byte count like ``500M``, ``10G``, ``1.5T`` or ``4096`` (K, M, G, T: powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"{text!r} is not a size (examples: 4096, 500M, 10G)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value >= 2**63:
        raise UsageError(f"{text!r} is too large")
    if 0 < value < 1:  # as 0 it would mean no quota at all
        raise UsageError(f"{text!r} is less than a byte")
    return int(value)


def tenants_files(config: Config) -> tuple[Path, ...]:
    """The tenants files the config's servers use (usually one, shared by both)."""
    files = tuple(dict.fromkeys(s.tenants_file for s in config.servers if s.tenants_file))
    if not files:
        raise ConfigError(
            f"the servers in {_where(config)} use a single shared token, not a tenants file: "
            "run 'splitstore init --force' in the setup folder to switch to tenants "
            "(stored data is kept), then restart the servers"
        )
    return files


def add_setup_tenant(
    config: Config, name: str, *, quota_bytes: int | None = None, force: bool = False
) -> AddedTenant:
    """Issue a token for a new tenant and write its client files beside ``config``.

    ``quota_bytes`` None: no quota for a new tenant, the one it had for an existing one
    (given a new token with ``force``); 0: no quota."""
    validate_tenant_name(name)
    _not_the_setups_own(name, "choose another name")
    if quota_bytes is not None and quota_bytes < 0:
        raise UsageError("a quota cannot be negative")
    files = tenants_files(config)
    folder = _config_folder(config)
    paths = {ext: folder / f"{name}.{ext}" for ext in ("toml", "token", "key")}
    taken = _setup_files(config)
    for path in paths.values():
        if _same(path, taken):
            raise UsageError(f"{path} belongs to the setup itself: choose another tenant name")
    tenants = [t for f in files for t in read_tenants(f)]
    existing = [t.name for t in tenants]
    if quota_bytes is None:
        quota_bytes = next((t.quota_bytes for t in tenants if t.name == name), 0)
    if name in existing and not force:
        raise UsageError(
            f"tenant {name!r} exists already (use --force to give it a new token, "
            f"or 'splitstore tenant revoke {name}')"
        )
    inherited = tuple(
        d for d in _data_dirs(config) if tenant_stored_bytes(d, name) and name not in existing
    )
    if inherited and not force:
        raise UsageError(
            f"{tenant_folder(inherited[0], name)} still holds the files of an earlier tenant "
            f"named {name!r}, which the new tenant would see: delete that folder on each "
            "server first, or use --force to hand them to the new tenant"
        )
    encrypted = config.encryption == ENCRYPTION_ON
    wanted = [paths["toml"], paths["token"]] + ([paths["key"]] if encrypted else [])
    clash = [p for p in wanted if p.exists() or p.is_symlink()]
    if clash and not force:
        raise UsageError(f"{clash[0]} exists already (use --force to replace it)")

    token = secrets.token_urlsafe(32)
    key_kept = encrypted and paths["key"].exists()
    try:
        _write_atomic(paths["token"], (token + "\n").encode("ascii"), _SECRET_MODE)
        if encrypted and not key_kept:
            # A key already there is kept: the tenant's stored files need it.
            create_key_file(paths["key"])
        text = render_tenant_config(
            config, name, paths["token"], paths["key"] if encrypted else None
        )
        _write_atomic(paths["toml"], text.encode("utf-8"), _PUBLIC_MODE)
        for f in files:  # last: the token works only once the client files exist
            put_tenant(f, name, token, quota_bytes=quota_bytes)
    except OSError as exc:
        where = exc.filename or folder
        raise UsageError(f"cannot write the tenant's files: {where}: {exc.strerror}") from exc
    return AddedTenant(
        name=name,
        quota_bytes=quota_bytes,
        config=paths["toml"],
        token=paths["token"],
        key=paths["key"] if encrypted else None,
        key_kept=key_kept,
        tenants_files=files,
        inherited=inherited,
    )


def revoke_setup_tenant(config: Config, name: str) -> tuple[Path, ...]:
    """Remove tenant ``name`` from the tenants files; return the data folders (on this
    machine) that still hold its files, which are kept."""
    validate_tenant_name(name)
    _not_the_setups_own(name, "revoking it would lock this config out")
    files = tenants_files(config)
    holding = [f for f in files if name in {t.name for t in read_tenants(f)}]
    if not holding:
        raise UsageError(f"there is no tenant {name!r} in {', '.join(map(str, files))}")
    for f in holding:
        revoke_tenant(f, name)
    return tuple(tenant_folder(d, name) for d in _data_dirs(config) if tenant_stored_bytes(d, name))


def _not_the_setups_own(name: str, why: str) -> None:
    if name == SINGLE_TENANT:
        raise UsageError(
            f"{SINGLE_TENANT!r} is the setup's own tenant, whose token is the config's "
            f"token_file: {why} (to replace that token, run 'splitstore init --force')"
        )


def list_setup_tenants(config: Config) -> list[TenantUsage]:
    """Every tenant with its quota and, where the data folders are local, its usage."""
    rows: dict[str, TenantUsage] = {}
    for f in tenants_files(config):
        for tenant in read_tenants(f):
            stored: dict[str, int] = {
                s.kind: tenant_stored_bytes(s.data_dir, tenant.name)
                for s in config.servers
                if s.data_dir is not None and s.data_dir.is_dir()
            }
            rows.setdefault(tenant.name, TenantUsage(tenant.name, tenant.quota_bytes, stored))
    return sorted(rows.values(), key=lambda r: r.name)


def render_tenant_config(config: Config, name: str, token: Path, key: Path | None) -> str:
    """A client config for one tenant: the setup's servers and settings, its own token
    and key. Paths are relative to the config's folder where they lie inside it."""
    folder = _config_folder(config)

    def path(p: Path) -> str:
        return _toml_string(_relative(p, folder))

    lines = [
        f"# splitstore client configuration for tenant {name!r}, written by",
        "# 'splitstore tenant add'. Relative paths are relative to this file's folder.",
        "format = 1",
        f"chunk_size = {config.chunk_size}",
        "",
        "# This tenant's access token: keep it private. The servers hold only its hash.",
        f"token_file = {path(token)}",
        "",
    ]
    if key is not None:
        lines += [
            "# This tenant's own master key: without it nothing it stored can be read.",
            f'encryption = "{ENCRYPTION_ON}"',
            f"key_file = {path(key)}",
            f'padding = "{config.padding}"',
        ]
    else:
        lines += [
            "# End-to-end encryption is off, as in the setup's own config.",
            'encryption = "none"',
        ]
    lines.append("")
    if config.ca_file is not None:
        lines += [f"ca_file = {path(config.ca_file)}", ""]
    lines += [
        f"connect_timeout = {config.connect_timeout}",
        f"io_timeout = {config.io_timeout}",
    ]
    for server in config.servers:
        lines += [
            "",
            "[[servers]]",
            f"kind = {_toml_string(server.kind)}",
            f"host = {_toml_string(server.host)}",
            f"port = {server.port}",
            f"tls = {'true' if server.tls else 'false'}",
        ]
    return "\n".join(lines) + "\n"


def _where(config: Config) -> str:
    return str(config.path) if config.path else "the config"


def _config_folder(config: Config) -> Path:
    if config.path is None:
        raise ConfigError("the tenant commands need a config loaded from a file")
    return config.path.resolve().parent


def _data_dirs(config: Config) -> list[Path]:
    return [s.data_dir for s in config.servers if s.data_dir is not None and s.data_dir.is_dir()]


def _setup_files(config: Config) -> list[Path]:
    """Files the setup's config refers to, which a tenant's files must never replace."""
    found = [config.token_file, config.key_file, config.ca_file, config.state_path()]
    if config.path is not None:
        found.append(config.path)
    for s in config.servers:
        found += [s.token_file, s.tenants_file, s.cert_file, s.key_file]
    return [p for p in found if p is not None]


def _same(path: Path, others: list[Path]) -> bool:
    target = os.path.realpath(path)
    return any(os.path.realpath(o) == target for o in others)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder).as_posix()
    except ValueError:
        return str(path.resolve())
