"""TLS contexts against a real loopback TLS server, and the text for TLS failures."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from splitstore import ConfigError, ServerUnavailableError
from splitstore._setup import SetupPaths, generate_ca, init_setup, issue_server_cert
from splitstore._tls import (
    client_ssl_context,
    describe_ssl_error,
    find_ssl_error,
    server_ssl_context,
)

LOOPBACK = "127.0.0.1"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SetupPaths:
    return init_setup(tmp_path_factory.mktemp("setup"))


@pytest.fixture(scope="module")
def wrong_name_cert(setup: SetupPaths, tmp_path_factory: pytest.TempPathFactory) -> SetupPaths:
    """A certificate from the right CA, but for a name the client never asks for."""
    issued = issue_server_cert(
        setup.ca_cert.read_bytes(), setup.ca_key.read_bytes(), hostnames=["wrong.example"]
    )
    folder = tmp_path_factory.mktemp("wrong")
    (folder / "cert.pem").write_bytes(issued.cert_pem)
    (folder / "key.pem").write_bytes(issued.key_pem)
    return dataclasses.replace(
        setup, server_cert=folder / "cert.pem", server_key=folder / "key.pem"
    )


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("other") / "ca.pem"
    path.write_bytes(generate_ca("some other CA").cert_pem)
    return path


Client = Callable[[int], Awaitable[object]]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.read(100))
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _plain_http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers anything with plain-text HTTP, as a server without TLS would."""
    try:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _serve(
    server_context: ssl.SSLContext | None, client: Client, handler: Handler = _echo_handler
) -> object:
    """Run ``client(port)`` against a loopback server; return what it returned."""

    async def main() -> object:
        server = await asyncio.start_server(handler, LOOPBACK, 0, ssl=server_context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.wait_for(client(port), TIMEOUT)

    return asyncio.run(main())


def _echo(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str
) -> bytes:
    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=client_context, server_hostname=server_hostname
        )
        try:
            writer.write(b"ping")
            await writer.drain()
            return await reader.read(100)
        finally:
            writer.close()
            await writer.wait_closed()

    result = _serve(server_context, client)
    assert isinstance(result, bytes)
    return result


def _server_context(paths: SetupPaths) -> ssl.SSLContext:
    return server_ssl_context(paths.server_cert, paths.server_key)


@pytest.mark.parametrize("name", [LOOPBACK, "localhost"])
def test_client_trusts_the_setup_ca(setup: SetupPaths, name: str) -> None:
    assert _echo(_server_context(setup), client_ssl_context(setup.ca_cert), name) == b"ping"


def test_setup_certificates_pass_strict_checks(setup: SetupPaths) -> None:
    """Python 3.13 turns on VERIFY_X509_STRICT by default; our chain must already pass."""
    client = client_ssl_context(setup.ca_cert)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    assert _echo(_server_context(setup), client, "localhost") == b"ping"


