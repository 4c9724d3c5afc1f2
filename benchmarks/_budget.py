"""The CPU budget of a large store and fetch: the steps the design cannot skip.

Each step is timed alone, on one core, in this process, through splitstore's own code
where it has one (sealing, opening, splitting, joining) and through the same TLS
contexts the servers use (one stream, through memory, so no socket is involved). Added
up per GiB, they are the least CPU a store or fetch can take however well the rest is
written; set beside the CPU the real runs used, they say how much of it is overhead,
and whether a target can be reached on this machine's cores at all. fsync and the disk
are left out: only CPU is counted. Each figure is the best of a few tries, the one least
disturbed by whatever else the machine is doing, and each is CPU time (the thread's
own), not wall time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from splitstore._crypto import PayloadCipher
from splitstore._digest import new_stripe_hasher
from splitstore._direct import DIRECT_BLOCK_BYTES, DirectReader, DirectStage
from splitstore._payload import PLAIN_BLOCK_BYTES, StreamOpener, StreamSealer
from splitstore._setup import SetupPaths
from splitstore._stripes import join_block, split_block
from splitstore._tls import client_ssl_context, server_ssl_context

__all__ = ["FETCH_STEPS", "STORE_STEPS", "cpu_budget"]

#: Times one or more steps over a number of blocks: {step: seconds}.
Measure = Callable[[int], dict[str, float]]

BLOCK = PLAIN_BLOCK_BYTES  # what the client seals, splits and hands on at a time
TRIES = 3
GIB = 2**30
CHUNK, SERVERS = 1024, 2

# What each byte of a file goes through (encryption on), in order, and where.
STORE_STEPS = [
    ("read", "client reads the file"),
    ("sha256", "client hashes the file"),
    ("seal", "client seals it (AES-256-GCM, 64 KiB segments)"),
    ("split", "client splits it into stripes"),
    ("stripe_digest", "client hashes the stripes (BLAKE3)"),
    ("tls_encrypt", "client sends (TLS)"),
    ("tls_decrypt", "servers receive (TLS)"),
    ("stripe_digest", "servers hash their stripes (BLAKE3)"),
    ("direct_write", "servers write"),
]
FETCH_STEPS = [
    ("direct_read", "servers read"),
    ("tls_encrypt", "servers send (TLS)"),
    ("tls_decrypt", "client receives (TLS)"),
    ("join", "client joins the stripes"),
    ("open", "client opens the segments (their tags check every byte: no hash)"),
    ("direct_write", "client writes it"),
]
STEP_LABELS = {
    "read": "read from the page cache",
    "sha256": "SHA-256",
    "stripe_digest": "stripe digest (BLAKE3)",
    "seal": "seal (AES-256-GCM)",
    "open": "open (AES-256-GCM)",
    "split": "split into two stripes",
    "join": "join two stripes",
    "tls_encrypt": "TLS encrypt",
    "tls_decrypt": "TLS decrypt",
    "direct_read": "read past the page cache (O_DIRECT)",
    "direct_write": "write past the page cache (O_DIRECT)",
}


def cpu_budget(paths: SetupPaths, big: Path, work: Path, amount: int) -> dict[str, Any]:
    """Per-step MB/s on one core over ``amount`` bytes, and the sums per GiB."""
    blocks = max(1, amount // BLOCK)
    rates: dict[str, float] = {}
    for measure in _steps(paths, big, work):
        for _ in range(TRIES):
            for name, seconds in measure(blocks).items():
                rates[name] = max(rates.get(name, 0.0), blocks * BLOCK / seconds / 1e6)
    out: dict[str, Any] = {"bytes_per_try": blocks * BLOCK, "step_mb_s": rates}
    for op, steps in (("store", STORE_STEPS), ("fetch", FETCH_STEPS)):
        seconds = sum(GIB / (rates[name] * 1e6) for name, _ in steps)
        out[op] = {"steps": [name for name, _ in steps], "cpu_seconds_per_gib": seconds}
    return out


def _steps(paths: SetupPaths, big: Path, work: Path) -> list[Measure]:
    """Functions of a block count that return the seconds each step took."""
    data = os.urandom(BLOCK)
    cipher = PayloadCipher(os.urandom(32), "ab" * 32, "cd" * 16)
    sealed = bytearray(StreamSealer.sealed_size(BLOCK))
    StreamSealer(cipher, BLOCK).seal_into(memoryview(data), memoryview(sealed))
    pieces = split_block(data, CHUNK, SERVERS)
    joined = bytearray()

    def timed(body: Callable[[], object], blocks: int) -> float:
        start = time.thread_time()  # CPU time: what the machine's other work takes is not
        for _ in range(blocks):
            body()
        return time.thread_time() - start

    def sha256(blocks: int) -> float:
        h = hashlib.sha256()
        return timed(lambda: h.update(data), blocks)

    def stripe_digest(blocks: int) -> float:
        h = new_stripe_hasher()

        def both() -> None:  # a block's stripe pieces, as a store feeds them
            for piece in pieces:
                h.update(piece)

        return timed(both, blocks)

    def seal(blocks: int) -> float:
        out = memoryview(bytearray(len(sealed)))
        # A one-block stream each time: the same segments and nonces as a long one.
        return timed(lambda: StreamSealer(cipher, BLOCK).seal_into(memoryview(data), out), blocks)

    def open_(blocks: int) -> float:
        view = memoryview(sealed)
        return timed(lambda: StreamOpener(cipher, len(sealed)).feed(view), blocks)

    def read(blocks: int) -> float:
        buf = memoryview(bytearray(BLOCK))
        if big.stat().st_size == 0:
            raise ValueError("the test file is empty")
        with big.open("rb", buffering=0) as f:

            def one() -> None:  # a whole block, from the start again at the end
                got = 0
                while got < BLOCK:
                    n = f.readinto(buf[got:])
                    if n:
                        got += n
                    else:
                        f.seek(0)

            return timed(one, blocks)

    def direct_read(blocks: int) -> float:
        # How the servers read a large stripe: the disk's time is not CPU and not counted.
        # Where the system has no O_DIRECT, the ordinary read they then do instead.
        with big.open("rb") as f:
            reader = DirectReader.start(f)
            read = reader.read if reader is not None else f.read
            try:

                def one() -> None:  # a whole block, from the start again at the end
                    got = 0
                    while got < BLOCK:
                        n = len(read(min(DIRECT_BLOCK_BYTES, BLOCK - got)))
                        if n:
                            got += n
                        elif reader is not None:
                            reader.rewind()
                        else:
                            f.seek(0)

                return timed(one, blocks)
            finally:
                if reader is not None:
                    reader.close()

    def direct_write(blocks: int) -> float:
        # How a large stripe or fetched file is written once it proves large (or, where
        # the system has no O_DIRECT, the ordinary write done instead).
        target = work / "budget-direct.tmp"
        try:
            with target.open("wb", buffering=0) as f:
                stage = DirectStage.start(f.fileno())
                if stage is None:
                    return timed(lambda: f.write(data), blocks)
                view = memoryview(data)
                seconds = timed(lambda: stage.write(view), blocks)
                start = time.thread_time()
                stage.close()  # the last block and the tail: part of the cost
                return seconds + time.thread_time() - start
        finally:
            target.unlink(missing_ok=True)

    def split(blocks: int) -> float:
        return timed(lambda: split_block(data, CHUNK, SERVERS), blocks)

    def join(blocks: int) -> float:
        return timed(lambda: join_block(pieces, CHUNK, joined), blocks)

    def one(name: str, step: Callable[[int], float]) -> Measure:
        return lambda blocks: {name: step(blocks)}

    def tls(blocks: int) -> dict[str, float]:
        encrypt, decrypt = _tls(paths, data, blocks)
        return {"tls_encrypt": encrypt, "tls_decrypt": decrypt}

    steps = {"read": read, "sha256": sha256, "stripe_digest": stripe_digest}
    steps.update(seal=seal, open=open_)
    steps.update(split=split, join=join)
    steps.update(direct_read=direct_read, direct_write=direct_write)
    return [*(one(name, step) for name, step in steps.items()), tls]


def _tls(paths: SetupPaths, data: bytes, blocks: int) -> tuple[float, float]:
    """Seconds to encrypt, and to decrypt, ``blocks`` blocks over one TLS connection."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ssl_context(paths.ca_cert).wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server_ctx = server_ssl_context(paths.server_cert, paths.server_key)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # the handshake, both ways through memory
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    if client.version() is None:
        raise RuntimeError("the TLS handshake through memory did not finish")
    encrypt = decrypt = 0.0
    buf = memoryview(bytearray(BLOCK))
    for _ in range(blocks):
        start = time.thread_time()
        client.write(data)
        records = c_out.read()
        encrypt += time.thread_time() - start
        start = time.thread_time()
        s_in.write(records)
        got = 0
        while got < BLOCK:
            # With a buffer, read returns the count (typeshed only knows the bytes form).
            got += cast(int, server.read(BLOCK - got, buf[got:]))
        decrypt += time.thread_time() - start
    return encrypt, decrypt
