"""The YARA engine: the shipped rules in ``data/rules/*.yar`` and the user's rule files.

yara-python scans a buffer, not a stream, so a file is scanned in windows at fixed file
offsets (so results never depend on how the bytes were split into blocks):

* The first window is the first 1 MiB (or the whole file, if smaller). Every rule runs
  on it. Rules whose meta says ``scope = "head"`` run only there: their conditions read
  fixed offsets such as ``uint16(0) == 0x5A4D``.
* Rules with ``scope = "anywhere"`` also run on each later window of 4 MiB, which starts
  with the last 8 KiB of the window before it, so a match that crosses a window boundary
  lies wholly in the next window. 8 KiB bounds the matches found across a boundary: it is
  far above YARA's own 1 KiB limit on a regular expression match and the longest shipped
  string (68 bytes), but a user's string or chained hex string longer than that may be
  missed where it straddles a boundary. A rule is reported once per file, at its first
  match; offsets are file offsets. Conditions see one window: ``filesize`` is its length,
  and all strings a condition needs must lie within one window.

YARA reads every byte of a window it scans (about 300 MB/s, whatever the rules), so
later windows are only scanned when some anywhere rule could match there. A rule says so
in its meta ``needs``, space-separated terms that must all hold: ``text`` (the file's
first window has no NUL byte), ``magic:HEX`` (the file starts with these bytes, 64 at
most),
``bytes:HEX`` (the window contains these bytes; repeat for several). Beyond the first
window, a rule is reported only where its needs hold; an anywhere rule without ``needs``
makes every window be scanned. The shipped script rules need ``text``: in a file that is
not text, they look at its first 1 MiB only. The shipped rules are scanned in YARA's fast
mode (one match per string is enough for them, and bounds what a hostile file full of
matches costs), so they never count matches.

User rule files (``[scan] yara_rules``) are compiled when the engine is built; one that
does not compile is a ``ConfigError`` naming the file and YARA's message. Their matches
take the category in their meta ``category`` if it is one of ``CATEGORIES``, else
``custom-rule``; their scope is ``head`` unless their meta says ``scope = "anywhere"``.
They are scanned without YARA's fast mode, so string counts (``#a``) keep their meaning.
Every rule can use the external string variables ``extension`` (the name's last
extension, lower case, without the dot; "" if none) and ``filename`` (the base name).

Each window scan has a time limit (10 s), and the whole file one of 60 s of YARA time: a
limit that runs out, or a failure in YARA, ends the file's scan with a ``not-scanned``
finding, alongside whatever was found before it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yara

from .._errors import ConfigError
from ._engine import CATEGORIES, Finding
from ._search import contains

__all__ = ["YaraEngine"]

HEAD_SIZE = 1 << 20
WINDOW_SIZE = 4 << 20
OVERLAP = 8 << 10
TIMEOUT = 10
FILE_TIMEOUT = 60

_SCOPES = ("head", "anywhere")
_EXTERNALS = {"extension": "", "filename": ""}


@dataclass(frozen=True)
class _Needs:
    """When a rule can match beyond the first window (its meta ``needs``)."""

    text: bool = False
    magic: bytes = b""
    contains: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, raw: object) -> _Needs | None:
        """None for no ``needs``; ValueError for a malformed one."""
        if raw is None:
            return None
        if not isinstance(raw, str) or not raw.split():
            raise ValueError(f"meta needs must be a non-empty string, not {raw!r}")
        text, magic, contains = False, b"", []
        for term in raw.split():
            kind, _, value = term.partition(":")
            if kind == "text" and not value:
                text = True
                continue
            try:
                data = bytes.fromhex(value)
            except ValueError:
                data = b""
            if kind not in ("magic", "bytes") or not data:
                raise ValueError(f"meta needs: {term!r} is not text, magic:HEX or bytes:HEX")
            if kind == "magic":
                magic = data
            else:
                contains.append(data)
        return cls(text, magic, tuple(contains))

    def met(self, is_text: bool, head: bytes, window: bytearray) -> bool:
        # Cheap tests first: the needle searches read the whole window.
        return (
            (is_text or not self.text)
            and head.startswith(self.magic)
            and all(contains(window, needle) for needle in self.contains)
        )


@dataclass(frozen=True)
class _RuleInfo:
    category: str
    scope: str
    description: str
    needs: _Needs | None
    source: str


class _RuleSet:
    """One compiled set: the shipped rules, or all of the user's files."""

    def __init__(self, rules: Any, info: dict[tuple[str, str], _RuleInfo], *, user: bool) -> None:
        self.rules = rules
        #: (namespace, rule) -> what its meta says.
        self.info = info
        self.user = user
        #: Fast mode for the shipped rules only: user rules may count matches.
        self.fast = not user
        #: The needs of its anywhere rules (None: that rule needs every window scanned).
        self.gates = tuple(i.needs for i in info.values() if i.scope == "anywhere")


