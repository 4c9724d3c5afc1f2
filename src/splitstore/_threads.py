"""Blocking work in worker threads, waited for until the thread itself has ended.

``asyncio.to_thread`` is a task around the thread's future: cancelling it marks it done
at once while the thread goes on. ``asyncio.run`` cancels every task on its way out (a
second Ctrl-C does that), so a caller waiting for such a task would close or remove a
file that the thread still uses. ``in_thread`` gives a plain future instead, which no
task cancellation reaches: it is done only when the thread is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_thread", "in_thread_to_the_end", "outlast", "shared_pool", "wait_through"]

T = TypeVar("T")


def in_thread(call: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``call(*args)`` in the loop's default executor, in the caller's context (as
    ``to_thread``); the future is done when the thread has ended, not before, unless it
    is cancelled itself (``wait_for``, ``gather``), so await it through a shield. A
    shield cancelled first never looks at the thread's error: retrieve it after, as
    ``outlast`` does, or Python warns that it was never retrieved."""
    loop = asyncio.get_running_loop()
    run = functools.partial(contextvars.copy_context().run, call, *args)
    return loop.run_in_executor(None, run)


async def in_thread_to_the_end(call: Callable[[], T]) -> T:
    """``call()`` in a worker thread. A cancellation is raised only once the thread has
    ended: it works on a file the caller closes (or removes) as soon as it sees the error,
    and the file must not be used from two threads at once."""
    running = in_thread(call)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await outlast(running)
        raise


async def outlast(running: asyncio.Future[Any]) -> None:
    """Wait until ``running`` is done, however often the waiting task is cancelled
    meanwhile (a cancellation is raised after, not lost); its outcome is left to others."""
    cancelled = False
    while not running.done():
        try:
            await asyncio.wait([running])
        except asyncio.CancelledError:
            cancelled = True
    if not running.cancelled():
        running.exception()  # retrieved: the error being raised says more
    if cancelled:
        raise asyncio.CancelledError


def wait_through(future: concurrent.futures.Future[Any]) -> None:
    """Block until ``future`` is done, through interruptions too (KeyboardInterrupt):
    the first is raised once it is done; its outcome is left to the caller."""
    interrupted: BaseException | None = None
    while True:
        try:
            concurrent.futures.wait([future])
            break
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def shared_pool(workers: int, name: str) -> Callable[[], concurrent.futures.ThreadPoolExecutor]:
    """A getter of one thread pool for the whole process, made on first use (a command
    that never needs it starts no threads), whichever thread asks first."""
    pool: list[concurrent.futures.ThreadPoolExecutor] = []
    lock = threading.Lock()

    def get() -> concurrent.futures.ThreadPoolExecutor:
        with lock:
            if not pool:
                pool.append(concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name))
            return pool[0]

    return get
