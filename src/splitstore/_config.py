"""Loading and finding the TOML configuration shared by the client and the servers.

A config names the servers in order (the HTTPS server first, then the TCP server), the
token, the CA the client trusts, and the chunk size. Paths in it are relative to the
config file's folder, so a setup folder can be moved as a whole.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._errors import ConfigError
from .scanning import Policy, ScanSettings

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CHUNK_SIZE",
    "Config",
    "ServerConfig",
    "find_config",
    "load_config",
]

CONFIG_ENV_VAR = "SPLITSTORE_CONFIG"
CONFIG_FORMAT = 1
DEFAULT_CHUNK_SIZE = 1024
# A chunk is the unit of placement; beyond 16 MiB it stops meaning "split across servers".
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# A config or token file larger than this is not one of ours.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_TOKEN_BYTES = 4096

ServerKind = Literal["https", "tcp"]
SERVER_ORDER: tuple[ServerKind, ...] = ("https", "tcp")
#: End-to-end encryption of stored files: on (the default) or off.
ENCRYPTION_ON = "aes-256-gcm"
ENCRYPTION_OFF = "none"
ENCRYPTION_MODES = (ENCRYPTION_ON, ENCRYPTION_OFF)
#: Size padding before encryption: none, or Padmé (at most ~12% larger, see docs/security.md).
PADDING_MODES = ("none", "padme")


@dataclass(frozen=True)
class ServerConfig:
    """One server: where the client finds it, and (for ``serve``) what it serves from."""

    kind: ServerKind
    host: str
    port: int
    tls: bool = True
    data_dir: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token_file: Path | None = None
    #: For ``serve``: the tenants who may use the server (when absent, ``token_file``'s
    #: token alone, as tenant "default").
    tenants_file: Path | None = None

    @property
    def label(self) -> str:
        """How messages name this server: ``https server at 127.0.0.1:7443``."""
        return f"{self.kind} server at {_host_port(self.host, self.port)}"


@dataclass(frozen=True)
class Config:
    servers: tuple[ServerConfig, ...]
    token_file: Path
    ca_file: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    connect_timeout: float = 10.0
    io_timeout: float = 60.0
    path: Path | None = field(default=None, compare=False)
    encryption: str = ENCRYPTION_ON
    #: The master key file (needed when encryption is on).
    key_file: Path | None = None
    padding: str = "none"
    #: Where the client remembers the newest version it has seen of each file, to notice a
    #: server serving an older one. Default: beside the config (``NAME.state``).
    state_file: Path | None = None
    #: Malicious-file checks run by the client (``[scan]``, docs/scanning.md).
    scan: ScanSettings = field(default_factory=ScanSettings)

    @property
    def encrypted(self) -> bool:
        return self.encryption == ENCRYPTION_ON

    def state_path(self) -> Path | None:
        if self.state_file is not None:
            return self.state_file
        if self.path is not None:
            return self.path.resolve().with_suffix(".state")
        return None

    def server(self, kind: ServerKind) -> ServerConfig:
        for server in self.servers:
            if server.kind == kind:
                return server
        raise ConfigError(f"the config has no {kind} server")

    def token(self) -> str:
        return read_token(self.token_file)


def read_token(path: Path) -> str:
    """Read a bearer token file; the token is the file's text without surrounding space."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
    if len(raw) > MAX_TOKEN_BYTES:
        raise ConfigError(f"token file {path} is larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token file {path} is not ASCII text") from exc
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"token file {path} must hold one token with no spaces")
    return token


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Find the config: ``explicit``, else $SPLITSTORE_CONFIG, else ./splitstore.toml,
    else the user's config folder. Raise ConfigError naming every place looked at."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV_VAR)
    if env:
        return Path(env).expanduser()
    candidates = [Path("splitstore.toml"), user_config_path()]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"no config found (looked at --config, ${CONFIG_ENV_VAR}, {looked}); "
        "run 'splitstore init' to create one"
    )


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "splitstore" / "config.toml"


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a config file (found with ``find_config`` when ``path`` is None)."""
    config_path = find_config(path)
    try:
        with config_path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {config_path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {config_path}: {exc.strerror}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {config_path} is too large")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {config_path} is not valid TOML: {exc}") from exc
    return parse_config(data, base=config_path.resolve().parent, path=config_path)


def parse_config(data: Mapping[str, Any], *, base: Path, path: Path | None = None) -> Config:
    where = f"config {path}" if path else "config"
    fmt = data.get("format", CONFIG_FORMAT)
    if fmt != CONFIG_FORMAT:
        raise ConfigError(f"{where}: format {fmt!r} is not supported (expected {CONFIG_FORMAT})")
    _refuse_unknown(data, _TOP_LEVEL_KEYS, where, "")
    chunk_size = _int(data, "chunk_size", DEFAULT_CHUNK_SIZE, where, 1, MAX_CHUNK_SIZE)
    token_file = _path(data, "token_file", base, where)
    if token_file is None:
        raise ConfigError(f"{where}: 'token_file' is required")
    servers_raw = data.get("servers")
    if not isinstance(servers_raw, list) or not servers_raw:
        raise ConfigError(f"{where}: needs a [[servers]] list (the https server, then the tcp one)")
    servers = tuple(
        _parse_server(s, base, f"{where}, server {i + 1}", token_file)
        for i, s in enumerate(servers_raw)
    )
    encryption = _choice(data, "encryption", ENCRYPTION_ON, ENCRYPTION_MODES, where)
    padding = _choice(data, "padding", "none", PADDING_MODES, where)
    key_file = _path(data, "key_file", base, where)
    if encryption == ENCRYPTION_ON and key_file is None:
        raise ConfigError(
            f"{where}: encryption is on but no 'key_file' is given "
            f'(name the master key file, or set encryption = "{ENCRYPTION_OFF}")'
        )
    kinds = tuple(s.kind for s in servers)
    if kinds != SERVER_ORDER:
        raise ConfigError(
            f"{where}: servers must be listed as {list(SERVER_ORDER)}, found {list(kinds)}"
        )
    return Config(
        servers=servers,
        token_file=token_file,
        ca_file=_path(data, "ca_file", base, where),
        chunk_size=chunk_size,
        connect_timeout=_float(data, "connect_timeout", 10.0, where),
        io_timeout=_float(data, "io_timeout", 60.0, where),
        path=path,
        encryption=encryption,
        key_file=key_file,
        padding=padding,
        state_file=_path(data, "state_file", base, where),
        scan=_parse_scan(data.get("scan"), base, where),
    )


def _parse_scan(raw: Any, base: Path, where: str) -> ScanSettings:
    if raw is None:
        return ScanSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [scan] must be a table")
    known = {"enabled", "hash_lists", "yara_rules", "clamd", "clamd_timeout", "policy"}
    _refuse_unknown(raw, frozenset(known), where, "[scan] ")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: scan.enabled must be true or false")
    clamd = raw.get("clamd")
    if clamd is not None and (not isinstance(clamd, str) or not clamd):
        raise ConfigError(f'{where}: scan.clamd must be "unix:/path" or "tcp:HOST:PORT"')
    if isinstance(clamd, str) and clamd.startswith("unix:"):
        # A relative socket path is relative to the config, like every other path.
        socket = Path(clamd[5:]).expanduser()
        clamd = f"unix:{socket if socket.is_absolute() else base / socket}"
    return ScanSettings(
        enabled=enabled,
        hash_lists=_paths(raw, "hash_lists", base, where),
        yara_rules=_paths(raw, "yara_rules", base, where),
        clamd=clamd,
        clamd_timeout=_float(raw, "clamd_timeout", 30.0, f"{where}, [scan]"),
        policy=Policy.parse(raw.get("policy"), where),
    )


def _paths(d: Mapping[str, Any], key: str, base: Path, where: str) -> tuple[Path, ...]:
    value = d.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: scan.{key} must be a list of paths")
    paths = (Path(v).expanduser() for v in value)
    return tuple(p if p.is_absolute() else base / p for p in paths)


def _parse_server(raw: Any, base: Path, where: str, default_token: Path) -> ServerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _refuse_unknown(raw, _SERVER_KEYS, where, "")
    kind = raw.get("kind")
    if kind not in SERVER_ORDER:
        raise ConfigError(f"{where}: 'kind' must be one of {list(SERVER_ORDER)}")
    host = raw.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where}: 'host' must be a non-empty string")
    tls = raw.get("tls", True)
    if not isinstance(tls, bool):
        raise ConfigError(f"{where}: 'tls' must be true or false")
    if kind == "https" and not tls:
        raise ConfigError(f"{where}: the https server always uses TLS")
    return ServerConfig(
        kind=kind,
        host=host,
        port=_int(raw, "port", None, where, 1, 65535),
        tls=tls,
        data_dir=_path(raw, "data_dir", base, where),
        cert_file=_path(raw, "cert_file", base, where),
        key_file=_path(raw, "key_file", base, where),
        token_file=_path(raw, "token_file", base, where) or default_token,
        tenants_file=_path(raw, "tenants_file", base, where),
    )


# Every setting a config may have: a misspelt one (say "pading") must not leave its
# default silently in force.
_TOP_LEVEL_KEYS = frozenset(
    {
        "format", "chunk_size", "token_file", "servers", "encryption", "padding", "key_file",
        "ca_file", "connect_timeout", "io_timeout", "state_file", "scan",
    }
)  # fmt: skip
_SERVER_KEYS = frozenset(
    {
        "kind", "host", "port", "tls", "data_dir", "cert_file", "key_file", "token_file",
        "tenants_file",
    }
)  # fmt: skip


def _refuse_unknown(raw: Mapping[str, Any], known: frozenset[str], where: str, table: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: {table}has no setting {unknown[0]!r}")


def _int(d: Mapping[str, Any], key: str, default: int | None, where: str, lo: int, hi: int) -> int:
    value = d.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: '{key}' is required")
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: '{key}' must be a whole number from {lo} to {hi}")
    return value


def _choice(
    d: Mapping[str, Any], key: str, default: str, allowed: tuple[str, ...], where: str
) -> str:
    value = d.get(key, default)
    if value not in allowed:
        choices = ", ".join(f'"{a}"' for a in allowed)
        raise ConfigError(f"{where}: '{key}' must be one of {choices}")
    return str(value)


def _float(d: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = d.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 86400:
        raise ConfigError(f"{where}: '{key}' must be a number of seconds above 0")
    return float(value)


def _path(d: Mapping[str, Any], key: str, base: Path, where: str) -> Path | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a path")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
