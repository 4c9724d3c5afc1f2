"""The file-type engine: what libmagic says a file is, against what its name says.

It keeps the first 64 KiB fed (all libmagic needs to tell a type) and, in ``finish``,
asks libmagic for the MIME type and a description. It reports:

* "disguised-executable": a program (ELF, PE, Mach-O...) whose name says document, image,
  media or text (``invoice.pdf`` that is a Windows program), and names built to mislead
  whatever their content: a document extension followed by a program one
  (``invoice.pdf.exe``), or a program's name with Unicode direction controls
  (``"photo\\u202egpj.exe"`` shows as ``photoexe.jpg``);
* "type-mismatch": a name with a strong, well-known type (pdf, png, jpeg, gif, zip, the
  OOXML and OpenDocument formats...) on active content, HTML or a script. Only that: a PNG
  named ``.jpg`` or a PDF named ``.zip`` is common, harmless and not reported, and a
  file's type is not checked where its extension says little (``.txt``, ``.bin``, none);
* "blocked-type": a MIME type matching one of the policy's ``blocked_types`` patterns
  (fnmatch globs, ``"video/*"``).

libmagic is loaded when the engine is built, not when splitstore is imported: without it
the engine raises ConfigError naming the package to install. libmagic handles are not
thread-safe, so each engine has one pair, used under a lock.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import hashlib
import re
import threading
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from ._engine import Finding, Head

__all__ = ["FileTypeEngine"]

_ENGINE = "filetype"
#: What libmagic is given: enough for every type it tells, small enough to be cheap.
_HEAD = 64 * 1024

_MIME_PATTERN = re.compile(r"^[a-z0-9*?][a-z0-9.+*?_-]*/[a-z0-9*?][a-z0-9.+*?_-]*$")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: MIME types of programs, as the libmagic versions in use name them.
_EXECUTABLES = frozenset(
    {
        "application/x-executable",
        "application/x-sharedlib",
        "application/x-pie-executable",
        "application/x-dosexec",
        "application/x-msdownload",
        "application/x-mach-binary",
        "application/x-mach-o-executable",
        "application/vnd.microsoft.portable-executable",
        "application/x-elf",
    }
)

#: How programs start: ELF, MZ (DOS and PE), Mach-O thin (both byte orders) and fat.
_PROGRAM_MAGIC = (
    b"\x7fELF",
    b"MZ",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
)

#: Extensions that promise a document, image, media or text file: never a program.
_NOT_PROGRAMS = _words(
    """
    pdf rtf txt text md csv tsv log json xml yaml yml ini html htm
    doc docx docm dot dotx xls xlsx xlsm ppt pptx pptm pps ppsx odt ods odp odg epub
    jpg jpeg jpe png gif bmp tif tiff webp heic heif ico svg psd raw cr2 nef
    mp3 m4a aac wav flac ogg oga opus wma mid midi
    mp4 m4v mov avi mkv webm wmv flv mpg mpeg 3gp
    """
)

#: Extensions that run as programs on some system, for the double-extension check.
_PROGRAM_EXTENSIONS = _words(
    """
    exe scr com pif bat cmd vbs vbe js jse wsf wsh hta msi msp lnk cpl ps1 jar app
    """
)

#: Strong types: extension -> MIME prefixes libmagic may report for a genuine file.
_STRONG: dict[str, tuple[str, ...]] = {
    "pdf": ("application/pdf",),
    "png": ("image/",),
    "jpg": ("image/",),
    "jpeg": ("image/",),
    "gif": ("image/",),
    "bmp": ("image/",),
    "tif": ("image/",),
    "tiff": ("image/",),
    "webp": ("image/",),
    "zip": ("application/zip", "application/x-zip", "application/vnd.", "application/java"),
    "docx": ("application/vnd.openxmlformats", "application/zip", "application/vnd.ms-"),
    "xlsx": ("application/vnd.openxmlformats", "application/zip", "application/vnd.ms-"),
    "pptx": ("application/vnd.openxmlformats", "application/zip", "application/vnd.ms-"),
    "odt": ("application/vnd.oasis", "application/zip"),
    "ods": ("application/vnd.oasis", "application/zip"),
    "odp": ("application/vnd.oasis", "application/zip"),
    "mp3": ("audio/",),
    "mp4": ("video/", "audio/"),
}

#: Active content: what a strong-type name must not hide.
_ACTIVE = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "text/javascript",
        "application/javascript",
        "application/x-javascript",
        "text/x-shellscript",
        "application/x-shellscript",
        "text/x-script.python",
        "text/x-python",
        "text/x-perl",
        "text/x-php",
        "application/x-php",
        "text/x-ruby",
        "text/x-msdos-batch",
        "application/x-bat",
        "application/hta",
        "text/x-vbscript",
    }
)

#: Unicode controls that reorder how a name is shown (the right-to-left override trick):
#: embeddings, overrides and isolates. The plain marks (U+200E/F) cannot reverse letters.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class FileTypeEngine:
    """libmagic's verdict on a file's type, checked against its name and the policy."""

    name = _ENGINE

    def __init__(self, blocked_types: Sequence[str] = ()) -> None:
        self.blocked_types = tuple(_checked_pattern(p) for p in blocked_types)
        magic = _load_magic()
        self._lock = threading.Lock()
        try:
            self._mime: Any = magic.Magic(mime=True)
            self._text: Any = magic.Magic()
        except Exception as exc:  # a missing or unreadable magic database
            raise ConfigError(f"libmagic cannot load its database: {exc}") from exc
        self._magic = magic
        self._described: dict[str, str] | None = None

    def describe(self) -> dict[str, str]:
        if self._described is None:
            self._described = {"version": _libmagic_version(self._magic)} | _database(self._magic)
        return self._described

    def session(self, name: str, size: int | None) -> _FileTypeSession:
        return _FileTypeSession(self, name)

    def mime_type(self, head: bytes) -> str:
        """The MIME type of a file that starts with ``head``."""
        with self._lock:
            return str(self._mime.from_buffer(head))

    def description(self, head: bytes) -> str:
        """libmagic's description of it, for findings (asked only when there is one)."""
        with self._lock:
            return str(self._text.from_buffer(head))

    def identify(self, head: bytes) -> tuple[str, str]:
        """(MIME type, description) of a file that starts with ``head``."""
        return self.mime_type(head), self.description(head)

    def check(self, name: str, head: bytes, mime: str) -> list[Finding]:
        """The findings for a file called ``name`` that starts with ``head``, of type
        ``mime`` by libmagic."""
        found = [
            Finding(_ENGINE, "blocked-type", pattern, f"{mime} is blocked")
            for pattern in self.blocked_types
            if fnmatch.fnmatchcase(mime, pattern)
        ]
        disguise = _disguise(name, head, mime)
        if disguise is not None:
            found.append(Finding(_ENGINE, "disguised-executable", *disguise))
        elif _mismatch(name, mime):
            detail = f"a .{_extensions(name)[-1]} file that is {mime}"
            found.append(Finding(_ENGINE, "type-mismatch", "active-content", detail))
        if not found:
            return found
        what = self.description(head)
        return [dataclasses.replace(f, detail=f"{f.detail} ({what})") for f in found]


