"""``init_setup``: the folder it writes, the config's contents, file modes, and --force."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from splitstore import UsageError
from splitstore._config import load_config
from splitstore._setup import (
    SetupPaths,
    generate_ca,
    init_setup,
    issue_server_cert,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """A typical umask, so expected modes do not depend on who runs the tests."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_config_loads_with_the_right_servers_and_paths(tmp_path: Path) -> None:
    paths = init_setup(tmp_path / "setup", https_port=8443, tcp_port=8444)
    root = (tmp_path / "setup").resolve()
    assert paths.root == root
    assert paths == SetupPaths.under(root)

    config = load_config(paths.config)
    assert config.chunk_size == 1024
    assert config.token_file == paths.token
    assert config.ca_file == paths.ca_cert
    assert [s.kind for s in config.servers] == ["https", "tcp"]
    https, tcp = config.servers
    assert (https.host, https.port, https.tls) == ("127.0.0.1", 8443, True)
    assert (tcp.host, tcp.port, tcp.tls) == ("127.0.0.1", 8444, True)
    assert https.data_dir == paths.https_data
    assert tcp.data_dir == paths.tcp_data
    for server in config.servers:
        assert server.cert_file == paths.server_cert
        assert server.key_file == paths.server_key
        assert server.token_file == paths.token
    assert config.token() == paths.token.read_text().strip()
    assert paths.https_data.is_dir()
    assert paths.tcp_data.is_dir()


def test_config_names_files_relative_to_its_folder(tmp_path: Path) -> None:
    paths = init_setup(tmp_path / "a")
    raw: dict[str, Any] = tomllib.loads(paths.config.read_text())
    assert raw["format"] == 1
    assert raw["token_file"] == "token"
    assert raw["ca_file"] == "tls/ca.pem"
    assert raw["servers"][0]["data_dir"] == "server_files/https"
    assert raw["servers"][1]["data_dir"] == "server_files/tcp"
    assert raw["servers"][0]["cert_file"] == "tls/server.pem"
    assert raw["servers"][0]["key_file"] == "tls/server-key.pem"
    # The config explains itself to a person.
    assert paths.config.read_text().count("#") > 10

    # A moved folder still works as a whole.
    (tmp_path / "a").rename(tmp_path / "b")
    moved = load_config(tmp_path / "b" / "splitstore.toml")
    assert moved.token_file == (tmp_path / "b" / "token").resolve()
    assert moved.server("tcp").data_dir == (tmp_path / "b" / "server_files" / "tcp").resolve()


@pytest.mark.parametrize(
    ("typo", "named"),
    [('pading = "padme"\n', "'pading'"), ("chunk-size = 4096\n", "'chunk-size'")],
)
def test_a_misspelt_setting_is_refused_not_ignored(tmp_path: Path, typo: str, named: str) -> None:
    paths = init_setup(tmp_path)
    text = paths.config.read_text()
    paths.config.write_text(text.replace("format = 1\n", "format = 1\n" + typo, 1))
    with pytest.raises(UsageError, match=f"has no setting {named}"):
        load_config(paths.config)
    paths.config.write_text(text.replace('kind = "tcp"\n', 'kind = "tcp"\nprot = 1\n', 1))
    with pytest.raises(UsageError, match="server 2: has no setting 'prot'"):
        load_config(paths.config)


def test_a_config_giving_both_servers_one_data_folder_is_refused(tmp_path: Path) -> None:
    """Their stripes of a version would have the same name and overwrite each other."""
    from splitstore._serve import config_specs

    paths = init_setup(tmp_path)
    text = paths.config.read_text().replace("server_files/tcp", "server_files/https/./")
    paths.config.write_text(text)
    config = load_config(paths.config)  # a client never looks at data_dir
    with pytest.raises(UsageError, match="data_dir of its own"):
        config_specs(config)


