"""splitstore: store files split across an HTTPS server and a TCP server.

    from splitstore import split_store, split_fetch
    info = split_store("holiday.mp4")                     # stored under its base name
    split_fetch("holiday.mp4", "restored/holiday.mp4")   # returns the path written

For many operations, keep one ``Client`` (or ``AsyncClient``) open. Every failure is a
``SplitStoreError`` whose message is meant for a person.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._client import AsyncClient, Client, FileInfo, ProgressCallback
from ._config import Config, ServerConfig, find_config, load_config
from ._errors import (
    AuthenticationError,
    BatchError,
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidNameError,
    LocalFileError,
    MaliciousFileError,
    NotFoundError,
    ProtocolError,
    QuotaExceededError,
    RollbackError,
    ServerError,
    ServerUnavailableError,
    SplitStoreError,
    StorageFullError,
    TLSVerificationError,
    UsageError,
    WrongKeyError,
)
from ._version import __version__

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BatchError",
    "Client",
    "Config",
    "ConfigError",
    "ConflictError",
    "FileInfo",
    "IntegrityError",
    "InvalidNameError",
    "LocalFileError",
    "MaliciousFileError",
    "NotFoundError",
    "ProgressCallback",
    "ProtocolError",
    "QuotaExceededError",
    "RollbackError",
    "ServerConfig",
    "ServerError",
    "ServerUnavailableError",
    "SplitStoreError",
    "StorageFullError",
    "TLSVerificationError",
    "UsageError",
    "WrongKeyError",
    "__version__",
    "find_config",
    "load_config",
    "split_fetch",
    "split_store",
]

ConfigLike = Config | str | os.PathLike[str] | None


def split_store(
    path: str | os.PathLike[str], name: str | None = None, *, config: ConfigLike = None
) -> FileInfo:
    """Store a local file across both servers, under ``name`` (default: its base name)."""
    with Client(config) as client:
        return client.store(path, name)


def split_fetch(
    name: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    config: ConfigLike = None,
    force: bool = False,
) -> Path:
    """Fetch ``name`` back into ``dest`` (default: its base name here); return the path."""
    with Client(config) as client:
        return client.fetch(name, dest, force=force)
