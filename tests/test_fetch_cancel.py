"""A fetch cancelled (Ctrl-C, a caller's time-out) while a worker thread still writes its
file: the cancellation waits for that thread, since the file is closed and removed next
and must not be used from two threads at once, then leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from splitstore._client import AsyncClient
from splitstore._syncing import SyncingWriter

from .conftest import LiveServers


def test_a_fetch_cancelled_while_its_file_is_finished_waits_then_leaves_nothing(
    servers: LiveServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    with servers.client() as client:
        client.store(source, "big")

    entered, release = threading.Event(), threading.Event()
    finished: list[bool] = []
    real_finish = SyncingWriter.finish

    def slow_finish(self: SyncingWriter) -> None:  # the disk is slow to sync
        entered.set()
        release.wait(10)
        real_finish(self)
        finished.append(True)

    monkeypatch.setattr(SyncingWriter, "finish", slow_finish)
    out = tmp_path / "out"

    async def run() -> tuple[bool, bool]:
        async with AsyncClient(servers.config) as client:
            fetching = asyncio.ensure_future(client.fetch("big", out))
            async with asyncio.timeout(10):
                while not entered.is_set():
                    await asyncio.sleep(0.01)
            fetching.cancel()
            await asyncio.sleep(0.2)
            after_one = fetching.done()
            fetching.cancel()  # a second Ctrl-C
            await asyncio.sleep(0.1)
            after_two = fetching.done()
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await fetching
            return after_one, after_two

    assert servers.loop.run(run()) == (False, False)  # it waited for the thread both times
    assert finished == [True]  # which ended before the file was let go
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
