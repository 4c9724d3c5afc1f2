"""``splitstore init``: a ready-to-run setup folder with config, local CA, certificate and token.

The folder holds everything both servers and the client need, with the config naming
files by relative path so the folder can be moved as a whole::

    splitstore.toml        the config (written last: its presence marks a complete setup)
    token                  the setup's access token (mode 0600)
    tenants.toml           who may use the servers: tenant "default" (this setup's token)
                           and any added with 'splitstore tenant add', as token hashes
    key                    the master key that encrypts every stored file (mode 0600);
                           without it nothing stored can be read: back it up
    tls/ca.pem             the local CA the client trusts
    tls/ca-key.pem         its private key (mode 0600; only needed to issue new certs)
    tls/server.pem         the servers' certificate, signed by the CA
    tls/server-key.pem     its private key (mode 0600)
    server_files/https     what the HTTPS server stores
    server_files/tcp       what the TCP server stores

Every file is written atomically, and secret files are created with mode 0600 from the
start, so there is no moment when a key is readable by others or half written.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._config import ENCRYPTION_MODES, ENCRYPTION_ON
from ._errors import UsageError
from ._keys import create_key_file
from ._tenants import SINGLE_TENANT, put_tenant, read_tenants

__all__ = [
    "DEFAULT_HOSTNAMES",
    "CertAndKey",
    "SetupPaths",
    "free_loopback_port",
    "generate_ca",
    "init_setup",
    "issue_server_cert",
]

CONFIG_NAME = "splitstore.toml"
DEFAULT_HOSTNAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY = dt.timedelta(days=3650)
# 825 days is the longest lifetime Apple platforms accept for a TLS server certificate.
SERVER_VALIDITY = dt.timedelta(days=825)
# Tolerates a client clock that is a little behind the machine that ran init.
BACKDATE = dt.timedelta(hours=1)

_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644
_PRIVATE_DIR_MODE = 0o700
# One DNS label (or a leading "*" wildcard label); names are checked label by label.
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class SetupPaths:
    """Where ``init_setup`` put each part of the setup (absolute paths)."""

    root: Path
    config: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    token: Path
    key: Path
    https_data: Path
    tcp_data: Path
    tenants: Path

    @classmethod
    def under(cls, root: Path) -> SetupPaths:
        """The standard layout inside ``root``."""
        tls = root / "tls"
        return cls(
            root=root,
            config=root / CONFIG_NAME,
            ca_cert=tls / "ca.pem",
            ca_key=tls / "ca-key.pem",
            server_cert=tls / "server.pem",
            server_key=tls / "server-key.pem",
            token=root / "token",
            key=root / "key",
            https_data=root / "server_files" / "https",
            tcp_data=root / "server_files" / "tcp",
            tenants=root / "tenants.toml",
        )


class CertAndKey(NamedTuple):
    """A PEM certificate and its unencrypted PKCS#8 PEM private key."""

    cert_pem: bytes
    key_pem: bytes


