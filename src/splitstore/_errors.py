"""The exceptions splitstore raises.

Every failure is a subclass of one root, so callers can catch ``SplitStoreError``
and show its message to a person::

    SplitStoreError
    ├── UsageError                  the caller asked for something that cannot be done
    │   ├── ConfigError             config missing, unreadable or invalid
    │   │   └── WrongKeyError       the files were stored with another master key
    │   ├── InvalidNameError        a stored name that is empty, too long or has control chars
    │   └── LocalFileError          a local file is missing, a directory, unreadable, or exists
    ├── NotFoundError               no file is stored under that name
    ├── MaliciousFileError          the malicious-file checks blocked a put or a get
    ├── IntegrityError              stored data does not match its manifest (names the server)
    │   └── RollbackError           a server served an older version than this client has seen
    └── ServerError                 a server failed or refused (names the server)
        ├── ServerUnavailableError  cannot connect, timed out, or the connection dropped
        ├── AuthenticationError     the server refused the token
        ├── TLSVerificationError    the server's certificate is not trusted or does not match
        ├── ProtocolError           the server sent something that breaks the protocol
        ├── StorageFullError        the server has no room left for the data
        │   └── QuotaExceededError  the data would take the tenant over its quota there
        └── ConflictError           the server's state changed under us (e.g. a concurrent store)

Lower-layer errors (OSError, ssl.SSLError, aiohttp errors) are translated at the
boundary with ``raise ... from exc`` so the cause stays available for debugging.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BatchError",
    "ConfigError",
    "ConflictError",
    "IntegrityError",
    "InvalidNameError",
    "LocalFileError",
    "MaliciousFileError",
    "NotFoundError",
    "ProtocolError",
    "QuotaExceededError",
    "RollbackError",
    "ServerError",
    "ServerUnavailableError",
    "SplitStoreError",
    "StorageFullError",
    "TLSVerificationError",
    "UsageError",
    "WrongKeyError",
]


class SplitStoreError(Exception):
    """Root of every error splitstore raises; ``str(exc)`` is meant for a person."""

    #: Exit status the command-line tool uses for this kind of failure.
    exit_code: int = 1


class BatchError(SplitStoreError):
    """Some files of ``store_many`` or ``fetch_many`` failed; the others went through.

    ``results`` holds one entry per file, in the order given: what that file's single
    operation returns, or the SplitStoreError it raised.
    """

    def __init__(self, message: str, results: list[object]) -> None:
        super().__init__(message)
        self.results = results

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        """The first failure's: the command-line tool exits as that file's would."""
        failed = [r for r in self.results if isinstance(r, SplitStoreError)]
        return failed[0].exit_code if failed else 1


class UsageError(SplitStoreError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class WrongKeyError(ConfigError):
    """The stored files were sealed with another master key than the config's."""


class InvalidNameError(UsageError):
    pass


class LocalFileError(UsageError):
    pass


class NotFoundError(SplitStoreError):
    exit_code = 3


class MaliciousFileError(SplitStoreError):
    """The scan found what the policy blocks; ``report`` says what (a ScanReport)."""

    exit_code = 7

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report


class _ServerAttributed(SplitStoreError):
    """An error that can say which server it concerns."""

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server = server


class IntegrityError(_ServerAttributed):
    exit_code = 4


class RollbackError(IntegrityError):
    """A server served an older version of a file than this client has already seen."""


class ServerError(_ServerAttributed):
    exit_code = 5


class ServerUnavailableError(ServerError):
    pass


class AuthenticationError(ServerError):
    exit_code = 6


class TLSVerificationError(ServerError):
    exit_code = 6


class ProtocolError(ServerError):
    pass


class StorageFullError(ServerError):
    pass


class QuotaExceededError(StorageFullError):
    """The tenant's quota on that server has no room for the data (the disk may)."""


class ConflictError(ServerError):
    pass
