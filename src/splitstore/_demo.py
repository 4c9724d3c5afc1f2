"""``splitstore demo``: the whole path on a throwaway setup, with nothing to prepare.

It writes a setup into a folder, starts both servers on free loopback ports in this
process, stores a sample file of a few MB, shows where its chunks went (and, with
encryption on, that neither server holds a readable byte of it or its name), fetches it
back, checks it is identical, and stops the servers.
"""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import random
import shutil
import tempfile
from pathlib import Path

from ._client import AsyncClient
from ._config import ENCRYPTION_ON, load_config
from ._errors import UsageError
from ._serve import ServerSpec, start_server
from ._setup import free_loopback_port, init_setup
from ._stripes import stripe_lengths

__all__ = ["make_sample_file", "run_demo"]


def make_sample_file(path: Path, size: int, seed: int = 2024) -> None:
    """A reproducible sample: text-like lines mixed with random binary runs."""
    rng = random.Random(seed)
    words = ["split", "store", "chunk", "stripe", "server", "https", "tcp", "manifest", "byte"]
    written = 0
    with path.open("wb") as f:
        while written < size:
            if rng.random() < 0.5:
                piece = (" ".join(rng.choice(words) for _ in range(12)) + "\n").encode()
            else:
                piece = rng.randbytes(rng.randint(100, 5000))
            piece = piece[: size - written]
            f.write(piece)
            written += len(piece)


def run_demo(
    workdir: Path | None = None, *, size_mb: float = 4.0, encryption: str = ENCRYPTION_ON
) -> int:
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="splitstore-demo-")) if workdir is None else workdir
    root = root.resolve()
    if not temporary and (root / "splitstore.toml").exists():
        # Never overwrite a real setup's token, keys and data with the demo's.
        raise UsageError(f"{root} already holds a splitstore setup; give the demo an empty folder")
    try:
        return asyncio.run(_demo(root, int(size_mb * 1024 * 1024), encryption))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


async def _demo(root: Path, size: int, encryption: str) -> int:
    mode = "encryption on" if encryption == ENCRYPTION_ON else "encryption OFF"
    print(f"1. writing a throwaway setup ({mode}) in {root}")
    paths = init_setup(
        root, https_port=free_loopback_port(), tcp_port=free_loopback_port(), encryption=encryption
    )
    config = load_config(paths.config)
    servers = []
    try:
        for server_config in config.servers:
            servers.append(await start_server(ServerSpec.from_config(server_config)))
            print(f"2. {server_config.label} started, storing in {server_config.data_dir}")

        sample = root / "sample.bin"
        make_sample_file(sample, size)
        original = _sha256(sample)
        print(f"3. storing {sample.name}: {size:,} bytes, sha256 {original[:16]}...")

        name = "demo/sample.bin"
        async with AsyncClient(config) as client:
            info = await client.store(sample, name)
            if info.scan is not None:
                engines = ", ".join(info.scan.engines)
                print(f"   scanned first, before a byte left: {info.scan.verdict} ({engines})")
            what = "encrypted " if info.encrypted else ""
            print(f"   {info.chunks:,} {what}chunks of {info.chunk_size} bytes went to:")
            object_id = client.object_id(name)
            stripes = []
            for s in config.servers:
                stripe = _stripe_path(s.data_dir or root, object_id, info.version_id)
                stripes.append(stripe)
                print(
                    f"   - the {s.kind} server: {info.chunks_per_server[s.kind]:,} chunks, "
                    f"{info.bytes_per_server[s.kind]:,} bytes in {stripe.relative_to(root)}"
                )
            if info.encrypted:
                _check_ciphertext(sample, name, stripes, [paths.https_data, paths.tcp_data])
                print(
                    "   the https stripe is ciphertext chunks 1, 3, 5, ... and the tcp stripe "
                    "2, 4, 6, ...;\n   neither holds a 32-byte run of the file, nor its name "
                    f"(the servers know it as {object_id[:16]}...)"
                )
            else:
                _check_alternation(sample, config.chunk_size, stripes)
                print("   the https stripe is chunks 1, 3, 5, ... and the tcp stripe 2, 4, 6, ...")

            restored = root / "restored.bin"
            await client.fetch(name, restored, force=True)
        fetched = _sha256(restored)
        print(f"4. fetched it back into {restored.name}: sha256 {fetched[:16]}...")
        if fetched != original or not filecmp.cmp(sample, restored, shallow=False):
            print("FAILED: the fetched file differs from the original")
            return 1
        print("5. identical, byte for byte. Stopping the servers.")
        return 0
    finally:
        for running in servers:
            await running.close()


def _stripe_path(data_dir: Path, object_id: str, version_id: str) -> Path:
    objects = data_dir / "tenants" / "default" / "objects"  # the setup's own tenant
    return objects / object_id[:2] / object_id / f"{version_id}.stripe"


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_alternation(sample: Path, chunk: int, stripes: list[Path]) -> None:
    """Show that what each server holds is exactly its chunks of the plain file."""
    data = sample.read_bytes()
    k = len(stripes)
    for i, stripe in enumerate(stripes):
        expected = b"".join(data[j : j + chunk] for j in range(i * chunk, len(data), k * chunk))
        held = stripe.read_bytes()
        if held != expected or len(held) != stripe_lengths(len(data), chunk, k)[i]:
            raise RuntimeError(f"stripe {stripe} does not hold the expected chunks")


def _check_ciphertext(sample: Path, name: str, stripes: list[Path], data_dirs: list[Path]) -> None:
    """Show that no server holds plaintext: sampled 32-byte runs of the file, or its name."""
    data = sample.read_bytes()
    step = max(1, len(data) // 64)
    runs = [data[i : i + 32] for i in range(0, max(0, len(data) - 32), step)]
    held = [stripe.read_bytes() for stripe in stripes]
    for stored in held:
        if any(run in stored for run in runs):
            raise RuntimeError("a stripe holds plaintext of the file")
    for folder in data_dirs:
        for path in folder.rglob("*"):
            if name.encode() in path.name.encode() or (
                path.is_file() and name.encode() in path.read_bytes()
            ):
                raise RuntimeError(f"{path} reveals the file's name")