def init_setup(
    directory: Path,
    *,
    https_port: int = 7443,
    tcp_port: int = 7444,
    host: str = "127.0.0.1",
    force: bool = False,
    extra_hostnames: Sequence[str] = (),
    encryption: str = ENCRYPTION_ON,
    passphrase: str | None = None,
) -> SetupPaths:
    """Create (or with ``force``, regenerate) a setup in ``directory``.

    ``host`` is where both servers listen and the client connects; it is added to the
    certificate's names (a wildcard address such as 0.0.0.0 is refused: no client can
    connect to it). With ``force``,
    the config, TLS keys, certificates and token are replaced; stored data and an
    existing master key are never touched (a new key would make every stored file
    unreadable). ``passphrase`` derives the master key from a passphrase (scrypt)
    instead of making a random one. Raises UsageError for bad arguments or an existing
    setup without ``force``.
    """
    if encryption not in ENCRYPTION_MODES:
        raise UsageError(f"encryption must be one of {', '.join(ENCRYPTION_MODES)}")
    _check_port(https_port, "https port")
    _check_port(tcp_port, "tcp port")
    if https_port == tcp_port:
        raise UsageError(f"the https and tcp servers need different ports (both are {https_port})")
    host = _checked_host(host)
    hostnames = [*DEFAULT_HOSTNAMES, *extra_hostnames, host]
    # Validate names before touching the disk, so a typo leaves nothing behind.
    alt_names = _subject_alt_names(hostnames)

    root = Path(os.path.abspath(directory))
    paths = SetupPaths.under(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder")
    if (paths.config.exists() or paths.config.is_symlink()) and not force:
        raise UsageError(
            f"{root} already holds a splitstore setup ({CONFIG_NAME}); use --force to overwrite"
        )
    read_tenants(paths.tenants)  # a broken tenants file stops init before anything changes
    if passphrase is not None and paths.key.exists():
        # The key is never replaced (stored files need it): a passphrase would be ignored.
        raise UsageError(
            f"{root} already has a master key ({paths.key.name}), which init keeps (stored "
            "files need it): --passphrase would make a new one; leave --passphrase out"
        )

    ca = generate_ca()
    server = _issue(ca, alt_names)
    token = secrets.token_urlsafe(32)

    try:
        root.mkdir(parents=True, exist_ok=True)
        _make_dir(paths.ca_cert.parent, _PRIVATE_DIR_MODE)
        for data_dir in (paths.https_data, paths.tcp_data):
            _make_dir(data_dir.parent, _PRIVATE_DIR_MODE)
            _make_dir(data_dir, _PRIVATE_DIR_MODE)
        _write_atomic(paths.ca_key, ca.key_pem, _SECRET_MODE)
        _write_atomic(paths.ca_cert, ca.cert_pem, _PUBLIC_MODE)
        _write_atomic(paths.server_key, server.key_pem, _SECRET_MODE)
        _write_atomic(paths.server_cert, server.cert_pem, _PUBLIC_MODE)
        _write_atomic(paths.token, (token + "\n").encode("ascii"), _SECRET_MODE)
        # Tenants added since an earlier init stay; only this setup's own gets the new token.
        put_tenant(paths.tenants, SINGLE_TENANT, token)
        if encryption == ENCRYPTION_ON and not paths.key.exists():
            create_key_file(paths.key, passphrase=passphrase)
        config_text = render_config(
            paths, host=host, https_port=https_port, tcp_port=tcp_port, encryption=encryption
        )
        _write_atomic(paths.config, config_text.encode("utf-8"), _PUBLIC_MODE)
    except OSError as exc:
        where = exc.filename or root
        raise UsageError(f"cannot write the setup in {root}: {where}: {exc.strerror}") from exc
    return paths


def generate_ca(
    common_name: str | None = None,
    *,
    now: dt.datetime | None = None,
    validity: dt.timedelta = CA_VALIDITY,
) -> CertAndKey:
    """A new self-signed CA that may sign server certificates but not other CAs.

    The default name carries a random suffix, so CAs from different setups are told
    apart in error messages and certificate viewers.
    """
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitstore"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, common_name or f"splitstore local CA {secrets.token_hex(4)}"
            ),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_server_cert(
    ca_cert: bytes,
    ca_key: bytes,
    hostnames: Iterable[str] = DEFAULT_HOSTNAMES,
    *,
    now: dt.datetime | None = None,
    validity: dt.timedelta = SERVER_VALIDITY,
) -> CertAndKey:
    """A TLS server certificate for ``hostnames`` (DNS names or IP addresses), signed by
    the CA given as PEM bytes. Raises UsageError for a name that cannot be used."""
    try:
        ca = CertAndKey(ca_cert, ca_key)
        return _issue(ca, _subject_alt_names(hostnames), now=now, validity=validity)
    except (ValueError, TypeError) as exc:  # bad PEM, or an encrypted CA key
        raise UsageError(f"cannot issue a server certificate: {exc}") from exc


