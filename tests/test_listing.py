"""Listings: the client's parser of a server's NDJSON, and listings of many batches."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from splitstore import Client, _service
from splitstore._digest import stripe_digest
from splitstore._errors import ProtocolError
from splitstore._remote import MAX_LISTING_LINE, ListingParser
from splitstore._storage import ObjectRecord

from .conftest import LiveServers


def line(oid: str, vid: str = "a" * 32) -> bytes:
    rec = ObjectRecord(vid, 5, stripe_digest(b"hello"), b"sealed")
    return orjson.dumps({"object_id": oid, **rec.to_json()}) + b"\n"


def test_records_cut_anywhere_come_out_whole() -> None:
    body = b"".join(line(f"{i:x}" * 64) for i in range(10))
    for cut in (1, 7, 100, len(body)):
        parser = ListingParser("test server")
        got = []
        for start in range(0, len(body), cut):
            got += parser.feed(body[start : start + cut])
        parser.close()
        assert [oid for oid, _ in got] == [f"{i:x}" * 64 for i in range(10)]
        assert got[0][1].manifest == b"sealed"


@pytest.mark.parametrize(
    "body",
    [
        line("1" * 64)[:-1],  # cut off before its newline
        b"[1, 2]\n",  # not an object
        b"\xff\xfe{}\n",  # not UTF-8
        b'{"object_id": "x"}\n',  # not a record
        b"x" * (MAX_LISTING_LINE + 1),  # a line too long, still unfinished
        b"x" * (MAX_LISTING_LINE + 1) + b"\n",  # a line too long, in one piece
    ],
)
def test_bad_listings_are_protocol_errors(body: bytes) -> None:
    def parse() -> None:
        parser = ListingParser("test server")
        parser.feed(body)
        parser.close()

    with pytest.raises(ProtocolError, match="test server"):
        parse()


def test_listing_of_many_batches(
    servers: LiveServers, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The servers run in this process: a small batch makes a few files span many batches.
    monkeypatch.setattr(_service, "LISTING_BATCH_BYTES", 2000)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    names = sorted(f"file {i:02d}" for i in range(30))
    for name in names:
        client.store(src, name)
    client.delete(names[4])
    listed = client.list()
    assert [i.name for i in listed] == [n for n in names if n != names[4]]
    assert all(i.committed_on == ("https", "tcp") for i in listed)
