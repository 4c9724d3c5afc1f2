"""A fetch cancelled (Ctrl-C, a caller's time-out, a shutdown) while a worker thread
still writes its file: the cancellation waits for that thread, since the file is closed
and removed next and must not be used from two threads at once, then leaves nothing
behind."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from splitstore._client import AsyncClient, Client
from splitstore._syncing import SyncingWriter

from .conftest import LiveServers

# Over the sync threshold: the fetch writes through the direct stage and background syncs.
SIZE = 20 * 1024 * 1024 + 5


@dataclass
class SlowFinish:
    """``SyncingWriter.finish`` held until ``release`` is set: a disk slow to sync."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    finished: list[bool] = field(default_factory=list)

    async def entered_in_time(self) -> None:
        async with asyncio.timeout(20):
            while not self.entered.is_set():
                await asyncio.sleep(0.01)


@pytest.fixture
def slow_finish(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowFinish]:
    slow = SlowFinish()
    real_finish = SyncingWriter.finish

    def finish(self: SyncingWriter) -> None:
        slow.entered.set()
        slow.release.wait(10)
        real_finish(self)
        slow.finished.append(True)

    monkeypatch.setattr(SyncingWriter, "finish", finish)
    yield slow
    slow.release.set()  # whatever the test did: no thread is left held


@pytest.fixture
def stored(servers: LiveServers, tmp_path: Path) -> str:
    source = tmp_path / "in"
    source.write_bytes(os.urandom(SIZE))
    with servers.client() as client:
        client.store(source, "big")
    return "big"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".out"))


def test_a_fetch_cancelled_while_its_file_is_finished_waits_then_leaves_nothing(
    servers: LiveServers, stored: str, slow_finish: SlowFinish, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    async def run() -> tuple[bool, bool]:
        async with AsyncClient(servers.config) as client:
            fetching = asyncio.ensure_future(client.fetch(stored, out))
            await slow_finish.entered_in_time()
            fetching.cancel()
            await asyncio.sleep(0.2)
            after_one = fetching.done()
            fetching.cancel()  # a second Ctrl-C
            await asyncio.sleep(0.1)
            after_two = fetching.done()
            slow_finish.release.set()
            with pytest.raises(asyncio.CancelledError):
                await fetching
            return after_one, after_two

    assert servers.loop.run(run()) == (False, False)  # it waited for the thread both times
    assert slow_finish.finished == [True]  # which ended before the file was let go
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_a_shutdown_that_cancels_every_task_still_waits_for_the_thread(
    servers: LiveServers, stored: str, slow_finish: SlowFinish, tmp_path: Path
) -> None:
    """``asyncio.run`` on its way out (a second Ctrl-C in the command) cancels every task
    of its loop, the thread's own wrapper too if it were a task: the file must still not
    be let go before the thread has ended."""
    out = tmp_path / "out"
    let_go_while_running: list[bool] = []

    async def run() -> None:
        async with AsyncClient(servers.config) as client:
            fetching = asyncio.ensure_future(client.fetch(stored, out))
            await slow_finish.entered_in_time()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.3)
            let_go_while_running.append(fetching.done())
            slow_finish.release.set()
            with pytest.raises(asyncio.CancelledError):
                await fetching

    asyncio.run(run())  # a loop of its own: the servers' loop is left alone
    assert let_go_while_running == [False]
    assert slow_finish.finished == [True]
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_closing_a_client_ends_a_fetch_it_gave_up_waiting_for(
    servers: LiveServers, stored: str, slow_finish: SlowFinish, tmp_path: Path
) -> None:
    """The blocking client waits a while for a cancelled operation to clean up, then
    gives up (a second Ctrl-C does too); closing it must still let that operation end,
    removing its temp file, before its loop stops."""
    out = tmp_path / "out"
    client = Client(servers.config)
    try:
        fetching = asyncio.run_coroutine_threadsafe(client._async.fetch(stored, out), client._loop)
        assert slow_finish.entered.wait(20)
        fetching.cancel()  # what Client._run does on Ctrl-C, before it stops waiting
    finally:
        threading.Timer(0.3, slow_finish.release.set).start()
        client.close()
    assert slow_finish.finished == [True]
    assert not out.exists()
    assert leftovers(tmp_path) == []
