"""Running the servers: one of them, or both of a config, until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ._config import Config, ServerConfig
from ._errors import ConfigError
from ._http_server import start_https_server
from ._service import ServerLimits, StorageService
from ._storage import DataFolder, FolderLock, StorageError
from ._tcp_server import start_tcp_server
from ._tenants import TenantRegistry
from ._tls import server_ssl_context

__all__ = [
    "RunningServer",
    "ServerSpec",
    "listening_line",
    "run_until_stopped",
    "start_server",
]

log = logging.getLogger("splitstore.serve")


class RunningServer(Protocol):
    host: str
    port: int

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ServerSpec:
    """Everything one server needs; built from a config entry or command-line options."""

    kind: str
    host: str
    port: int
    data_dir: Path
    #: The single token of a server with one user (tenant "default"); ignored when a
    #: tenants file is given.
    token_file: Path | None
    tls: bool = True
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Who may use the server: tenants, their token hashes and quotas (re-read on change).
    tenants_file: Path | None = None

    @classmethod
    def from_config(cls, server: ServerConfig) -> ServerSpec:
        where = f"the {server.kind} server's config"
        if server.data_dir is None:
            raise ConfigError(f"{where} needs 'data_dir' to serve")
        if server.token_file is None and server.tenants_file is None:
            raise ConfigError(f"{where} needs a tenants file or a token file to serve")
        return cls(
            kind=server.kind,
            host=server.host,
            port=server.port,
            data_dir=server.data_dir,
            token_file=server.token_file,
            tls=server.tls,
            cert_file=server.cert_file,
            key_file=server.key_file,
            tenants_file=server.tenants_file,
        )

    def registry(self) -> TenantRegistry:
        """Who may use this server: its tenants file, or else its one token."""
        if self.tenants_file is not None:
            return TenantRegistry(tenants_file=self.tenants_file)
        if self.token_file is None:
            raise ConfigError(f"the {self.kind} server needs a tenants file or a token file")
        return TenantRegistry(token_file=self.token_file)


def config_specs(config: Config) -> list[ServerSpec]:
    """The servers a config runs. Each needs a data folder of its own: two servers'
    stripes of a version have the same name (a client never looks at data_dir, so this
    is checked only here)."""
    specs = [ServerSpec.from_config(s) for s in config.servers]
    folders = [spec.data_dir.resolve() for spec in specs]
    if len(set(folders)) < len(folders):
        raise ConfigError(
            f"config {config.path}: each server needs a data_dir of its own, not {folders[0]}"
        )
    return specs


async def start_server(spec: ServerSpec, limits: ServerLimits | None = None) -> RunningServer:
    """Start one server on its host and port (0 picks a free port)."""
    limits = limits or ServerLimits()
    ssl_context = None
    if spec.tls:
        if spec.cert_file is None or spec.key_file is None:
            raise ConfigError(f"the {spec.kind} server needs a certificate and key for TLS")
        ssl_context = server_ssl_context(spec.cert_file, spec.key_file)
    elif spec.kind == "https":
        raise ConfigError("the https server always uses TLS")
    else:
        warnings.warn(
            "the tcp server runs without TLS: the token and data cross the network in the clear",
            stacklevel=2,
        )
    tenants = spec.registry()
    lock: FolderLock | None = None
    try:
        try:
            # Held from before the folder is opened (which empties its tmp/) until the
            # server has stopped: a second server on the same folder must not touch it.
            lock = FolderLock(spec.data_dir)
            # Opening upgrades an old layout and counts every tenant's bytes: not on the loop.
            data = await asyncio.to_thread(
                DataFolder, spec.data_dir, reserve_bytes=limits.reserve_bytes
            )
        except (OSError, StorageError) as exc:
            raise ConfigError(
                f"cannot use {spec.data_dir} as the {spec.kind} data folder: {exc}"
            ) from exc
        service = StorageService(data)
        start = start_https_server if spec.kind == "https" else start_tcp_server
        try:
            server = await start(
                service,
                tenants,
                host=spec.host,
                port=spec.port,
                ssl_context=ssl_context,
                limits=limits,
            )
        except OSError as exc:
            raise ConfigError(
                f"the {spec.kind} server cannot listen on {spec.host}:{spec.port}: {exc.strerror}"
            ) from exc
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    server.after_close.append(lock.release)
    return server


async def run_until_stopped(
    specs: Sequence[ServerSpec],
    limits: ServerLimits | None = None,
    *,
    announce: bool = True,
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    on_ready: Callable[[RunningServer], None] | None = None,
) -> None:
    """Run servers in this process until one of ``signals``, then close them cleanly.

    A signal that arrives while the servers start stops them as soon as they are up; a
    second signal while they close interrupts as usual. ``on_ready`` is told of each
    server once it listens.
    """
    running: list[RunningServer] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        for spec in specs:
            if stop.is_set():
                break
            server = await start_server(spec, limits)
            running.append(server)
            if on_ready is not None:
                on_ready(server)
            if announce:
                print(listening_line(spec, server.host, server.port), flush=True)
        await stop.wait()
        if announce:
            print("shutting down", flush=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        loop.set_exception_handler(_ignore_cancelled)
        for server in running:
            await server.close()


def listening_line(spec: ServerSpec, host: str, port: int) -> str:
    scheme = "https" if spec.kind == "https" else ("tcp+tls" if spec.tls else "tcp")
    return f"{spec.kind} server listening on {scheme}://{host}:{port}, storing in {spec.data_dir}"


def _ignore_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's asyncio.start_server reports a connection task cancelled by close()
    as an "exception in callback" with a traceback (fixed in 3.12); on shutdown that is
    the servers stopping as asked, not an error."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)
