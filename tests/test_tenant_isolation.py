"""Tenants on real servers: separate namespaces, token hashes only, add and revoke on
running servers, per-tenant quotas, and the upgrade of a format-1 data folder."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import ssl
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from splitstore import (
    AuthenticationError,
    Client,
    QuotaExceededError,
    StorageFullError,
    UsageError,
    load_config,
)
from splitstore import _protocol as p
from splitstore._cli import main
from splitstore._digest import stripe_digest
from splitstore._service import StorageService
from splitstore._setup import init_setup
from splitstore._storage import (
    DATA_FORMAT,
    DataFolder,
    LocalDiskStore,
    ObjectRecord,
    StorageError,
)
from splitstore._tenant_admin import (
    AddedTenant,
    add_setup_tenant,
    list_setup_tenants,
    parse_size,
    revoke_setup_tenant,
)
from splitstore._tenants import Tenant, read_tenants

from .conftest import LiveServers
from .test_server_robustness import tls_socket

KINDS = ("https", "tcp")


def add(servers: LiveServers, name: str, **options: Any) -> tuple[AddedTenant, Client]:
    added = add_setup_tenant(servers.config, name, **options)
    return added, Client(load_config(added.config))


def token_of(added: AddedTenant) -> str:
    return added.token.read_text().strip()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def stored_ids(servers: LiveServers, kind: str, tenant: str) -> list[tuple[str, dict[str, Any]]]:
    """(object id, current record) of each object a tenant has on one server, from disk."""
    objects = servers.data_dir(kind) / "tenants" / tenant / "objects"
    return [
        (f.parent.name, json.loads(f.read_text())["current"])
        for f in sorted(objects.glob("*/*/record.json"))
    ]


class Https:
    """One kept-alive HTTPS connection with a tenant's token."""

    def __init__(self, servers: LiveServers, token: str) -> None:
        ctx = ssl.create_default_context(cafile=str(servers.paths.ca_cert))
        port = servers.config.server("https").port
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        self.token = token

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()


class Tcp:
    """One TCP connection, authenticated once by its HELLO, speaking through _protocol."""

    def __init__(self, servers: LiveServers, token: str) -> None:
        self.sock = tls_socket(servers, "tcp")
        self.conn = p.Connection(p.Role.CLIENT)
        self.sock.sendall(self.conn.send(p.Preface(2, 2)))
        assert self._next() == p.PrefaceReply(2)
        self.sock.sendall(self.conn.send(p.Hello(token)))
        assert isinstance(self._next(), p.Ready)

    def _next(self) -> Any:
        while (event := self.conn.next_event()) is p.NEED_DATA:
            self.conn.receive_data(self.sock.recv(65536))
        return event

    def call(self, op: str, body: bytes = b"", **fields: Any) -> tuple[str, dict[str, Any], bytes]:
        """(error code or "ok", response fields, response body)."""
        self.sock.sendall(self.conn.send(p.Request(op, fields)))
        for piece in self.conn.send_data(body) if body else []:
            self.sock.sendall(piece)
        self.sock.sendall(self.conn.send(p.End({})))
        event = self._next()
        if isinstance(event, p.Error):
            return event.code, {}, b""
        assert isinstance(event, p.Response)
        data = b""
        while isinstance(part := self._next(), p.Data):
            data += part.payload
        assert isinstance(part, p.End)
        return "ok", event.fields, data


# -- namespaces -----------------------------------------------------------------------


def test_each_tenant_sees_only_its_own_files(servers: LiveServers, tmp_path: Path) -> None:
    _, alice = add(servers, "alice")
    _, bob = add(servers, "bob")
    with alice, bob, servers.client() as setup_own:
        a = write(tmp_path / "a", os.urandom(5000))
        b = write(tmp_path / "b", os.urandom(7000))
        alice.store(a, "notes.txt")
        bob.store(b, "notes.txt")
        assert [i.name for i in alice.list()] == ["notes.txt"]
        assert [i.name for i in bob.list()] == ["notes.txt"]
        assert setup_own.list() == []
        assert alice.fetch("notes.txt", tmp_path / "a.out").read_bytes() == a.read_bytes()
        assert bob.fetch("notes.txt", tmp_path / "b.out").read_bytes() == b.read_bytes()
        bob.delete("notes.txt")
        assert alice.fetch("notes.txt", tmp_path / "a2").read_bytes() == a.read_bytes()
    for kind in KINDS:
        assert len(stored_ids(servers, kind, "alice")) == 1
        assert stored_ids(servers, kind, "bob") == []


