"""The reference figure: bytes copied over one loopback TLS connection, memory to memory.

Blocking Python ssl sockets, a sender thread and a receiver thread, the setup's server
certificate (signed by its CA) and the same TLS contexts splitstore uses; no disk, no
hashing, no splitting. What splitstore does on top of moving bytes through TLS is what
separates its rate from this one.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from splitstore._setup import SetupPaths
from splitstore._tls import client_ssl_context, server_ssl_context

__all__ = ["TlsCopy", "tls_copy"]

BLOCK = 1024 * 1024
TIMEOUT = 120.0


@dataclass(frozen=True)
class TlsCopy:
    seconds: float
    version: str
    cipher: str


def tls_copy(paths: SetupPaths, total: int) -> TlsCopy:
    """Send ``total`` bytes from one thread to another over TLS on 127.0.0.1."""
    server_ctx = server_ssl_context(paths.server_cert, paths.server_key)
    client_ctx = client_ssl_context(paths.ca_cert)
    done_at: list[float] = []
    failed: list[BaseException] = []

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def receive() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(TIMEOUT)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    view = memoryview(bytearray(BLOCK))
                    got = 0
                    while got < total:
                        n = tls.recv_into(view)
                        if not n:
                            raise ConnectionError(f"the sender stopped after {got} bytes")
                        got += n
                    done_at.append(time.perf_counter())
            except BaseException as exc:
                failed.append(exc)

        receiver = threading.Thread(target=receive, name="tls-receiver", daemon=True)
        receiver.start()
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                block = memoryview(np.random.default_rng(3).bytes(BLOCK))
                start = time.perf_counter()  # after the handshake
                sent = 0
                while sent < total:
                    n = min(BLOCK, total - sent)
                    tls.sendall(block[:n])
                    sent += n
                version, cipher = tls.version() or "?", (tls.cipher() or ("?",))[0]
                receiver.join()
        finally:
            receiver.join(5)  # after an error here it is still waiting: leave it, it's a daemon
    if failed:
        raise failed[0]
    return TlsCopy(done_at[0] - start, version, cipher)
