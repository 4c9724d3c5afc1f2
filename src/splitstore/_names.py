"""Stored names, and the opaque ids the servers see instead of them.

A name is a key chosen by the user ("photos/2024/beach.jpg" is fine): it never becomes a
path on a server. Servers store objects under an id derived from the name, and accept
only ids of the exact shape below, so no request can reach outside their data folder.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from ._errors import InvalidNameError

__all__ = [
    "MAX_NAME_BYTES",
    "is_object_id",
    "is_version_id",
    "new_version_id",
    "object_id_for",
    "validate_name",
]

# Long enough for deep folder paths; short enough that a manifest stays small.
MAX_NAME_BYTES = 4096

_OBJECT_ID = re.compile(r"[0-9a-f]{64}")
_VERSION_ID = re.compile(r"[0-9a-f]{32}")
# Unicode category Cc exactly (C0, DEL, C1), as a regex: a per-character
# unicodedata.category() call was most of the cost of listing many names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Versioned so that a later format (e.g. a keyed id) can never collide with this one.
_OBJECT_ID_DOMAIN = b"splitstore/object-id/v1\x00"


def validate_name(name: str) -> str:
    """Return ``name`` if it can be stored, else raise InvalidNameError saying why."""
    if not isinstance(name, str):
        raise InvalidNameError("a stored name must be text")
    if not name:
        raise InvalidNameError("a stored name cannot be empty")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidNameError("a stored name must be valid Unicode text") from exc
    if size > MAX_NAME_BYTES:
        raise InvalidNameError(
            f"a stored name can be at most {MAX_NAME_BYTES} bytes of UTF-8 (this one is {size})"
        )
    if _CONTROL.search(name):
        raise InvalidNameError("a stored name cannot contain control characters")
    return name


def object_id_for(name: str) -> str:
    """The id a server stores ``name`` under: 64 hex digits that say nothing of the path."""
    return hashlib.sha256(_OBJECT_ID_DOMAIN + validate_name(name).encode("utf-8")).hexdigest()


def new_version_id() -> str:
    """A fresh random id for one stored version; stripes of different versions never mix."""
    return secrets.token_hex(16)


def is_object_id(value: object) -> bool:
    return isinstance(value, str) and _OBJECT_ID.fullmatch(value) is not None


def is_version_id(value: object) -> bool:
    return isinstance(value, str) and _VERSION_ID.fullmatch(value) is not None