def test_raw_api_cannot_reach_another_tenants_objects(servers: LiveServers, tmp_path: Path) -> None:
    """Alice uses Bob's object and version ids directly: nothing of Bob's is reachable."""
    alice_added, alice = add(servers, "alice")
    bob_added, bob = add(servers, "bob")
    secret = os.urandom(6000)
    with bob:
        bob.store(write(tmp_path / "s", secret), "secret")
    [(oid, rec)] = stored_ids(servers, "https", "bob")
    vid = rec["version_id"]
    token = token_of(alice_added)

    web = Https(servers, token)
    assert web.call("GET", f"/v1/objects/{oid}/record")[0] == 404
    assert web.call("GET", f"/v1/objects/{oid}/stripes/{vid}")[0] == 404
    assert web.call("DELETE", f"/v1/objects/{oid}")[0] == 404
    status, listing = web.call("GET", "/v1/objects")
    assert (status, listing) == (200, b"")
    # Overwriting: the record names a stripe Alice does not have; a stripe she puts under
    # Bob's ids lands in her own namespace.
    commit = json.dumps(rec).encode()
    assert web.call("PUT", f"/v1/objects/{oid}/record", commit)[0] == 409
    assert web.call("PUT", f"/v1/objects/{oid}/stripes/{vid}", b"x" * 10)[0] == 201

    [(tcp_oid, tcp_rec)] = stored_ids(servers, "tcp", "bob")
    tcp_vid = tcp_rec["version_id"]
    raw = Tcp(servers, token)
    assert raw.call("get_record", object_id=tcp_oid)[0] == "not_found"
    assert raw.call("get_stripe", object_id=tcp_oid, version_id=tcp_vid)[0] == "not_found"
    assert raw.call("delete", object_id=tcp_oid)[0] == "not_found"
    assert raw.call("list") == ("ok", {"status": "ok"}, b"")
    assert raw.call("commit", object_id=tcp_oid, **tcp_rec)[0] == "conflict"
    put = raw.call("put_stripe", b"y" * 10, object_id=tcp_oid, version_id=tcp_vid, length=10)
    assert put[0] == "ok"

    with Client(load_config(bob_added.config)) as bob, alice:
        assert bob.fetch("secret", tmp_path / "out").read_bytes() == secret
        assert bob.verify("secret").name == "secret"
        assert alice.list() == []


def test_servers_keep_only_token_hashes(servers: LiveServers, tmp_path: Path) -> None:
    added = [add(servers, name) for name in ("alice", "bob")]
    tokens = [servers.config.token(), *(token_of(a) for a, _ in added)]
    for _, client in added:
        with client:
            client.store(write(tmp_path / "f", os.urandom(3000)), "f")
    tenants_text = servers.paths.tenants.read_text()
    for token in tokens:
        assert hashlib.sha256(token.encode()).hexdigest() in tenants_text
    server_side = [servers.paths.tenants] + [
        f for kind in KINDS for f in servers.data_dir(kind).rglob("*") if f.is_file()
    ]
    for f in server_side:
        content = f.read_bytes()
        for token in tokens:
            assert token.encode() not in content, f


# -- add and revoke on running servers -------------------------------------------------