def _shipped_rules() -> _RuleSet:
    folder = files("splitstore.scanning") / "data" / "rules"
    sources = {
        f"splitstore/{entry.name}": entry.read_text("utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yar")
    }
    rules = yara.compile(sources=sources, externals=_EXTERNALS)
    info: dict[tuple[str, str], _RuleInfo] = {}
    for namespace, source in sources.items():
        for rule in yara.compile(source=source, externals=_EXTERNALS):
            if not rule.is_private:  # private rules only serve others; never reported
                info[(namespace, rule.identifier)] = _shipped_info(rule, namespace)
    return _RuleSet(rules, info, user=False)


def _shipped_info(rule: Any, namespace: str) -> _RuleInfo:
    meta = rule.meta
    category, scope = meta.get("category"), meta.get("scope")
    # A shipped rule with bad meta is a bug in this package, not the user's mistake.
    if category not in CATEGORIES or scope not in _SCOPES or not meta.get("description"):
        raise RuntimeError(f"{namespace}: rule {rule.identifier} lacks valid meta")
    needs = _Needs.parse(meta.get("needs"))
    return _RuleInfo(category, scope, str(meta["description"]), needs, namespace)


def _user_rules(paths: Sequence[Path]) -> _RuleSet | None:
    if not paths:
        return None
    namespaces: dict[str, str] = {}
    info: dict[tuple[str, str], _RuleInfo] = {}
    for index, path in enumerate(paths):
        namespace = f"user{index}"
        namespaces[namespace] = str(path)
        # Compiled alone first, so that an error names the file it is in.
        for rule in _compile_user_file(path):
            if not rule.is_private:
                info[(namespace, rule.identifier)] = _user_info(rule, path)
    rules = yara.compile(filepaths=namespaces, externals=_EXTERNALS)
    return _RuleSet(rules, info, user=True)


def _compile_user_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"YARA rule file {path} does not exist or is not a file")
    try:
        return yara.compile(filepath=str(path), externals=_EXTERNALS)
    except yara.SyntaxError as exc:
        raise ConfigError(f"YARA rule file {path} does not compile: {exc}") from exc
    except yara.Error as exc:
        raise ConfigError(f"cannot read YARA rule file {path}: {exc}") from exc


def _user_info(rule: Any, path: Path) -> _RuleInfo:
    meta = rule.meta
    category = meta.get("category")
    try:
        needs = _Needs.parse(meta.get("needs"))
    except ValueError as exc:
        raise ConfigError(f"YARA rule file {path}, rule {rule.identifier}: {exc}") from None
    return _RuleInfo(
        category=category if category in CATEGORIES else "custom-rule",
        scope="anywhere" if meta.get("scope") == "anywhere" else "head",
        description=str(meta.get("description") or ""),
        needs=needs,
        source=str(path),
    )


def _sources_digest(paths: Sequence[Path]) -> str:
    """SHA-256 of the rule sources in use, each prefixed by its length."""
    digest = hashlib.sha256()
    folder = files("splitstore.scanning") / "data" / "rules"
    shipped = sorted((e for e in folder.iterdir() if e.name.endswith(".yar")), key=lambda e: e.name)
    for data in [e.read_bytes() for e in shipped] + [p.read_bytes() for p in paths]:
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return digest.hexdigest()


class YaraEngine:
    """The shipped YARA rules plus the user's, scanned in windows (see the module doc)."""

    name = "yara"

    def __init__(
        self,
        extra_rule_files: Sequence[Path] = (),
        *,
        head_size: int = HEAD_SIZE,
        window_size: int = WINDOW_SIZE,
        overlap: int = OVERLAP,
        timeout: int = TIMEOUT,
        file_timeout: float = FILE_TIMEOUT,
    ) -> None:
        # The window sizes are only changed by tests, to cross boundaries cheaply.
        if not 0 < overlap <= head_size or overlap >= window_size:
            raise ValueError("need 0 < overlap <= head_size and overlap < window_size")
        paths = [Path(p) for p in extra_rule_files]
        self._sets = [_shipped_rules()]
        user = _user_rules(paths)
        if user is not None:
            self._sets.append(user)
        self._digest = _sources_digest(paths)
        self.head_size, self.window_size, self.overlap = head_size, window_size, overlap
        self.timeout, self.file_timeout = timeout, file_timeout

    @property
    def rule_sets(self) -> list[_RuleSet]:
        return self._sets

    def describe(self) -> dict[str, str]:
        return {"version": yara.__version__, "rules": self._digest}

    def session(self, name: str, size: int | None) -> _YaraSession:
        return _YaraSession(self, name)


