"""Store and fetch through both real servers, for the sizes where chunking has edges."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from splitstore import Client, NotFoundError, _reclaim, _storage, split_fetch, split_store
from splitstore._crypto import ciphertext_size
from splitstore._stripes import stripe_lengths

from .conftest import LiveServers

EDGE_SIZES = [0, 1, 1023, 1024, 1025, 2048, 2049, 3 * 1024 * 1024 + 7]


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_roundtrip_sizes(servers: LiveServers, client: Client, tmp_path: Path, size: int) -> None:
    data = write_random(tmp_path / "in.bin", size)
    info = client.store(tmp_path / "in.bin")
    assert info.name == "in.bin"
    assert info.size == size
    assert info.encrypted
    # What is cut into chunks is the ciphertext: 16 bytes more per 64 KiB segment.
    assert info.chunks == -(-ciphertext_size(size) // 1024)
    assert sum(info.chunks_per_server.values()) == info.chunks
    out = client.fetch("in.bin", tmp_path / "out.bin")
    assert out == tmp_path / "out.bin"
    assert out.read_bytes() == data


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_plain_roundtrip_sizes(plain_client: Client, tmp_path: Path, size: int) -> None:
    data = write_random(tmp_path / "in.bin", size)
    info = plain_client.store(tmp_path / "in.bin")
    assert (info.size, info.encrypted) == (size, False)
    assert info.chunks == -(-size // 1024)
    assert plain_client.fetch("in.bin", tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_stripes_hold_alternate_chunks(
    plain_servers: LiveServers, plain_client: Client, tmp_path: Path, size: int
) -> None:
    """With encryption off, each stripe is exactly its chunks of the file."""
    servers, client = plain_servers, plain_client
    data = write_random(tmp_path / "in.bin", size)
    client.store(tmp_path / "in.bin", "alt")
    https = servers.stripe_path("https", "alt").read_bytes()
    tcp = servers.stripe_path("tcp", "alt").read_bytes()
    chunks = [data[i : i + 1024] for i in range(0, size, 1024)]
    assert https == b"".join(chunks[0::2])  # chunks 1, 3, 5, ... counting from 1
    assert tcp == b"".join(chunks[1::2])  # chunks 2, 4, 6, ...
    assert [len(https), len(tcp)] == stripe_lengths(size, 1024, 2)


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_encrypted_stripes_alternate_ciphertext_chunks(
    servers: LiveServers, client: Client, tmp_path: Path, size: int
) -> None:
    """Encrypted, the stripes are the alternate chunks of the sealed stream."""
    write_random(tmp_path / "in.bin", size)
    client.store(tmp_path / "in.bin", "alt")
    https = servers.stripe_path("https", "alt").read_bytes()
    tcp = servers.stripe_path("tcp", "alt").read_bytes()
    assert [len(https), len(tcp)] == stripe_lengths(ciphertext_size(size), 1024, 2)


def test_module_functions_use_the_config(servers: LiveServers, tmp_path: Path) -> None:
    data = write_random(tmp_path / "holiday.mp4", 50_000)
    info = split_store(tmp_path / "holiday.mp4", config=servers.config_path)
    assert (info.name, info.size) == ("holiday.mp4", 50_000)
    (tmp_path / "restored").mkdir()
    out = split_fetch("holiday.mp4", tmp_path / "restored/holiday.mp4", config=servers.config_path)
    assert out.read_bytes() == data


def test_config_from_environment(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITSTORE_CONFIG", str(servers.config_path))
    write_random(tmp_path / "a.bin", 10)
    assert split_store(tmp_path / "a.bin").size == 10


@pytest.mark.parametrize("later", [False, True], ids=["at-once", "after-the-commit"])
def test_overwrite_replaces_version_and_cleans_old_stripes(
    servers: LiveServers,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    later: bool,
) -> None:
    if later:  # every stripe counts as large: removed in the background (_reclaim)
        monkeypatch.setattr(_storage, "RECLAIM_LATER_BYTES", 1)
    write_random(tmp_path / "v1", 5000)
    v2 = write_random(tmp_path / "v2", 7000)
    first = client.store(tmp_path / "v1", "doc")
    client.store(tmp_path / "v2", "doc")
    second = client.store(tmp_path / "v2", "doc")
    assert client.fetch("doc", tmp_path / "out").read_bytes() == v2
    assert first.version_id != second.version_id
    # current and previous are kept; older versions are gone
    _reclaim.wait_reclaimed()
    for kind in ("https", "tcp"):
        stripes = sorted(servers.object_dir(kind, "doc").glob("*.stripe"))
        assert len(stripes) == 2
        assert not (servers.object_dir(kind, "doc") / f"{first.version_id}.stripe").exists()
        assert not list((servers.data_dir(kind) / "tmp").iterdir())


def test_list_stat_delete(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    data = write_random(tmp_path / "x", 3000)
    names = ["b/x.bin", "a x ü.txt", "../../etc/passwd", "n" * 1000]
    for name in names:
        client.store(tmp_path / "x", name)
    listed = client.list()
    assert [i.name for i in listed] == sorted(names)
    info = client.stat("b/x.bin")
    assert info.size == 3000
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.chunks_per_server == {"https": 2, "tcp": 1}
    assert info.bytes_per_server == {"https": 1024 + 952 + 16, "tcp": 1024}  # + the GCM tag
    assert info.committed_on == ("https", "tcp")
    client.delete("b/x.bin")
    with pytest.raises(NotFoundError):
        client.stat("b/x.bin")
    with pytest.raises(NotFoundError):
        client.delete("b/x.bin")
    assert len(client.list()) == 3
    # names never become paths on a server
    for kind in ("https", "tcp"):
        assert not (servers.data_dir(kind).parent / "etc").exists()


def test_verify_reads_everything(servers: LiveServers, client: Client, tmp_path: Path) -> None:
    write_random(tmp_path / "x", 100_000)
    client.store(tmp_path / "x", "v")
    info = client.verify("v")
    assert info.size == 100_000


def test_many_operations_on_one_client(
    servers: LiveServers, client: Client, tmp_path: Path
) -> None:
    for i in range(30):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * (i * 100))
        client.store(tmp_path / f"f{i}")
    for i in range(30):
        assert client.fetch(f"f{i}", tmp_path / f"o{i}").read_bytes() == bytes([i]) * (i * 100)