def test_tenant_add_and_revoke_on_running_servers(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(servers.config_path)
    assert main(["tenant", "add", "carol", "--config", config]) == 0
    out = capsys.readouterr().out
    carol_config = servers.paths.root / "carol.toml"
    assert f"splitstore --config {carol_config} put FILE" in out
    for name in ("carol.token", "carol.key"):
        assert (servers.paths.root / name).stat().st_mode & 0o077 == 0
    data = write(tmp_path / "in", os.urandom(4000))
    assert main(["--config", str(carol_config), "-q", "put", str(data), "--name", "doc"]) == 0
    assert main(["--config", str(carol_config), "-q", "get", "doc", "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o").read_bytes() == data.read_bytes()

    token = (servers.paths.root / "carol.token").read_text().strip()
    web, raw = Https(servers, token), Tcp(servers, token)
    assert web.call("GET", "/v1/ping")[0] == 200
    assert raw.call("ping")[0] == "ok"
    capsys.readouterr()

    assert main(["tenant", "revoke", "carol", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "kept" in out
    assert str(servers.data_dir("https") / "tenants" / "carol") in out
    # The open connections are refused at their next request.
    assert web.call("GET", "/v1/ping")[0] == 401
    assert raw.call("ping")[0] == "unauthorized"
    with Client(load_config(carol_config)) as carol, pytest.raises(AuthenticationError):
        carol.list()
    code = main(["--config", str(carol_config), "ls"])
    assert code == AuthenticationError.exit_code
    assert len(capsys.readouterr().err.splitlines()) == 1
    # Its files stay on disk; the setup's own tenant is untouched.
    assert stored_ids(servers, "tcp", "carol")
    with servers.client() as own:
        assert own.list() == []


def test_tenant_add_refusals(servers: LiveServers) -> None:
    add_setup_tenant(servers.config, "alice")
    with pytest.raises(UsageError, match="exists already"):
        add_setup_tenant(servers.config, "alice")
    for reserved in ("tenants", "splitstore"):
        with pytest.raises(UsageError, match="belongs to the setup"):
            add_setup_tenant(servers.config, reserved, force=True)
    with pytest.raises(UsageError, match="tenant name"):
        add_setup_tenant(servers.config, "../evil")
    with pytest.raises(UsageError, match="setup's own tenant"):
        add_setup_tenant(servers.config, "default", force=True)
    (servers.paths.root / "dave.toml").write_text("mine\n")
    with pytest.raises(UsageError, match=r"dave\.toml exists"):
        add_setup_tenant(servers.config, "dave")
    key = (servers.paths.root / "alice.key").read_bytes()
    old_token = (servers.paths.root / "alice.token").read_text()
    add_setup_tenant(servers.config, "alice", force=True, quota_bytes=5)
    assert (servers.paths.root / "alice.key").read_bytes() == key  # its files need it
    assert (servers.paths.root / "alice.token").read_text() != old_token
    assert {t.name: t.quota_bytes for t in read_tenants(servers.paths.tenants)} == {
        "alice": 5,
        "default": 0,
    }
    # A new token without --quota keeps the quota (it does not lift it), through the
    # command too; --quota 0 lifts it.
    args = ["tenant", "add", "alice", "--force", "-q", "--config", str(servers.config_path)]
    assert add_setup_tenant(servers.config, "alice", force=True).quota_bytes == 5
    assert main(args) == 0
    assert {t.name: t.quota_bytes for t in read_tenants(servers.paths.tenants)}["alice"] == 5
    assert main([*args, "--quota", "0"]) == 0
    assert {t.name: t.quota_bytes for t in read_tenants(servers.paths.tenants)}["alice"] == 0
    # The setup's own tenant cannot be revoked: that would lock its own config out.
    with pytest.raises(UsageError, match="setup's own tenant"):
        revoke_setup_tenant(servers.config, "default")


def test_a_name_with_leftover_data_needs_force(servers: LiveServers, tmp_path: Path) -> None:
    """Revoked data stays; a new tenant of that name gets it only when asked to."""
    _, eve = add(servers, "eve")
    with eve:
        eve.store(write(tmp_path / "f", b"old files"), "f")
    assert main(["tenant", "revoke", "eve", "--config", str(servers.config_path), "-q"]) == 0
    with pytest.raises(UsageError, match="earlier tenant"):
        add_setup_tenant(servers.config, "eve")
    add_setup_tenant(servers.config, "eve", force=True)


def test_tenant_list(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, alice = add(servers, "alice", quota_bytes=parse_size("10M"))
    with alice:
        alice.store(write(tmp_path / "f", os.urandom(10_000)), "f")
    rows = {r.name: r for r in list_setup_tenants(servers.config)}
    assert rows["alice"].quota_bytes == 10 * 1024**2
    assert 5000 < rows["alice"].stored["https"] < 9000
    assert rows["default"].stored == {"https": 0, "tcp": 0}
    assert main(["tenant", "list", "--config", str(servers.config_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["tenant", "quota", "https", "tcp"]
    assert lines[1].split()[:3] == ["alice", "10.0", "MiB"]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("500M", 500 * 1024**2),
        ("10G", 10 * 1024**3),
        ("1.5k", 1536),
        ("2GiB", 2 * 1024**3),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense() -> None:
    for text in ("", "ten", "-5", "5X", "1e9", "0.5"):  # half a byte is not "no quota"
        with pytest.raises(UsageError):
            parse_size(text)


# -- quotas ---------------------------------------------------------------------------


def test_quota_refuses_clearly_and_deleting_frees_it(
    servers: LiveServers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    added, alice = add(servers, "alice", quota_bytes=100_000)  # per server
    labels = {s.label for s in servers.config.servers}
    small = write(tmp_path / "small", os.urandom(30_000))  # ~15 kB per server
    mid = write(tmp_path / "mid", os.urandom(120_000))  # ~60 kB per server
    big = write(tmp_path / "big", os.urandom(300_000))
    with alice:
        alice.store(small, "small")
        with pytest.raises(QuotaExceededError) as over:
            alice.store(big, "big")
        assert over.value.server in labels
        assert str(over.value).startswith(
            f"the {over.value.server}: tenant 'alice' would go over its quota: this stripe needs"
        )
        assert "of 100,000 are used" in str(over.value)
        assert [i.name for i in alice.list()] == ["small"]
        alice.store(mid, "mid")
        with pytest.raises(QuotaExceededError):
            alice.store(mid, "mid2")

    servers.stop()  # usage is counted again from disk at start
    servers.start()
    with Client(load_config(added.config)) as alice:
        with pytest.raises(QuotaExceededError):
            alice.store(mid, "mid2")
        alice.delete("mid")
        alice.store(mid, "mid2")
        assert alice.fetch("small", tmp_path / "s").read_bytes() == small.read_bytes()
    capsys.readouterr()
    code = main(["--config", str(added.config), "-q", "put", str(big)])
    err = capsys.readouterr().err.splitlines()
    assert code == StorageFullError.exit_code
    assert len(err) == 1
    assert "tenant 'alice' would go over its quota" in err[0]


def test_quota_refusal_on_the_wire(servers: LiveServers) -> None:
    """Both servers refuse an upload over the quota from its declared length alone."""
    added = add_setup_tenant(servers.config, "alice", quota_bytes=1000)
    token = token_of(added)
    web = Https(servers, token)
    web.conn.putrequest("PUT", "/v1/objects/" + "a" * 64 + "/stripes/" + "b" * 32)
    web.conn.putheader("Authorization", f"Bearer {token}")
    web.conn.putheader("Content-Length", str(10**9))
    web.conn.endheaders()  # and not a byte of the body
    resp = web.conn.getresponse()
    assert resp.status == 507
    assert json.loads(resp.read())["error"]["code"] == "quota_exceeded"
    raw = Tcp(servers, token)
    put = raw.call("put_stripe", object_id="a" * 64, version_id="b" * 32, length=10**9)
    assert put[0] == "quota_exceeded"


def test_parallel_uploads_cannot_both_squeeze_in(tmp_path: Path) -> None:
    """The declared length counts from admission, before any byte arrives."""

    async def scenario() -> None:
        data = DataFolder(tmp_path)
        data.tenant("alice")
        service = StorageService(data)
        alice = Tenant("alice", quota_bytes=10_000)
        gate = asyncio.Event()

        async def body(n: int) -> AsyncIterator[bytes]:
            await gate.wait()
            yield b"x" * n

        first = asyncio.create_task(service.put_stripe(alice, "1" * 64, "a" * 32, 6000, body(6000)))
        await asyncio.sleep(0)  # admitted; now waiting for its body
        with pytest.raises(StorageError) as refused:
            await service.put_stripe(alice, "2" * 64, "b" * 32, 6000, body(6000))
        assert refused.value.code == "quota_exceeded"
        gate.set()
        assert (await first)[0] == 6000
        assert 6000 < data.tenant("alice").used_bytes() < 6200
        bob = Tenant("bob", quota_bytes=10_000)  # quotas are per tenant
        assert (await service.put_stripe(bob, "2" * 64, "b" * 32, 6000, body(6000)))[0] == 6000

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["one by one", "in batches"])
def test_parallel_commits_cannot_together_overrun_the_quota(tmp_path: Path, how: str) -> None:
    """A record counts from its admission until it is written, as a stripe does: commits
    arriving together are not each admitted against the same usage."""

    async def scenario() -> list[str | None]:
        data = DataFolder(tmp_path)
        data.tenant("alice")
        service = StorageService(data)
        alice = Tenant("alice", quota_bytes=200_000)
        oids = [f"{i:064x}" for i in range(1, 21)]

        async def nothing() -> AsyncIterator[bytes]:
            return
            yield b""

        for oid in oids:
            await service.put_stripe(alice, oid, "a" * 32, 0, nothing())
        fields = ObjectRecord("a" * 32, 0, stripe_digest(b""), b"m" * 30_000).to_json()
        if how == "one by one":
            outcomes = await asyncio.gather(
                *(service.commit(alice, oid, fields) for oid in oids), return_exceptions=True
            )
            return [o.code if isinstance(o, StorageError) else None for o in outcomes]
        answers = await asyncio.gather(
            *(service.commit_records(alice, [(oid, fields)]) for oid in oids)
        )
        return [a[0].get("error", {}).get("code") for a in answers]

    codes = asyncio.run(scenario())
    # A record is about 40,000 bytes of JSON: four fit. (One whose thread is just ending
    # counts twice for a moment, stored and still in flight, so fewer may be admitted.)
    assert 1 <= codes.count(None) <= 4
    assert set(codes) == {None, "quota_exceeded"}
    store = DataFolder(tmp_path).tenant("alice")
    assert store.used_bytes() <= 200_000


def test_usage_follows_commits_and_deletes(tmp_path: Path) -> None:
    store = DataFolder(tmp_path).tenant("alice")
    oid = "1" * 64
    for vid in ("a" * 32, "b" * 32, "c" * 32):
        upload = store.begin_stripe(oid, vid, 1000)
        upload.write(b"z" * 1000)
        digest = upload.finish()
        store.commit(oid, ObjectRecord(vid, 1000, digest, b"manifest"))
        on_disk = sum(f.stat().st_size for f in (tmp_path / "tenants").rglob("*") if f.is_file())
        assert store.used_bytes() == on_disk
    assert DataFolder(tmp_path).usage() == {"alice": store.used_bytes()}
    store.delete(oid)
    assert store.used_bytes() == 0
    # A failed store's leftover stripe (no record) counts, and a delete removes it.
    upload = store.begin_stripe(oid, "d" * 32, 500)
    upload.write(b"z" * 500)
    upload.finish()
    assert store.used_bytes() > 500
    with pytest.raises(StorageError) as missing:
        store.delete(oid)
    assert missing.value.code == "not_found"
    assert store.used_bytes() == 0


# -- setup ----------------------------------------------------------------------------


def test_init_writes_a_tenants_file_and_force_keeps_added_tenants(tmp_path: Path) -> None:
    paths = init_setup(tmp_path / "setup", https_port=8443, tcp_port=8444)
    config = load_config(paths.config)
    assert {s.tenants_file for s in config.servers} == {paths.tenants}
    doc = tomllib.loads(paths.tenants.read_text())
    digest = hashlib.sha256(config.token().encode()).hexdigest()
    assert doc["tenants"]["default"]["token_sha256"] == digest
    alice = add_setup_tenant(config, "alice", quota_bytes=1000)
    before = read_tenants(paths.tenants)

    init_setup(tmp_path / "setup", https_port=8443, tcp_port=8444, force=True)
    after = {t.name: t for t in read_tenants(paths.tenants)}
    assert after["alice"] == next(t for t in before if t.name == "alice")
    new = hashlib.sha256(load_config(paths.config).token().encode()).hexdigest()
    assert tomllib.loads(paths.tenants.read_text())["tenants"]["default"]["token_sha256"] == new
    assert new != digest
    assert alice.token.exists()


# -- the format-1 data folder ---------------------------------------------------------


def make_format_1(data_dir: Path) -> None:
    """Turn a format-2 folder holding only tenant "default" back into format 1."""
    shutil.move(data_dir / "tenants" / "default" / "objects", data_dir / "objects")
    shutil.rmtree(data_dir / "tenants")
    (data_dir / "FORMAT").write_text("splitstore-server-data 1\n")


def test_a_format_1_folder_is_moved_into_tenant_default(tmp_path: Path) -> None:
    old = LocalDiskStore(tmp_path)  # the format-1 layout: objects/ at the top
    upload = old.begin_stripe("1" * 64, "a" * 32, 3)
    upload.write(b"abc")
    old.commit("1" * 64, ObjectRecord("a" * 32, 3, upload.finish(), b"m"))
    (tmp_path / "FORMAT").write_text("splitstore-server-data 1\n")

    data = DataFolder(tmp_path)
    assert (tmp_path / "FORMAT").read_text() == DATA_FORMAT + "\n"
    assert not (tmp_path / "objects").exists()
    assert data.tenant("default").get_record("1" * 64).stripe_length == 3
    assert data.usage()["default"] > 3


def test_an_interrupted_upgrade_is_finished(tmp_path: Path) -> None:
    """The rename happened, the marker was not yet rewritten: the next start finishes."""
    DataFolder(tmp_path).tenant("default")
    (tmp_path / "FORMAT").write_text("splitstore-server-data 1\n")
    DataFolder(tmp_path)
    assert (tmp_path / "FORMAT").read_text() == DATA_FORMAT + "\n"


def test_a_format_2_folder_is_only_marked_3_and_a_newer_one_refused(tmp_path: Path) -> None:
    """Format 2 differs only in its bare SHA-256s, which format 3 still reads."""
    store = DataFolder(tmp_path).tenant("default")
    upload = store.begin_stripe("1" * 64, "a" * 32, 3)
    upload.write(b"abc")
    store.commit("1" * 64, ObjectRecord("a" * 32, 3, upload.finish(), b"m"))
    (tmp_path / "FORMAT").write_text("splitstore-server-data 2\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "FORMAT")

    data = DataFolder(tmp_path)
    assert (tmp_path / "FORMAT").read_text() == DATA_FORMAT + "\n" == "splitstore-server-data 3\n"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "FORMAT")
    assert after == before
    assert data.tenant("default").get_record("1" * 64).stripe_length == 3

    (tmp_path / "FORMAT").write_text("splitstore-server-data 4\n")
    with pytest.raises(StorageError, match="format"):
        DataFolder(tmp_path)


def test_servers_upgrade_an_old_data_folder(servers: LiveServers, tmp_path: Path) -> None:
    data = write(tmp_path / "in", os.urandom(9000))
    with servers.client() as client:
        client.store(data, "kept")
    servers.stop()
    for kind in KINDS:
        make_format_1(servers.data_dir(kind))
    servers.start()
    with servers.client() as client:
        assert client.fetch("kept", tmp_path / "out").read_bytes() == data.read_bytes()
    for kind in KINDS:
        folder = servers.data_dir(kind)
        assert (folder / "FORMAT").read_text() == DATA_FORMAT + "\n"
        assert sorted(p.name for p in folder.iterdir()) == ["FORMAT", "lock", "tenants", "tmp"]
        assert len(stored_ids(servers, kind, "default")) == 1