def render_config(
    paths: SetupPaths,
    *,
    host: str,
    https_port: int,
    tcp_port: int,
    encryption: str = ENCRYPTION_ON,
) -> str:
    """The commented config text for ``paths``, naming files relative to ``paths.root``."""

    def rel(path: Path) -> str:
        return _toml_string(path.relative_to(paths.root).as_posix())

    def server(kind: str, port: int, data_dir: Path) -> str:
        return (
            "[[servers]]\n"
            f"kind = {_toml_string(kind)}\n"
            f"host = {_toml_string(host)}\n"
            f"port = {port}\n"
            "tls = true\n"
            f"data_dir = {rel(data_dir)}\n"
            f"cert_file = {rel(paths.server_cert)}\n"
            f"key_file = {rel(paths.server_key)}\n"
            f"tenants_file = {rel(paths.tenants)}\n"
        )

    return (
        "# splitstore configuration, written by 'splitstore init'.\n"
        "# The client and both servers read this file. Relative paths are relative to the\n"
        "# folder this file is in, so the whole folder can be moved together.\n"
        "\n"
        "# Version of this file's layout; 1 is the only one so far.\n"
        "format = 1\n"
        "\n"
        "# Files are cut into chunks of this many bytes (1 to 16777216), and each chunk is\n"
        "# placed on one of the two servers.\n"
        "chunk_size = 1024\n"
        "\n"
        "# The access token: the client sends it and both servers require it. Keep this\n"
        "# file private; anyone who has it can read and change what is stored.\n"
        f"token_file = {rel(paths.token)}\n"
        "\n"
        + _encryption_section(paths, encryption, rel)
        + "# The certificate authority the client trusts for both servers; nothing else is\n"
        "# trusted. Remove this line to trust the system's CAs instead.\n"
        f"ca_file = {rel(paths.ca_cert)}\n"
        "\n"
        "# Optional: seconds to wait for a connection, and for each read or write (and\n"
        "# for a whole request and its reply, but for what streams: stripes, listings).\n"
        "# connect_timeout = 10.0\n"
        "# io_timeout = 60.0\n"
        "\n"
        "# The servers, in this order: the HTTPS server, then the TCP server.\n"
        '#   kind       which server this is: "https" or "tcp"\n'
        "#   host       the address the server listens on and the client connects to\n"
        "#   port       the TCP port for that server; the two must differ\n"
        "#   tls        encrypt the connection (the https server always does; for the tcp\n"
        "#              server, false sends data and token in the clear)\n"
        "#   data_dir   the folder where the server keeps what it stores\n"
        "#   cert_file  the certificate the server presents, signed by ca_file\n"
        "#   key_file   that certificate's private key; keep it private\n"
        "#   tenants_file  who may use the server: each tenant's token hash and quota,\n"
        "#              re-read when it changes (edit it with 'splitstore tenant ...')\n"
        "\n"
        + server("https", https_port, paths.https_data)
        + "\n"
        + server("tcp", tcp_port, paths.tcp_data)
        + "\n"
        + _SCAN_SECTION
    )


# Commented out: the defaults apply (see docs/scanning.md).
_SCAN_SECTION = """\
# Malicious-file checks, run here before a file is stored and before a fetched one is
# delivered (the servers only see ciphertext). On by default; uncomment to change.
# [scan]
# enabled = true
# hash_lists = ["bad-hashes.txt"]      # more known-bad SHA-256s, one a line
# yara_rules = ["my-rules.yar"]        # more YARA rules
# clamd = "unix:/run/clamav/clamd.ctl" # also ask ClamAV (or "tcp:127.0.0.1:3310")
# [scan.policy]                        # per category: "block", "warn" or "allow"
# macro = "block"
# blocked_types = ["application/x-dosexec"]
"""