class _FileTypeSession:
    def __init__(self, engine: FileTypeEngine, name: str) -> None:
        self._engine = engine
        self._name = name
        self._head = Head(_HEAD)

    def feed(self, block: memoryview) -> None:
        self._head.take(block)

    def finish(self, path: Path | None) -> list[Finding]:
        head = self._head.bytes()
        try:
            return self._engine.check(self._name, head, self._engine.mime_type(head))
        except Exception as exc:  # libmagic's errors on odd input: not a clean verdict
            return [Finding(_ENGINE, "not-scanned", "libmagic-error", f"libmagic failed: {exc}")]


def _extensions(name: str) -> list[str]:
    """The lower-case extensions of a file name, outermost last: a.tar.gz -> [tar, gz]."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    parts = base.split(".")
    return [p.strip().lower() for p in parts[1:]] if len(parts) > 1 and parts[0] else []


def is_program(head: bytes, mime: str) -> bool:
    """libmagic says program, and the file starts like one. libmagic also guesses DOS
    .COM programs from their first instruction, which plain text matches now and then."""
    return mime in _EXECUTABLES and head.startswith(_PROGRAM_MAGIC)


def _disguise(name: str, head: bytes, mime: str) -> tuple[str, str] | None:
    """(rule, detail) when a name hides a program."""
    exts = _extensions(name)
    program = is_program(head, mime) or (bool(exts) and exts[-1] in _PROGRAM_EXTENSIONS)
    if program and any(c in _BIDI_CONTROLS for c in name):
        shown = "".join(f"<U+{ord(c):04X}>" if unicodedata.category(c) == "Cf" else c for c in name)
        return "bidi-name", f"a program named {shown!r}, which shows reordered on screen"
    if len(exts) >= 2 and exts[-1] in _PROGRAM_EXTENSIONS and exts[-2] in _NOT_PROGRAMS:
        return "double-extension", f"a .{exts[-1]} program named to look like a .{exts[-2]} file"
    if exts and exts[-1] in _NOT_PROGRAMS and is_program(head, mime):
        return "program-as-document", f"a program ({mime}) named .{exts[-1]}"
    return None


def _mismatch(name: str, mime: str) -> bool:
    """Whether a strong-type name hides active content."""
    exts = _extensions(name)
    if not exts or exts[-1] not in _STRONG or mime not in _ACTIVE:
        return False
    return not mime.startswith(_STRONG[exts[-1]])


def _checked_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not _MIME_PATTERN.match(pattern):
        raise ConfigError(
            f"blocked_types: {pattern!r} is not a MIME type or pattern "
            "(like 'application/x-dosexec' or 'video/*')"
        )
    return pattern


def _load_magic() -> Any:
    try:
        import magic
    except ImportError as exc:
        # python-magic raises ImportError when the libmagic shared library is missing.
        raise ConfigError(
            f"libmagic is not installed (Debian: apt-get install libmagic1): {exc}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"libmagic cannot be loaded: {exc}") from exc
    return magic


def _libmagic_version(magic: Any) -> str:
    try:
        number = int(magic.version())
    except Exception:
        return "unknown"
    return f"{number // 100}.{number % 100:02d}"


def _database(magic: Any) -> dict[str, str]:
    """Which files libmagic loads its rules from, and a SHA-256 over them all."""
    try:
        getpath = magic.libmagic.magic_getpath
        getpath.restype = ctypes.c_char_p
        getpath.argtypes = [ctypes.c_char_p, ctypes.c_int]
        paths = getpath(None, 0).decode()
    except Exception:
        return {"database": "libmagic default"}
    used: list[Path] = []
    for candidate in paths.split(":"):
        # As libmagic does: the compiled form if there is one, else the text rules.
        path = next((p for p in (Path(candidate + ".mgc"), Path(candidate)) if p.is_file()), None)
        if path is not None:
            used.append(path)
    if not used:
        return {"database": paths}
    digest = hashlib.sha256()
    for path in used:
        digest.update(f"{path.stat().st_size}\0".encode())  # separates the files
        digest.update(path.read_bytes())
    return {"database": ":".join(map(str, used)), "database_sha256": digest.hexdigest()}