@pytest.mark.usefixtures("umask_022")
def test_secret_files_are_private_and_public_files_readable(tmp_path: Path) -> None:
    paths = init_setup(tmp_path)
    for secret in (paths.ca_key, paths.server_key, paths.token):
        assert _mode(secret) == 0o600, secret
    for public in (paths.ca_cert, paths.server_cert, paths.config):
        assert _mode(public) == 0o644, public
    # Nothing is left over from the atomic writes.
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.usefixtures("umask_022")
def test_secret_files_are_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and token get mode 0600 when created, not by a chmod after the data is in."""
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod used"))
    paths = init_setup(tmp_path)
    monkeypatch.undo()

    for secret in (paths.ca_key, paths.server_key, paths.token):
        opens = [c for c in created if Path(c[0]).name.startswith(f".{secret.name}.")]
        assert len(opens) == 1, secret
        _, flags, mode = opens[0]
        assert mode == 0o600
        assert flags & os.O_CREAT
        assert flags & os.O_EXCL


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    paths = init_setup(tmp_path)
    token = paths.token.read_bytes()
    with pytest.raises(UsageError, match=r"already holds a splitstore setup.*--force") as info:
        init_setup(tmp_path)
    assert "splitstore.toml" in str(info.value)
    assert "\n" not in str(info.value)
    assert paths.token.read_bytes() == token


def test_force_regenerates_secrets_but_keeps_stored_data(tmp_path: Path) -> None:
    paths = init_setup(tmp_path)
    stored = paths.https_data / "some-object"
    stored.write_bytes(b"keep me")
    (paths.tcp_data / "nested").mkdir()
    (paths.tcp_data / "nested" / "x").write_bytes(b"and me")
    old = {p: p.read_bytes() for p in (paths.token, paths.ca_cert, paths.server_key)}

    again = init_setup(tmp_path, force=True, https_port=9443, tcp_port=9444)

    assert again == paths
    assert stored.read_bytes() == b"keep me"
    assert (paths.tcp_data / "nested" / "x").read_bytes() == b"and me"
    for path, content in old.items():
        assert path.read_bytes() != content, path
    assert load_config(paths.config).server("https").port == 9443


def test_an_interrupted_setup_can_be_rerun_without_force(tmp_path: Path) -> None:
    """The config is written last, so a folder without one is not "a setup" yet."""
    paths = init_setup(tmp_path)
    paths.config.unlink()
    init_setup(tmp_path)
    assert paths.config.is_file()


@pytest.mark.parametrize(
    ("https_port", "tcp_port", "message"),
    [
        (0, 7444, "https port"),
        (7443, 65536, "tcp port"),
        (-1, 7444, "https port"),
        (True, 7444, "https port"),
        (7443, 7443, "different ports"),
    ],
)
def test_rejects_bad_ports(tmp_path: Path, https_port: int, tcp_port: int, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        init_setup(tmp_path / "s", https_port=https_port, tcp_port=tcp_port)
    assert not (tmp_path / "s").exists()


def test_accepts_edge_ports(tmp_path: Path) -> None:
    paths = init_setup(tmp_path, https_port=1, tcp_port=65535)
    assert [s.port for s in load_config(paths.config).servers] == [1, 65535]


@pytest.mark.parametrize("name", ["bad name", "under_score.example", "-x.example", "a..b", ""])
def test_rejects_bad_host_names_before_writing(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        init_setup(tmp_path / "s", extra_hostnames=[name])
    assert not (tmp_path / "s").exists()


def test_rejects_a_file_where_the_folder_should_be(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        init_setup(target)


def test_rejects_a_file_where_a_data_folder_should_be(tmp_path: Path) -> None:
    (tmp_path / "server_files").mkdir()
    (tmp_path / "server_files" / "tcp").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        init_setup(tmp_path)


def test_server_certificate_names_and_extensions(tmp_path: Path) -> None:
    paths = init_setup(
        tmp_path, extra_hostnames=["Files.Example.internal", "10.1.2.3", "[fd00::1]"]
    )
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())

    assert _sans(cert) == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("files.example.internal"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("fd00::1")),
    ]
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical
    assert (ca_bc.value.ca, ca_bc.value.path_length) == (True, 0)
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign
    assert ca_ku.crl_sign
    assert not ca_ku.digital_signature

    now = dt.datetime.now(dt.UTC)
    for c in (ca, cert):
        assert c.not_valid_before_utc < now - dt.timedelta(minutes=50)
    assert ca.not_valid_after_utc - now > dt.timedelta(days=3649)
    assert dt.timedelta(days=824) < cert.not_valid_after_utc - now <= dt.timedelta(days=825)

    for key_file, c in ((paths.ca_key, ca), (paths.server_key, cert)):
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == c.public_key()


@pytest.mark.parametrize(
    ("host", "kept"),
    [("192.168.7.7", "192.168.7.7"), ("files.lan", "files.lan"), ("[fd00::7]", "fd00::7")],
)
def test_the_configured_host_is_in_the_certificate(tmp_path: Path, host: str, kept: str) -> None:
    paths = init_setup(tmp_path, host=host)
    assert load_config(paths.config).server("https").host == kept
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    assert kept in [str(name.value) for name in _sans(cert)]


@pytest.mark.parametrize(
    ("host", "says"),
    [("two words", "host name or IP"), ("0.0.0.0", "no client"), ("[::]", "no client")],
)
def test_rejects_a_host_no_client_can_use(tmp_path: Path, host: str, says: str) -> None:
    """A wildcard address is one to listen on, not to connect to: a config with it could
    not be used (and no certificate names it)."""
    with pytest.raises(UsageError, match=says):
        init_setup(tmp_path / "setup", host=host)
    assert not (tmp_path / "setup").exists()


def test_issue_server_cert_with_a_separate_ca() -> None:
    ca = generate_ca("test CA")
    issued = issue_server_cert(ca.cert_pem, ca.key_pem, hostnames=["wrong.example"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert _sans(cert) == [x509.DNSName("wrong.example")]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))


def test_issue_server_cert_rejects_a_bad_ca() -> None:
    with pytest.raises(UsageError, match="cannot issue"):
        issue_server_cert(b"not pem", b"not pem")
