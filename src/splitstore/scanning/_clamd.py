"""ClamAV, through a clamd the user runs: each file is streamed to it with INSTREAM.

A session connects on its first block, sends ``zINSTREAM\\0`` and then the blocks as
length-prefixed chunks; ``finish`` sends the zero-length chunk and reads clamd's verdict.
Anything short of a clear verdict (clamd down, slow, closing early, a file over its
StreamMaxLength, a reply we cannot read) becomes a ``not-scanned`` finding: a file clamd
did not see to the end is never reported clean. Every blocking call has a socket timeout
taken from one budget per session, so a session spends at most ``timeout`` seconds in
this engine whatever clamd does.

``shipped_database_dir()`` is a folder of our own signatures in ClamAV's formats (EICAR
and a few script droppers), to point clamd's DatabaseDirectory at (or copy beside
freshclam's databases). Set ``AlertExceedsMax yes`` in clamd.conf: without it clamd
answers OK for a file it skipped for exceeding MaxFileSize or MaxScanSize.
"""

from __future__ import annotations

import math
import re
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from .._errors import ConfigError
from ._engine import Finding

__all__ = ["ClamdEngine", "ClamdSession", "shipped_database_dir"]

NAME = "clamav"
#: clamd reads INSTREAM chunks into memory; keep each one small.
CHUNK = 1 << 20
#: Small blocks are gathered up to this size, so 1-byte feeds do not cost a send each.
GATHER = 64 << 10
#: clamd's replies are short lines; anything longer is not clamd.
MAX_LINE = 1024
MAX_REPLY = 16 << 10
DESCRIBE_TIMEOUT = 3.0
#: After a failed send, how long to wait for the error clamd may have written first.
ERROR_REPLY_WAIT = 2.0
#: Names clamd gives (with AlertExceedsMax) to a file it stopped scanning at a limit.
LIMIT_PREFIX = "Heuristics.Limits.Exceeded."
#: A verdict line; a signature name is printable ASCII without spaces.
_FOUND = re.compile(rb"stream: ([\x21-\x7e]{1,256}) FOUND")


def shipped_database_dir() -> Path:
    """The folder of splitstore's own ClamAV signature files (.hsb, .ndb, .ldb)."""
    folder = Path(str(resources.files("splitstore.scanning") / "data" / "clamav"))
    if not folder.is_dir():
        raise ConfigError(f"splitstore's ClamAV signatures are missing: {folder}")
    return folder


@dataclass(frozen=True)
class _Address:
    text: str
    family: int
    target: str | tuple[str, int]