def _encryption_section(paths: SetupPaths, encryption: str, rel: Callable[[Path], str]) -> str:
    if encryption != ENCRYPTION_ON:
        return (
            "# End-to-end encryption is OFF: the servers hold the file's own bytes and can\n"
            "# read them. Only for inspection and teaching; 'splitstore init' turns it on.\n"
            'encryption = "none"\n'
            "\n"
        )
    return (
        "# End-to-end encryption: files and their names are encrypted here, before they\n"
        "# leave this machine, with the master key in key_file. Without that key nothing\n"
        "# stored can be read: back it up ('splitstore key export').\n"
        f'encryption = "{ENCRYPTION_ON}"\n'
        f"key_file = {rel(paths.key)}\n"
        "\n"
        "# Optional: pad each file's size up (Padme, at most ~12%) so servers learn less\n"
        '# from sizes. One of "none" or "padme".\n'
        '# padding = "padme"\n'
        "\n"
        "# Optional: where this client remembers the newest version it has seen of each\n"
        "# file, to notice a server that serves an older one. Default: beside this file.\n"
        '# state_file = "splitstore.state"\n'
        "\n"
    )


def _issue(
    ca: CertAndKey,
    alt_names: Sequence[x509.GeneralName],
    *,
    now: dt.datetime | None = None,
    validity: dt.timedelta = SERVER_VALIDITY,
) -> CertAndKey:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    first = alt_names[0].value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitstore"),
            x509.NameAttribute(NameOID.COMMON_NAME, str(first)),
        ]
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:  # a CA made elsewhere may lack one
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        # Never outlive the CA: a chain is only as valid as its shortest link.
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return CertAndKey(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _subject_alt_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hostnames`` in order, without repeats; IPs become IP entries."""
    names: list[x509.GeneralName] = []
    for raw in hostnames:
        name = raw.strip()
        entry: x509.GeneralName
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            entry = x509.DNSName(_dns_name(name))
        else:
            entry = x509.IPAddress(address)
        if entry not in names:
            names.append(entry)
    if not names:
        raise UsageError("a server certificate needs at least one host name")
    return names


def _dns_name(name: str) -> str:
    """``name`` as certificates spell it (lower case, IDNA for non-ASCII), or UsageError."""
    try:
        ascii_name = name.encode("idna").decode("ascii").lower().rstrip(".")
    except UnicodeError as exc:
        raise UsageError(f"{name!r} is not a valid host name") from exc
    labels = ascii_name.split(".")
    if labels and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if not ascii_name or len(ascii_name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
        raise UsageError(f"{name!r} is not a valid host name")
    return ascii_name


def _check_port(port: int, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise UsageError(f"the {what} must be a whole number from 1 to 65535, not {port!r}")


def _checked_host(host: str) -> str:
    """The host both servers listen on and the client connects to, as the config keeps
    it: an IPv6 address without brackets, and never a wildcard address."""
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise UsageError(f"the host must be a host name or IP address, not {host!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    if unspecified:
        raise UsageError(
            f"{host} means every address to listen on, but no client can connect to it: give "
            "the host name or address clients use (it goes into the certificate); to listen "
            f"on every address, run each server alone with 'splitstore serve https|tcp --host "
            f"{host} ...' (README: 'Running each server on its own machine')"
        )
    return host


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, and no lone surrogates
    # can reach here because the text is later encoded as UTF-8).
    return json.dumps(value, ensure_ascii=False)


def _make_dir(path: Path, mode: int) -> None:
    """Create ``path`` if missing; an existing folder (and its contents) is left alone."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a folder") from None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` so readers see the old file or the new one, never
    a partial one; the file is created with ``mode`` (less the umask) from the start."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; some systems cannot open folders, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Ports handed out by free_loopback_port in this process: the kernel may offer a port
# again as soon as its probe socket closes, and a setup needs two different ones.
_handed_out: set[int] = set()


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for throwaway setups (demo, tests, benchmarks).

    Never the same port twice in one process.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