def test_a_different_ca_is_not_trusted(setup: SetupPaths, other_ca: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _echo(_server_context(setup), client_ssl_context(other_ca), LOOPBACK)
    text = describe_ssl_error(info.value)
    assert text == "its certificate is not signed by a CA this client trusts (see ca_file)"
    assert f"cannot trust the https server at {LOOPBACK}:7443: {text}".count("\n") == 0


def test_the_system_store_does_not_trust_the_setup_ca(setup: SetupPaths) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _echo(_server_context(setup), client_ssl_context(None), "localhost")
    assert "not signed by a CA this client trusts" in describe_ssl_error(info.value)


@pytest.mark.parametrize("name", [LOOPBACK, "localhost"])
def test_a_certificate_for_another_name_is_refused(
    setup: SetupPaths, wrong_name_cert: SetupPaths, name: str
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _echo(_server_context(wrong_name_cert), client_ssl_context(setup.ca_cert), name)
    assert describe_ssl_error(info.value) == (
        f"its certificate does not match the host name '{name}'"
    )


def test_describe_finds_the_ssl_error_behind_a_wrapper(
    setup: SetupPaths, wrong_name_cert: SetupPaths
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        _echo(_server_context(wrong_name_cert), client_ssl_context(setup.ca_cert), "localhost")
    wrapped = ServerUnavailableError("failed")
    wrapped.__cause__ = info.value
    assert find_ssl_error(wrapped) is info.value
    assert "does not match the host name 'localhost'" in describe_ssl_error(wrapped)


def test_describe_unwraps_aiohttp_errors(setup: SetupPaths, other_ca: Path) -> None:
    """The https client is aiohttp, which wraps the ssl error in its own exception."""

    async def client(port: int) -> object:
        async with aiohttp.ClientSession() as session:
            url = f"https://{LOOPBACK}:{port}/"
            async with session.get(url, ssl=client_ssl_context(other_ca)) as response:
                return response.status

    with pytest.raises(aiohttp.ClientError) as info:
        _serve(_server_context(setup), client)
    assert isinstance(find_ssl_error(info.value), ssl.SSLCertVerificationError)
    assert "not signed by a CA this client trusts" in describe_ssl_error(info.value)


def test_describe_a_server_that_does_not_speak_tls(setup: SetupPaths) -> None:
    async def client(port: int) -> object:
        _, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=client_ssl_context(setup.ca_cert), server_hostname="localhost"
        )
        writer.close()
        return None

    with pytest.raises(ssl.SSLError) as info:
        _serve(None, client, _plain_http_handler)
    text = describe_ssl_error(info.value)
    assert "TLS" in text
    assert "\n" not in text


def test_describe_ssl_errors_built_in_python() -> None:
    """aiohttp builds its own ssl error subclasses, without reason or verify_code."""
    assert describe_ssl_error(ssl.SSLError(1, "boom")) == "TLS failed: boom"
    assert describe_ssl_error(ssl.SSLCertVerificationError(1, "bad")) == (
        "certificate verify failed: bad"
    )
    assert describe_ssl_error(ssl.SSLEOFError(8, "eof")).startswith("it closed")


def test_describe_other_errors() -> None:
    assert describe_ssl_error(ConnectionRefusedError("refused")) == "refused"
    assert describe_ssl_error(ValueError()) == "ValueError"
    assert find_ssl_error(ValueError()) is None


def test_contexts_require_tls_1_2_and_verification(setup: SetupPaths) -> None:
    server = _server_context(setup)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    for client in (client_ssl_context(setup.ca_cert), client_ssl_context(None)):
        assert client.minimum_version == ssl.TLSVersion.TLSv1_2
        assert client.verify_mode == ssl.CERT_REQUIRED
        assert client.check_hostname


# --- ConfigError for bad files -------------------------------------------------------


def _one_line_config_error(match: str, call: Callable[[], object]) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_server_context_missing_files(setup: SetupPaths, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    message = _one_line_config_error(
        "does not exist", lambda: server_ssl_context(missing, setup.server_key)
    )
    assert str(missing) in message
    _one_line_config_error(
        "key file .* does not exist", lambda: server_ssl_context(setup.server_cert, missing)
    )
    _one_line_config_error("cannot read", lambda: server_ssl_context(tmp_path, setup.server_key))


def test_server_context_invalid_pem(setup: SetupPaths, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    _one_line_config_error("not valid PEM", lambda: server_ssl_context(garbage, setup.server_key))
    _one_line_config_error("not valid PEM", lambda: server_ssl_context(setup.server_cert, garbage))


def test_server_context_key_of_another_certificate(setup: SetupPaths, tmp_path: Path) -> None:
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(generate_ca().key_pem)
    _one_line_config_error(
        "does not belong", lambda: server_ssl_context(setup.server_cert, other_key)
    )


def test_server_context_encrypted_key_does_not_prompt(setup: SetupPaths, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(setup.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    _one_line_config_error("encrypted", lambda: server_ssl_context(setup.server_cert, encrypted))


def test_client_context_bad_ca_file(tmp_path: Path) -> None:
    _one_line_config_error("CA file .* does not exist", lambda: client_ssl_context(tmp_path / "x"))
    _one_line_config_error("cannot read CA file", lambda: client_ssl_context(tmp_path))
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello\n")
    _one_line_config_error("no valid PEM certificate", lambda: client_ssl_context(garbage))