def _externals(name: str) -> dict[str, str]:
    # Any name must reach YARA as a clean C string: no NUL, no lone surrogates.
    base = name.replace("\\", "/").rsplit("/", 1)[-1].replace("\0", "")
    base = base.encode("utf-8", "replace").decode("utf-8")
    # Windows ignores trailing dots and spaces: "report.pdf. " opens as a PDF.
    stem = base.rstrip(" .")
    dot = stem.rfind(".")
    extension = stem[dot + 1 :].lower() if dot > 0 else ""
    return {"extension": extension, "filename": base}


class _YaraSession:
    def __init__(self, engine: YaraEngine, name: str) -> None:
        self._engine = engine
        self._externals = _externals(name)
        self._buf = bytearray()
        self._start = 0  # file offset of _buf[0]
        self._end = engine.head_size  # file offset where the current window ends
        self._scanned = 0  # file offset up to which windows have been scanned
        self._first = True
        self._head = b""
        self._is_text = False
        self._found: list[Finding] = []
        self._reported: set[tuple[str, str]] = set()
        self._stopped = False
        self._spent = 0.0  # seconds YARA has spent on this file

    def feed(self, block: memoryview) -> None:
        view = block if block.format == "B" and block.ndim == 1 else block.cast("B")
        while view and not self._stopped:
            take = view[: self._end - self._start - len(self._buf)]
            self._buf += take
            view = view[len(take) :]
            if self._start + len(self._buf) == self._end:
                self._scan_window()
                self._next_window()

    def _next_window(self) -> None:
        keep = self._engine.overlap
        del self._buf[:-keep]
        self._start = self._end - len(self._buf)
        self._end += self._engine.window_size

    def finish(self, path: Path | None) -> list[Finding]:
        if not self._stopped and (self._first or self._start + len(self._buf) > self._scanned):
            self._scan_window()
        self._buf = bytearray()
        return self._found

    def _scan_window(self) -> None:
        window = self._buf
        if self._first:
            self._head = bytes(window[:64])
            self._is_text = b"\0" not in window
        for rule_set in self._engine.rule_sets:
            if self._first or self._may_match(rule_set):
                self._match(rule_set, window)
                if self._stopped:
                    break
        self._first = False
        self._scanned = self._start + len(window)

    def _may_match(self, rule_set: _RuleSet) -> bool:
        return any(
            needs is None or needs.met(self._is_text, self._head, self._buf)
            for needs in rule_set.gates
        )

    def _match(self, rule_set: _RuleSet, window: bytearray) -> None:
        started = time.monotonic()
        try:
            matches = rule_set.rules.match(
                data=window,
                externals=self._externals,
                timeout=self._engine.timeout,
                fast=rule_set.fast,
            )
        except yara.TimeoutError:
            self._stop("timeout", f"YARA took over {self._engine.timeout} s on one window")
            return
        except yara.Error as exc:
            self._stop("yara-error", f"YARA failed: {exc}")
            return
        for match in matches:
            self._take(match, rule_set)
        self._spent += time.monotonic() - started
        if self._spent > self._engine.file_timeout:
            # Each window was quick enough, but a hostile file can make all of them slow.
            self._stop("timeout", f"YARA took over {self._engine.file_timeout:g} s on the file")

    def _take(self, match: Any, rule_set: _RuleSet) -> None:
        key = (match.namespace, match.rule)
        info = rule_set.info.get(key)
        if info is None or key in self._reported:
            return
        if not self._first and (
            info.scope == "head"
            or (info.needs is not None and not info.needs.met(self._is_text, self._head, self._buf))
        ):
            return
        self._reported.add(key)
        offsets = [i.offset for s in match.strings for i in s.instances]
        offset = self._start + (min(offsets) if offsets else 0)
        detail = info.description or f"YARA rule {match.rule} matched"
        if rule_set.user:
            detail = f"{detail} (rule {match.rule} in {info.source})"
        self._found.append(Finding("yara", info.category, match.rule, detail, offset))

    def _stop(self, rule: str, detail: str) -> None:
        where = f" at offset {self._start}" if self._start else ""
        self._found.append(Finding("yara", "not-scanned", rule, detail + where))
        self._stopped = True
        self._buf = bytearray()