def _parse_address(address: str) -> _Address:
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        if not hasattr(socket, "AF_UNIX"):
            raise ConfigError(f"clamd address {address!r}: no unix sockets on this system")
        if len(rest.encode()) > 107:
            raise ConfigError(f"clamd address {address!r}: socket path is over 107 bytes")
        return _Address(address, socket.AF_UNIX, rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return _Address(address, socket.AF_INET, (host, int(port)))
    raise ConfigError(
        f"clamd address {address!r}: expected 'unix:/path/to/clamd.sock' or 'tcp:HOST:PORT'"
    )


class _Unscanned(Exception):
    """The scan cannot complete; the message says why (it becomes the finding's detail)."""


class _Budget:
    """The seconds a session may still spend blocked on clamd, shared by all its calls."""

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self._left = seconds

    @contextmanager
    def timing(self, cap: float = math.inf) -> Iterator[float]:
        """Yield the timeout for one blocking call, and charge the time it took."""
        if self._left <= 0:
            raise _Unscanned(f"clamd took longer than the {self.total:g} s allowed")
        start = time.monotonic()
        try:
            yield min(self._left, cap)
        finally:
            self._left -= time.monotonic() - start


def _connect(address: _Address, budget: _Budget) -> socket.socket:
    with budget.timing() as timeout:
        try:
            if address.family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(address.target)
                except BaseException:
                    sock.close()
                    raise
                return sock
            assert isinstance(address.target, tuple)
            return socket.create_connection(address.target, timeout=timeout)
        except TimeoutError:
            raise _Unscanned(f"clamd did not accept a connection within {timeout:g} s") from None
        except OSError as exc:
            raise _Unscanned(f"cannot connect to clamd: {exc.strerror or exc}") from None


def _read_lines(sock: socket.socket, budget: _Budget, cap: float = math.inf) -> list[bytes]:
    """clamd's reply lines (NUL- or newline-terminated), read until it closes."""
    data = bytearray()
    while True:
        try:
            with budget.timing(cap) as timeout:
                sock.settimeout(timeout)
                got = sock.recv(4096)
        except TimeoutError:
            if not _complete_lines(data):
                raise _Unscanned("clamd did not reply in time") from None
            break  # a whole reply is in, only the close is missing
        except OSError:
            break  # a reset after the reply (clamd closed with our data unread)
        if not got:
            break
        data += got
        if len(data) > MAX_REPLY:
            raise _Unscanned(f"clamd's reply is over {MAX_REPLY} bytes")
        if _complete_lines(data) and _is_final(data):
            break  # nothing can follow OK or ERROR; FOUND may be followed by more
    lines = [line for line in re.split(rb"[\0\n]", bytes(data)) if line.strip()]
    if any(len(line) > MAX_LINE for line in lines):
        raise _Unscanned(f"clamd's reply has a line over {MAX_LINE} bytes")
    return lines


def _complete_lines(data: bytearray) -> bool:
    return bool(data.rstrip(b"\0\n")) and data[-1] in b"\0\n"


def _is_final(data: bytearray) -> bool:
    last = data.rstrip(b"\0\n").rsplit(b"\0", 1)[-1].rsplit(b"\n", 1)[-1].strip()
    return last == b"stream: OK" or last.endswith(b" ERROR")


def _show(raw: bytes) -> str:
    """A reply line as safe text for a message (it may be anything)."""
    text = raw[:120].decode("ascii", "backslashreplace")
    return "".join(c if c.isprintable() else "?" for c in text)


def _verdict(lines: list[bytes]) -> list[Finding]:
    """Findings for clamd's reply lines; anything but a clear verdict is not-scanned."""
    if not lines:
        raise _Unscanned("clamd closed the connection without a verdict")
    findings: list[Finding] = []
    clean = False
    for raw in lines:
        line = raw.strip()
        found = _FOUND.fullmatch(line)
        rule = found[1].decode() if found else ""
        if line == b"stream: OK":
            clean = True
        elif rule.startswith(LIMIT_PREFIX):
            limit = rule.removeprefix(LIMIT_PREFIX)
            findings.append(_not_scanned(f"clamd stopped at its {limit} limit ({rule})"))
        elif rule:
            findings.append(Finding(NAME, "malware", rule, f"ClamAV: {rule}"))
        elif line.endswith(b" ERROR"):
            findings.append(_not_scanned(f"clamd: {_explain(_show(line))}"))
        else:
            raise _Unscanned(f"clamd sent an unexpected reply: {_show(line)!r}")
    if not findings and not clean:
        raise _Unscanned("clamd sent no verdict")
    return findings


def _explain(error_line: str) -> str:
    if "size limit exceeded" in error_line:
        return f"the file is larger than clamd's StreamMaxLength ({error_line})"
    return error_line


def _not_scanned(detail: str) -> Finding:
    return Finding(NAME, "not-scanned", "clamd", detail)


class ClamdEngine:
    """ClamAV's verdict on each file, from the clamd at ``address``.

    ``address`` is ``"unix:/path/to/clamd.sock"`` or ``"tcp:HOST:PORT"``; ``timeout`` is
    the most one file's scan may wait on clamd, all calls together (connect, sends, reply).
    """

    name = NAME

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self._address = _parse_address(address)
        if not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"clamd timeout must be a positive number of seconds: {timeout}")
        self.address = address
        self.timeout = float(timeout)

    def describe(self) -> dict[str, str]:
        budget = _Budget(min(self.timeout, DESCRIBE_TIMEOUT))
        try:
            with _connect(self._address, budget) as sock:
                with budget.timing() as timeout:
                    sock.settimeout(timeout)
                    sock.sendall(b"zVERSION\0")
                lines = _read_lines(sock, budget)
        except (_Unscanned, OSError):
            return {"version": "unreachable"}
        version = _show(lines[0]).strip() if len(lines) == 1 else ""
        return {"version": version if version.startswith("ClamAV ") else "unreachable"}

    def session(self, name: str, size: int | None) -> ClamdSession:
        return ClamdSession(self._address, _Budget(self.timeout))


