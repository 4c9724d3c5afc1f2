"""Batch operations: many small stripes or records in one request.

Specified in docs/protocol.md, section 10, "Batches".

A store of a 4 KiB file is four requests (a stripe and a record to each server), and
on two cores the requests, not the bytes, are what costs. So a client storing or
fetching many small files at once sends their stripes, records and record lookups in
batches: each item means exactly what the single operation means, only the transport
is shared. This module holds what both servers and both client adapters agree on: the
limits, the validation of a batch's items, and the blocking work a batch does to a
store (run in a worker thread by ``StorageService``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from ._names import is_object_id, is_version_id
from ._storage import ObjectRecord, StorageError, StripeStore

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_BATCH_RECORD_BYTES",
    "MAX_INDEX_BYTES",
    "StripeItem",
    "commit_each",
    "error_item",
    "parse_object_ids",
    "parse_record_lines",
    "parse_stripe_items",
    "read_stripes",
    "record_lines",
    "write_stripes",
]

#: Items in one batch request.
MAX_BATCH_ITEMS = 64
#: Stripe bytes in one batch, up or down: what one connection may make a server hold in
#: memory (the same bound as one streamed upload's write buffer).
MAX_BATCH_BYTES = 1024 * 1024
#: NDJSON bytes of one batch of records.
MAX_BATCH_RECORD_BYTES = 1024 * 1024
#: The JSON index line before an HTTPS batch's stripe bytes.
MAX_INDEX_BYTES = 65536


@dataclass(frozen=True, slots=True)
class StripeItem:
    """One stripe of a batch; ``length`` is None where it is asked for, not sent."""

    object_id: str
    version_id: str
    length: int | None = None


def parse_stripe_items(doc: object, *, with_lengths: bool) -> list[StripeItem]:
    """The ``stripes`` list of a batch request, validated; raises StorageError."""
    if not isinstance(doc, list) or not 1 <= len(doc) <= MAX_BATCH_ITEMS:
        raise StorageError(
            "bad_request", f"'stripes' must be a list of 1 to {MAX_BATCH_ITEMS} stripes"
        )
    items = []
    total = 0
    for entry in doc:
        if not isinstance(entry, dict):
            raise StorageError("bad_request", "each stripe must be a JSON object")
        oid, vid = entry.get("object_id"), entry.get("version_id")
        if not is_object_id(oid):
            raise StorageError("bad_request", "object id must be 64 lowercase hex digits")
        if not is_version_id(vid):
            raise StorageError("bad_request", "version id must be 32 lowercase hex digits")
        length = None
        if with_lengths:
            length = entry.get("length")
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise StorageError("bad_request", "length must be a whole number of bytes")
            total += length
            if total > MAX_BATCH_BYTES:
                raise StorageError(
                    "too_large", f"a batch carries at most {MAX_BATCH_BYTES} bytes of stripes"
                )
        items.append(StripeItem(cast(str, oid), cast(str, vid), length))
    return items


def parse_object_ids(doc: object) -> list[str]:
    if not isinstance(doc, list) or not 1 <= len(doc) <= MAX_BATCH_ITEMS:
        raise StorageError(
            "bad_request", f"'object_ids' must be a list of 1 to {MAX_BATCH_ITEMS} ids"
        )
    for oid in doc:
        if not is_object_id(oid):
            raise StorageError("bad_request", "object id must be 64 lowercase hex digits")
    return list(doc)


def parse_record_lines(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A commit batch's NDJSON body: (object_id, record fields) per line, in order."""
    if len(raw) > MAX_BATCH_RECORD_BYTES:
        raise StorageError(
            "too_large", f"a batch of records is at most {MAX_BATCH_RECORD_BYTES} bytes"
        )
    lines = raw.split(b"\n", MAX_BATCH_ITEMS + 1)  # no more cut than can be used
    if lines[-1] != b"":
        raise StorageError("bad_request", "each record must end with a newline")
    lines.pop()
    if not 1 <= len(lines) <= MAX_BATCH_ITEMS:
        raise StorageError("bad_request", f"a batch holds 1 to {MAX_BATCH_ITEMS} records")
    out = []
    for line in lines:
        try:
            doc = orjson.loads(line)
        except ValueError as exc:
            raise StorageError("bad_request", "a record line is not valid JSON") from exc
        if not isinstance(doc, dict) or not is_object_id(doc.get("object_id")):
            raise StorageError("bad_request", "each record needs a valid object_id")
        out.append((doc["object_id"], doc))
    return out


def error_item(exc: StorageError) -> dict[str, Any]:
    """How one failed item of a batch is answered."""
    return {"error": {"code": exc.code, "message": exc.message[:500]}}


def write_stripes(store: StripeStore, items: Sequence[StripeItem], body: bytes) -> list[str]:
    """Store each stripe of ``body`` (the items' bytes back to back); their digests."""
    if sum(item.length or 0 for item in items) != len(body):
        raise StorageError("bad_request", "the body's length differs from the stripes' lengths")
    view = memoryview(body)
    stripes = []
    done = 0
    for item in items:
        length = item.length or 0
        stripes.append((item.object_id, item.version_id, view[done : done + length]))
        done += length
    return store.put_stripes(stripes)


def read_stripes(
    store: StripeStore, items: Sequence[StripeItem]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Each stripe's answer (its length, or an error) and the bytes of those found.

    Stripes past MAX_BATCH_BYTES in all are answered ``too_large``: the client asks for
    them one at a time.
    """
    answers: list[dict[str, Any]] = []
    found: list[bytes] = []
    total = 0
    for item in items:
        try:
            f, length = store.open_stripe(item.object_id, item.version_id)
        except StorageError as exc:
            answers.append(error_item(exc))
            continue
        with f:
            if total + length > MAX_BATCH_BYTES:
                answers.append(
                    error_item(StorageError("too_large", "too large for a batch; ask for it alone"))
                )
                continue
            data = f.read(length)
        if len(data) != length:  # cut short under us: say so rather than send less
            answers.append(error_item(StorageError("internal", "the stripe could not be read")))
            continue
        total += length
        answers.append({"length": length})
        found.append(data)
    return answers, found


def commit_each(
    store: StripeStore, records: Sequence[tuple[str, ObjectRecord | StorageError]]
) -> list[dict[str, Any]]:
    """Commit each record as one commit would; each item's answer, in order."""
    valid = [(i, oid, r) for i, (oid, r) in enumerate(records) if isinstance(r, ObjectRecord)]
    outcomes = store.commit_many([(oid, r) for _, oid, r in valid])
    errors: list[StorageError | None] = [
        r if isinstance(r, StorageError) else None for _, r in records
    ]
    for (i, _, _), outcome in zip(valid, outcomes, strict=True):
        errors[i] = outcome
    return [{"status": "ok"} if e is None else error_item(e) for e in errors]


def record_lines(store: StripeStore, object_ids: Sequence[str]) -> bytes:
    """One NDJSON line per id, in order: its current record, or why there is none."""
    lines = []
    for object_id in object_ids:
        try:
            doc = {"object_id": object_id, **store.get_record(object_id).to_json()}
        except StorageError as exc:
            doc = {"object_id": object_id, **error_item(exc)}
        lines.append(orjson.dumps(doc))
    return b"".join(line + b"\n" for line in lines)
