"""Batches: many small files through one session, and the batch operations of both servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitstore import (
    BatchError,
    Client,
    ConflictError,
    FileInfo,
    InvalidNameError,
    LocalFileError,
    NotFoundError,
    ProtocolError,
    QuotaExceededError,
    ServerError,
    ServerUnavailableError,
    SplitStoreError,
    UsageError,
)
from splitstore._batch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    parse_object_ids,
    parse_record_lines,
    parse_stripe_items,
)
from splitstore._coalesce import BATCHED_STRIPE_BYTES, CoalescingRemote, _Batcher
from splitstore._config import load_config
from splitstore._digest import stripe_digest
from splitstore._http_client import HttpsRemote
from splitstore._remote import (
    Remote,
    read_commit_results,
    read_put_stripes_reply,
    read_record_lines,
    split_stripes,
    upload_digest,
)
from splitstore._storage import ObjectRecord, StorageError
from splitstore._tcp_client import TcpRemote
from splitstore._tenant_admin import add_setup_tenant

from .conftest import TEST_LIMITS, LiveServers, LoopThread


def small_files(folder: Path, n: int, size: int = 4096) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"f{i:04d}.bin"
        path.write_bytes(os.urandom(size + i % 7))
        paths.append(path)
    return paths


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """How many items each batch request carried, per operation (the adapters are ours)."""
    sizes: dict[str, list[int]] = {}

    def count(cls: Any, op: str) -> None:
        original = getattr(cls, op)

        async def wrapper(self: Any, items: Any) -> Any:
            sizes.setdefault(f"{cls.kind}.{op}", []).append(len(items))
            return await original(self, items)

        monkeypatch.setattr(cls, op, wrapper)

    for cls in (HttpsRemote, TcpRemote):
        for op in ("put_stripes", "get_stripes", "commit_records", "get_records"):
            count(cls, op)
    return sizes


def test_many_small_files_round_trip_in_batches(
    client: Client, tmp_path: Path, counted: dict[str, list[int]]
) -> None:
    paths = small_files(tmp_path / "in", 150)
    big = tmp_path / "in" / "big.bin"
    big.write_bytes(os.urandom(300_000))  # streams on its own, beside the batches
    infos = client.store_many([*paths, (big, "media/big.bin")])
    assert [i.name for i in infos] == [p.name for p in paths] + ["media/big.bin"]
    assert all(isinstance(i, FileInfo) and i.committed_on == ("https", "tcp") for i in infos)
    for kind in ("https", "tcp"):
        for op in ("put_stripes", "commit_records"):
            batches = counted[f"{kind}.{op}"]
            assert max(batches) > 4, (kind, op, batches)  # batches did form
            assert max(batches) <= MAX_BATCH_ITEMS
    out = tmp_path / "out"
    out.mkdir()
    written = client.fetch_many([p.name for p in paths] + ["media/big.bin"], out)
    assert written == [out / p.name for p in paths] + [out / "big.bin"]
    for path in [*paths, big]:
        assert (out / path.name).read_bytes() == path.read_bytes()
    for kind in ("https", "tcp"):
        assert max(counted[f"{kind}.get_records"]) > 4
        assert max(counted[f"{kind}.get_stripes"]) > 4
    # Each file is what the single calls see, too.
    assert client.stat(paths[3].name).sha256 == hashlib.sha256(paths[3].read_bytes()).hexdigest()
    client.fetch(paths[7].name, tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == paths[7].read_bytes()


def test_a_lone_store_sends_no_batch(
    client: Client, tmp_path: Path, counted: dict[str, list[int]]
) -> None:
    (path,) = small_files(tmp_path, 1)
    client.store(path)
    client.fetch(path.name, tmp_path / "back")
    assert counted == {}
    assert (tmp_path / "back").read_bytes() == path.read_bytes()


def test_one_failing_file_does_not_stop_the_others(client: Client, tmp_path: Path) -> None:
    paths = small_files(tmp_path / "in", 40)
    missing = tmp_path / "in" / "gone.bin"
    with pytest.raises(BatchError, match="1 of 41 files were not stored") as caught:
        client.store_many([*paths[:20], missing, *paths[20:]])
    results = caught.value.results
    assert isinstance(results[20], LocalFileError)
    assert caught.value.exit_code == LocalFileError.exit_code
    assert all(isinstance(r, FileInfo) for i, r in enumerate(results) if i != 20)

    out = tmp_path / "out"
    out.mkdir()
    names = [p.name for p in paths]
    with pytest.raises(BatchError, match="1 of 41 files were not fetched") as caught:
        client.fetch_many([*names[:5], "never-stored", *names[5:]], out)
    results = caught.value.results
    assert isinstance(results[5], NotFoundError)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no partial file
    for path in paths:
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_repeated_names_are_refused_before_anything_is_done(client: Client, tmp_path: Path) -> None:
    a, b = small_files(tmp_path, 2)
    with pytest.raises(InvalidNameError, match="appears more than once"):
        client.store_many([(a, "x"), (b, "x")])
    with pytest.raises(NotFoundError):
        client.stat("x")
    client.store_many([(a, "one/x"), (b, "two/x")])
    with pytest.raises(LocalFileError, match="appears more than once"):
        client.fetch_many(["one/x", "two/x"], tmp_path)
    with pytest.raises(LocalFileError, match="not a folder"):
        client.fetch_many(["one/x"], a)


def test_a_new_version_stored_in_a_batch_keeps_the_previous(client: Client, tmp_path: Path) -> None:
    paths = small_files(tmp_path / "v1", 30)
    client.store_many(paths)
    newer = small_files(tmp_path / "v2", 30, size=5000)
    client.store_many(newer)
    out = tmp_path / "out"
    out.mkdir()
    client.fetch_many([p.name for p in newer], out)
    for path in newer:
        assert (out / path.name).read_bytes() == path.read_bytes()


# -- the batch operations themselves, on both servers ------------------------------------


def _adapters(client: Client) -> list[Remote]:
    remotes = client._async.remotes()
    assert all(isinstance(r, CoalescingRemote) for r in remotes)
    return [r.remote for r in remotes]  # type: ignore[attr-defined]


def _ids() -> tuple[str, str]:
    return secrets.token_hex(32), secrets.token_hex(16)


@pytest.fixture(params=["https", "tcp"])
def adapter(request: pytest.FixtureRequest, client: Client) -> tuple[Client, Remote]:
    (remote,) = [r for r in _adapters(client) if r.kind == request.param]
    return client, remote


def test_batch_items_keep_their_own_outcomes(adapter: tuple[Client, Remote]) -> None:
    client, remote = adapter
    run = client._run
    stripes = [(*_ids(), os.urandom(n)) for n in (0, 1, 2000, 70_000)]
    digests = run(remote.put_stripes(stripes))
    assert digests == [stripe_digest(d) for _, _, d in stripes]

    records = [
        (o, ObjectRecord(v, len(d), h, b"m" * 40))
        for (o, v, d), h in zip(stripes, digests, strict=True)
    ]
    wrong = (records[1][0], ObjectRecord(records[1][1].version_id, 1, "blake3:" + "0" * 64, b"m"))
    never = (_ids()[0], ObjectRecord(_ids()[1], 5, "blake3:" + "1" * 64, b"m"))
    results = run(remote.commit_records([records[0], wrong, never, *records[2:]]))
    assert results[0] is None
    assert results[3] is None
    assert results[4] is None
    assert isinstance(results[1], ConflictError)
    assert isinstance(results[2], ConflictError)
    run(remote.commit(*records[1]))

    unknown = _ids()[0]
    got = run(remote.get_records([records[2][0], unknown, records[0][0]]))
    assert got[0] == records[2][1]
    assert got[2] == records[0][1]
    assert isinstance(got[1], NotFoundError)

    asked = [(o, v) for o, v, _ in stripes] + [(unknown, _ids()[1])]
    back = run(remote.get_stripes(asked))
    assert back[:4] == [d for _, _, d in stripes]
    assert isinstance(back[4], NotFoundError)


def test_batches_are_bounded(adapter: tuple[Client, Remote]) -> None:
    client, remote = adapter
    run = client._run
    with pytest.raises(ServerError, match="1 to 64"):
        run(remote.put_stripes([(*_ids(), b"x") for _ in range(MAX_BATCH_ITEMS + 1)]))
    with pytest.raises(ServerError, match="at most 1048576 bytes"):
        run(remote.put_stripes([(*_ids(), bytes(MAX_BATCH_BYTES // 2 + 1)) for _ in range(2)]))
    with pytest.raises(ServerError, match="1 to 64"):
        run(remote.get_records([_ids()[0] for _ in range(MAX_BATCH_ITEMS + 1)]))
    with pytest.raises(ServerError, match="object id"):
        run(remote.get_records(["../../etc"]))
    # Stripes past the batch's byte bound are left for the client to ask alone.
    big = [(*_ids(), os.urandom(MAX_BATCH_BYTES // 2 - 10)) for _ in range(3)]
    for stripe in big:
        run(remote.put_stripes([stripe]))
    back = run(remote.get_stripes([(o, v) for o, v, _ in big]))
    assert back[:2] == [d for _, _, d in big[:2]]
    assert back[2] is None
    # The connection is still good after each refusal.
    run(remote.ping())


def test_a_batch_is_admitted_against_the_quota_as_a_whole(
    servers: LiveServers, tmp_path: Path
) -> None:
    added = add_setup_tenant(servers.config, "alice", quota_bytes=20_000)
    with Client(load_config(added.config)) as alice:
        for remote in _adapters(alice):
            with pytest.raises(QuotaExceededError, match="batch of 3 stripes"):
                alice._run(remote.put_stripes([(*_ids(), bytes(8000)) for _ in range(3)]))
            assert alice._run(remote.put_stripes([(*_ids(), bytes(8000))]))
        paths = small_files(tmp_path, 10, size=3000)
        with pytest.raises(BatchError) as caught:
            alice.store_many(paths)
        failed = [r for r in caught.value.results if not isinstance(r, FileInfo)]
        assert failed
        assert all(isinstance(r, QuotaExceededError) for r in failed)


# -- parsers of batches, on either side, fed anything ------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@given(json_values, st.booleans())
def test_server_side_batch_parsers_refuse_anything_malformed(doc: Any, lengths: bool) -> None:
    for parse in (
        lambda: parse_stripe_items(doc, with_lengths=lengths),
        lambda: parse_object_ids(doc),
        lambda: parse_record_lines(json.dumps(doc).encode() + b"\n"),
    ):
        codes = []
        try:
            parse()
        except StorageError as exc:
            codes.append(exc.code)
        assert set(codes) <= {"bad_request", "too_large"}


@given(json_values, st.binary(max_size=200), st.integers(1, 5))
def test_client_side_batch_parsers_only_raise_protocol_errors(
    doc: Any, body: bytes, n: int
) -> None:
    reply = {"stripes": doc, "results": doc} if not isinstance(doc, dict) else doc
    ids = [secrets.token_hex(32) for _ in range(n)]
    for parse in (
        lambda: read_put_stripes_reply(reply, [1] * n, "srv"),
        lambda: read_commit_results(reply, n, "srv"),
        lambda: split_stripes(reply, body, n, "srv"),
        lambda: read_record_lines(body, ids, "srv"),
        lambda: read_record_lines(json.dumps(doc).encode() + b"\n", ids[:1], "srv"),
    ):
        try:
            out = parse()
        except ProtocolError:
            continue
        assert len(out) == n or len(out) == 1


def test_upload_answers_must_carry_a_stripe_digest() -> None:
    good = {"length": 3, "digest": "blake3:" + "ab" * 32}
    assert upload_digest(good, 3, "srv") == good["digest"]
    # A server from before stripe digests answers with a bare SHA-256: named as older.
    with pytest.raises(ProtocolError, match=r"older splitstore.*upgrade the server"):
        upload_digest({"length": 3, "sha256": "ab" * 32}, 3, "srv")
    for bad in (
        {**good, "length": 4},
        {**good, "digest": "ab" * 32},
        {**good, "digest": "blake3:" + "AB" * 32},
        {**good, "digest": None},
        {**good, "digest": "sha256:" + "ab" * 32},  # a new stripe is never hashed so
        {"length": 3},
    ):
        with pytest.raises(ProtocolError, match="malformed upload reply"):
            upload_digest(bad, 3, "srv")
    with pytest.raises(ProtocolError, match="older splitstore"):
        read_put_stripes_reply({"stripes": [{"length": 1, "sha256": "ab" * 32}]}, [1], "srv")


def test_split_stripes_takes_each_stripe_where_the_answer_says() -> None:
    missing = {"error": {"code": "not_found", "message": "x"}}
    alone = {"error": {"code": "too_large", "message": "y"}}
    reply = {"stripes": [{"length": 2}, missing, alone, {"length": 3}]}
    out = split_stripes(reply, b"abcde", 4, "srv")
    assert out[0] == b"ab"
    assert isinstance(out[1], NotFoundError)
    assert out[2] is None
    assert out[3] == b"cde"
    with pytest.raises(ProtocolError, match="does not add up"):
        split_stripes(reply, b"abcdef", 4, "srv")  # a byte more than announced
    with pytest.raises(ProtocolError):
        split_stripes({"stripes": [{"length": True}]}, b"a", 1, "srv")
    oid, other = secrets.token_hex(32), secrets.token_hex(32)
    line = json.dumps({"object_id": other, "error": {"code": "not_found", "message": ""}})
    with pytest.raises(ProtocolError, match="another object"):
        read_record_lines(line.encode() + b"\n", [oid], "srv")


# -- the coalescer's own rules, with stand-in send functions -----------------------------


def test_the_coalescer_answers_every_caller_and_sends_no_cancelled_item() -> None:
    async def scenario() -> None:
        sent: list[list[int]] = []
        gate = asyncio.Event()

        async def one(item: int) -> int:
            sent.append([item])
            await gate.wait()
            return item * 10

        async def many(items: list[int]) -> list[int | SplitStoreError]:
            sent.append(items)
            return [ServerError("odd") if i % 2 else i * 10 for i in items]

        batcher: _Batcher[int, int] = _Batcher(one, many, lambda i: 1, 100)
        first = asyncio.ensure_future(batcher.call(0))
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(batcher.call(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        queued[1].cancel()  # its caller went away before its batch left: not sent
        await asyncio.sleep(0)
        gate.set()
        assert await first == 0
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert sent == [[0], [1, 3]]
        assert isinstance(results[0], ServerError)
        assert isinstance(results[1], asyncio.CancelledError)
        assert isinstance(results[2], ServerError)
        assert results[0] is not results[2]  # each caller its own error to annotate

        # Closing answers everyone still waiting, even a batch that never began.
        gate.clear()
        stuck = asyncio.ensure_future(batcher.call(4))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(batcher.call(5))
        await asyncio.sleep(0)
        await asyncio.wait_for(batcher.close(), 5)
        for task in (stuck, behind):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        with pytest.raises(UsageError, match="closed"):
            await batcher.call(6)

    asyncio.run(scenario())


def test_a_whole_batch_failing_fails_each_of_its_callers() -> None:
    async def scenario() -> None:
        async def one(item: int) -> int:
            await asyncio.sleep(0.01)
            return item

        async def many(items: list[int]) -> list[int | SplitStoreError]:
            raise ServerUnavailableError("the server went away", server="s")

        batcher: _Batcher[int, int] = _Batcher(one, many, lambda i: 1, 100)
        calls = [asyncio.ensure_future(batcher.call(i)) for i in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert results[0] == 0
        assert all(isinstance(r, ServerUnavailableError) for r in results[1:])
        assert len({id(r) for r in results[1:]}) == 3
        assert all(r.server == "s" for r in results[1:])  # type: ignore[union-attr]
        await batcher.close()

    asyncio.run(scenario())


def test_batches_keep_the_server_stripe_limit(tmp_path: Path, loop_thread: LoopThread) -> None:
    live = LiveServers(tmp_path / "setup", loop_thread, replace(TEST_LIMITS, max_stripe_bytes=1000))
    live.start()
    try:
        with live.client() as client:
            for remote in _adapters(client):
                with pytest.raises(ServerError, match="at most 1000 bytes"):
                    client._run(remote.put_stripes([(*_ids(), bytes(1001)), (*_ids(), b"x")]))
                assert client._run(remote.put_stripes([(*_ids(), bytes(1000))]))
    finally:
        live.stop()


def test_fetch_many_reads_large_files_one_at_a_time(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory stays flat: each large fetch holds its buffers, so they take turns."""
    big = small_files(tmp_path / "big", 4, size=200_000)
    small = small_files(tmp_path / "small", 20)
    names = [f"big/{p.name}" for p in big] + [f"small/{p.name}" for p in small]
    client.store_many(list(zip([*big, *small], names, strict=True)))
    open_now: dict[str, int] = {}
    most: dict[str, int] = {}
    real = CoalescingRemote.get_stripe

    def counting(self: CoalescingRemote, oid: str, vid: str, **kw: Any) -> Any:
        inner = real(self, oid, vid, **kw)
        if (kw.get("expected_length") or 0) <= BATCHED_STRIPE_BYTES:
            return inner

        @contextlib.asynccontextmanager
        async def counted() -> Any:
            async with inner as reader:
                open_now[self.kind] = open_now.get(self.kind, 0) + 1
                most[self.kind] = max(most.get(self.kind, 0), open_now[self.kind])
                try:
                    yield reader
                finally:
                    open_now[self.kind] -= 1

        return counted()

    monkeypatch.setattr(CoalescingRemote, "get_stripe", counting)
    for group, paths in (("big", big), ("small", small)):
        out = tmp_path / f"out-{group}"
        out.mkdir()
        client.fetch_many([f"{group}/{p.name}" for p in paths], out)
        for path in paths:
            assert (out / path.name).read_bytes() == path.read_bytes()
    assert most == {"https": 1, "tcp": 1}