class ClamdSession:
    """One file streamed to clamd. Fed blocks are sent (or copied into a small gather
    buffer) before ``feed`` returns; none is kept."""

    def __init__(self, address: _Address, budget: _Budget) -> None:
        self._address = address
        self._budget = budget
        self._sock: socket.socket | None = None
        self._gathered = bytearray()
        #: Why the scan cannot complete; once set, nothing more is sent.
        self._failure: str | None = None
        self._done = False

    def feed(self, block: memoryview) -> None:
        if self._failure is not None or self._done:
            return
        if block.ndim != 1 or block.itemsize != 1:
            block = block.cast("B")
        try:
            if len(self._gathered) + block.nbytes < GATHER:
                self._gathered += block
                return
            self._flush()
            self._send(block)
        except _Unscanned as exc:
            self._fail(str(exc))

    def finish(self, path: Path | None) -> list[Finding]:
        if self._done:
            return []
        self._done = True
        try:
            if self._failure is None:
                self._flush()
                sock = self._connection()
                self._send_raw(sock, (0).to_bytes(4, "big"))
                return [self._located(f) for f in _verdict(_read_lines(sock, self._budget))]
        except _Unscanned as exc:
            self._failure = str(exc)
        finally:
            self._close()
        return [_not_scanned(f"{self._address.text}: {self._failure}")]

    def _located(self, finding: Finding) -> Finding:
        """Say which clamd could not scan the file (the user may run several)."""
        if finding.category != "not-scanned":
            return finding
        return replace(finding, detail=f"{self._address.text}: {finding.detail}")

    def _connection(self) -> socket.socket:
        if self._sock is None:
            self._sock = _connect(self._address, self._budget)
            self._send_raw(self._sock, b"zINSTREAM\0")
        return self._sock

    def _flush(self) -> None:
        if self._gathered:
            self._send(memoryview(self._gathered))
            self._gathered = bytearray()

    def _send(self, data: memoryview) -> None:
        sock = self._connection()
        self._check_early_reply(sock)
        for start in range(0, data.nbytes, CHUNK):
            chunk = data[start : start + CHUNK]
            self._send_raw(sock, chunk.nbytes.to_bytes(4, "big"))
            self._send_raw(sock, chunk)

    def _send_raw(self, sock: socket.socket, data: bytes | memoryview) -> None:
        try:
            with self._budget.timing() as timeout:
                sock.settimeout(timeout)
                sock.sendall(data)
        except TimeoutError:
            raise _Unscanned("clamd stopped taking data (timed out)") from None
        except OSError:
            # clamd closes early on an error (StreamMaxLength): its reply says which.
            raise _Unscanned(self._early_reply(sock)) from None

    def _check_early_reply(self, sock: socket.socket) -> None:
        """clamd only speaks before the end of the stream to refuse it: stop sending then."""
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            raise _Unscanned(self._early_reply(sock))

    def _early_reply(self, sock: socket.socket) -> str:
        try:
            lines = _read_lines(sock, self._budget, cap=ERROR_REPLY_WAIT)
            if not lines:
                return "clamd closed the connection before the end of the file"
            findings = _verdict(lines)
        except _Unscanned as exc:
            return str(exc)
        refusals = [f.detail for f in findings if f.category == "not-scanned"]
        return refusals[0] if refusals else "clamd answered before the end of the file"

    def _fail(self, detail: str) -> None:
        self._failure = detail
        self._gathered = bytearray()
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
