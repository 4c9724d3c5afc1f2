"""Both servers of a config, each in a process of its own.

One Python process runs its event loop, TLS and hashing on one core at a time (the GIL),
so two servers in one process share a core even on a machine that has two. ``serve``
of a config therefore starts each server in a child process (``multiprocessing``'s
spawn: nothing of the parent's state is inherited) and stays as their supervisor: it
prints what they say, stops both on SIGINT or SIGTERM, and stops the other and fails
if one of them fails to start or ends on its own. The children ignore SIGINT (a Ctrl-C
reaches the whole process group) and stop only when the supervisor says so; on Linux
the kernel also stops them if the supervisor is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from ._cli_output import configure_logging, show_warning
from ._errors import SplitStoreError
from ._serve import ServerSpec, listening_line, run_until_stopped
from ._service import ServerLimits

__all__ = ["ServerFailed", "run_in_processes"]

log = logging.getLogger("splitstore.serve")

# Seconds a server has to stop once asked, before it is killed.
STOP_SECONDS = 15.0
_POLL_SECONDS = 0.2


class ServerFailed(SplitStoreError):
    """A server process could not start, or ended on its own; says why in one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Child:
    spec: ServerSpec
    process: BaseProcess
    messages: Connection


def run_in_processes(
    specs: Sequence[ServerSpec], limits: ServerLimits, *, announce: bool, verbose: bool
) -> None:
    """Run each server in a child process until SIGINT or SIGTERM; raise ServerFailed if
    one cannot start or stops by itself (the others are stopped first)."""
    context = multiprocessing.get_context("spawn")
    stopping: list[int] = []

    def ask_to_stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    children: list[_Child] = []
    try:
        for spec in specs:
            if stopping:
                return
            receiving, sending = context.Pipe(duplex=False)
            process = context.Process(
                target=_serve_one,
                args=(spec, limits, sending, verbose),
                name=f"splitstore-{spec.kind}",
            )
            # Started with SIGINT ignored, which it keeps: a Ctrl-C (to the whole group)
            # while it imports must not kill it with a traceback; the supervisor stops it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                process.start()
            finally:
                signal.signal(signal.SIGINT, ask_to_stop)
            sending.close()  # the child's end: the pipe reads EOF once the child is gone
            child = _Child(spec, process, receiving)
            children.append(child)
            host, port = _wait_until_listening(child, stopping)
            if announce and host:
                print(listening_line(spec, host, port), flush=True)
        while not stopping:
            sentinels = [c.process.sentinel for c in children]
            if ready := multiprocessing.connection.wait(sentinels, timeout=_POLL_SECONDS):
                if stopping:  # the signal reached the children too (systemd, kill -PGID)
                    break
                # Its sentinel, not is_alive(): the pipe may close before it can be reaped.
                ended = next(c for c in children if c.process.sentinel in ready)
                ended.process.join(STOP_SECONDS)
                why = _last_word(ended) or f"exit status {ended.process.exitcode}"
                raise ServerFailed(
                    f"the {ended.spec.kind} server stopped by itself ({why}); "
                    "the other was stopped too"
                )
        if announce:
            print("shutting down", flush=True)
    finally:
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_until_listening(child: _Child, stopping: list[int]) -> tuple[str, int]:
    """The child's address once it listens (("", 0) if a signal came first).

    No time limit: opening a large data folder counts every tenant's bytes first, which
    a single ``serve`` waits for too; a child that dies is seen at once.
    """
    while not stopping:
        if child.messages.poll(_POLL_SECONDS):
            try:
                message = child.messages.recv()
            except EOFError:
                break  # it ended without a word: said below
            if message[0] == "ready":
                return str(message[1]), int(message[2])
            raise ServerFailed(str(message[1]), int(message[2]))
        if not child.process.is_alive() and not child.messages.poll():
            break
    if stopping:
        return "", 0
    child.process.join(1)
    raise ServerFailed(
        f"the {child.spec.kind} server ended while starting (exit status {child.process.exitcode})"
    )


def _last_word(child: _Child) -> str:
    """What a child that ended said about it, if anything."""
    with contextlib.suppress(OSError, EOFError):
        while child.messages.poll():
            message = child.messages.recv()
            if message[0] == "error":
                return str(message[1])
    return ""


def _stop_all(children: list[_Child]) -> None:
    for child in children:
        if child.process.is_alive():
            child.process.terminate()  # SIGTERM: it closes its connections and ends
    for child in children:
        child.process.join(STOP_SECONDS)
        if child.process.is_alive():
            log.warning("the %s server did not stop in time; killing it", child.spec.kind)
            child.process.kill()
            child.process.join()
        child.messages.close()


def _serve_one(spec: ServerSpec, limits: ServerLimits, parent: Connection, verbose: bool) -> None:
    """A server process: serve ``spec`` until SIGTERM, telling the parent how it went."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(verbose)
    warnings.showwarning = show_warning

    def ready(server: Any) -> None:
        parent.send(("ready", server.host, server.port))

    try:
        asyncio.run(
            run_until_stopped(
                [spec], limits, announce=False, signals=(signal.SIGTERM,), on_ready=ready
            )
        )
    except SplitStoreError as exc:
        _tell(parent, ("error", str(exc), exc.exit_code))
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line to the parent, details with -v
        log.error("the %s server failed", spec.kind, exc_info=verbose)
        _tell(parent, ("error", f"internal error in the {spec.kind} server: {exc}", 1))
        sys.exit(1)


def _tell(parent: Connection, message: tuple[Any, ...]) -> None:
    with contextlib.suppress(OSError):
        parent.send(message)


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM if the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):  # no libc or prctl: go without
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
