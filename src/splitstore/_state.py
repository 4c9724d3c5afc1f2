"""What this client has seen: the newest version of each object, to catch rollbacks.

A server that serves an older, validly sealed manifest of a file (a rollback or replay)
cannot be caught by cryptography alone: the old manifest was once genuine. So the client
remembers, per object id, the newest version it has stored, fetched or deleted, and
refuses anything older afterwards. The memory is a small SQLite database beside the
config (``Config.state_path``); a client without one remembers for its own lifetime only.

This protects within what this client has seen: another machine with the same key has
its own memory (docs/security.md).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ._errors import ConfigError

__all__ = ["Seen", "SeenVersions"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    object_id  TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    version_id TEXT NOT NULL,
    deleted    INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class Seen:
    """The newest version seen of an object; ``deleted``: this client deleted it then."""

    created_ns: int
    version_id: str
    deleted: bool = False

    def order(self) -> tuple[int, str]:
        return (self.created_ns, self.version_id)


class SeenVersions:
    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._path = path
        target = ":memory:" if path is None else str(path)
        try:
            self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot use the client state file {path}: {exc}") from exc

    def get(self, object_id: str) -> Seen | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT created_ns, version_id, deleted FROM seen WHERE object_id = ?",
                    (object_id,),
                ).fetchone()
            except sqlite3.Error as exc:  # a damaged file: as note says of it
                raise ConfigError(f"cannot read the client state file {self._path}: {exc}") from exc
        if row is None:
            return None
        return Seen(int(row[0]), str(row[1]), bool(row[2]))

    def note(self, object_id: str, seen: Seen) -> None:
        """Remember ``seen`` unless something newer is already remembered."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT(object_id) DO UPDATE SET "
                    "created_ns = excluded.created_ns, version_id = excluded.version_id, "
                    "deleted = excluded.deleted WHERE (excluded.created_ns, excluded.version_id)"
                    " > (seen.created_ns, seen.version_id) OR (excluded.created_ns = "
                    "seen.created_ns AND excluded.version_id = seen.version_id)",
                    (object_id, seen.created_ns, seen.version_id, int(seen.deleted)),
                )
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"cannot update the client state file {self._path}: {exc}"
                ) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()
