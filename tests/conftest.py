"""Fixtures: real servers on loopback ports, in a background event loop of this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from splitstore import Client, Config, load_config
from splitstore._keyring import Keyring
from splitstore._keys import load_master_key
from splitstore._serve import RunningServer, ServerSpec, start_server
from splitstore._service import ServerLimits
from splitstore._setup import SetupPaths, init_setup
from splitstore._setup import free_loopback_port as free_port

from .clamd_daemon import clamd_address, clamd_process, clamd_socket

__all__ = ["clamd_address", "clamd_process", "clamd_socket"]  # session fixtures, for pytest

T = TypeVar("T")

# Short enough that time-out tests finish quickly, long enough for a loaded CI machine.
TEST_LIMITS = ServerLimits(handshake_timeout=2.0, idle_timeout=3.0)


class LoopThread:
    """An event loop running in a daemon thread, for servers the tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_leftovers() -> None:
            # Handler tasks of connections that outlived their test: end them quietly.
            # Ending one may start another (a server's upload clean-up runs as a task of
            # its own), so go round until none is left.
            for _ in range(10):
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not tasks:
                    return
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class LiveServers:
    """Both servers of a fresh setup, each of which a test can stop and start again."""

    def __init__(
        self,
        root: Path,
        loop: LoopThread,
        limits: ServerLimits = TEST_LIMITS,
        encryption: str = "aes-256-gcm",
    ) -> None:
        self.paths: SetupPaths = init_setup(
            root, https_port=free_port(), tcp_port=free_port(), encryption=encryption
        )
        self.config: Config = load_config(self.paths.config)
        key = self.config.key_file
        self.keyring = Keyring(load_master_key(key) if key is not None else None)
        self.loop = loop
        self.limits = limits
        self.running: dict[str, RunningServer] = {}

    @property
    def config_path(self) -> Path:
        return self.paths.config

    def spec(self, kind: str) -> ServerSpec:
        return ServerSpec.from_config(self.config.server(kind))  # type: ignore[arg-type]

    def start(self, kind: str | None = None) -> None:
        for server in self.config.servers:
            if kind in (None, server.kind) and server.kind not in self.running:
                spec = ServerSpec.from_config(server)
                self.running[server.kind] = self.loop.run(start_server(spec, self.limits))

    def stop(self, kind: str | None = None) -> None:
        for name in list(self.running):
            if kind in (None, name):
                self.loop.run(self.running.pop(name).close())

    def data_dir(self, kind: str) -> Path:
        data_dir = self.config.server(kind).data_dir  # type: ignore[arg-type]
        assert data_dir is not None
        return data_dir

    def object_dir(self, kind: str, name: str) -> Path:
        oid = self.keyring.object_id(name)
        return self.data_dir(kind) / "tenants" / "default" / "objects" / oid[:2] / oid

    def stripe_path(self, kind: str, name: str) -> Path:
        """The stripe file of the current version of ``name`` on one server."""
        import json

        record = json.loads((self.object_dir(kind, name) / "record.json").read_text())
        return self.object_dir(kind, name) / f"{record['current']['version_id']}.stripe"

    def client(self) -> Client:
        return Client(self.config)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def servers(tmp_path: Path, loop_thread: LoopThread) -> Iterator[LiveServers]:
    yield from _running(LiveServers(tmp_path / "setup", loop_thread))


@pytest.fixture
def client(servers: LiveServers) -> Iterator[Client]:
    with servers.client() as c:
        yield c


@pytest.fixture
def plain_servers(tmp_path: Path, loop_thread: LoopThread) -> Iterator[LiveServers]:
    """A setup with encryption off: the stripes hold the file's own bytes."""
    yield from _running(LiveServers(tmp_path / "plain-setup", loop_thread, encryption="none"))


def _running(live: LiveServers) -> Iterator[LiveServers]:
    live.start()
    yield live
    live.stop()


@pytest.fixture
def plain_client(plain_servers: LiveServers) -> Iterator[Client]:
    with plain_servers.client() as c:
        yield c
