"""The server-wide bound on upload bytes held in memory: first come, first served, never
lost to a cancellation, and uploads that wait for it all finish, intact."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from splitstore._byte_budget import ByteBudget
from splitstore._service import StorageService
from splitstore._storage import DataFolder, StorageError
from splitstore._tenants import Tenant

MIB = 1024 * 1024


def test_bytes_are_handed_out_in_order_and_given_back() -> None:
    async def scenario() -> tuple[list[str], int]:
        budget = ByteBudget(10)
        order: list[str] = []
        assert await budget.take(6) == 6

        async def wants(name: str, n: int) -> None:
            await budget.take(n)
            order.append(name)

        big = asyncio.create_task(wants("big", 8))
        await asyncio.sleep(0)
        small = asyncio.create_task(wants("small", 1))  # would fit, but waits its turn
        await asyncio.sleep(0.01)
        assert order == []
        budget.give(6)
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        return order, budget.held

    assert asyncio.run(scenario()) == (["big", "small"], 9)


def test_a_request_over_the_total_takes_the_total() -> None:
    async def scenario() -> int:
        return await ByteBudget(10).take(100)

    assert asyncio.run(scenario()) == 10


def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in() -> None:
    async def scenario() -> int:
        budget = ByteBudget(10)
        await budget.take(5)
        first = asyncio.create_task(budget.take(8))
        await asyncio.sleep(0)
        second = asyncio.create_task(budget.take(4))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await asyncio.wait_for(second, 1) == 4  # no longer behind the cancelled one
        return budget.held

    assert asyncio.run(scenario()) == 9


def test_bytes_granted_to_a_waiter_cancelled_meanwhile_come_back() -> None:
    async def scenario() -> int:
        budget = ByteBudget(10)
        await budget.take(10)
        waiter = asyncio.create_task(budget.take(7))
        await asyncio.sleep(0)
        budget.give(10)  # granted ...
        waiter.cancel()  # ... and cancelled before it ran again
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return budget.held

    assert asyncio.run(scenario()) == 0


async def body_of(data: bytes, piece: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        await asyncio.sleep(0)
        yield data[i : i + piece]


def test_many_uploads_through_a_small_budget_all_finish_intact(tmp_path: Path) -> None:
    folder = DataFolder(tmp_path)
    service = StorageService(folder, receive_buffer_bytes=2 * MIB)
    stripes = {f"{i:x}" * 64: os.urandom(5 * MIB + i * 1000) for i in range(1, 7)}
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, service._receive_budget.held)
            await asyncio.sleep(0)

    async def scenario() -> list[tuple[int, str]]:
        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.wait_for(
                asyncio.gather(
                    *(
                        service.put_stripe(
                            Tenant("alice"), oid, "a" * 32, len(data), body_of(data, 256 * 1024)
                        )
                        for oid, data in stripes.items()
                    )
                ),
                60,
            )
        finally:
            watcher.cancel()

    results = asyncio.run(scenario())
    assert results == [(len(d), hashlib.sha256(d).hexdigest()) for d in stripes.values()]
    assert 0 < most <= 2 * MIB
    assert service._receive_budget.held == 0


def test_a_failed_upload_gives_its_bytes_back(tmp_path: Path) -> None:
    service = StorageService(DataFolder(tmp_path), receive_buffer_bytes=8 * MIB)

    async def breaks_off() -> AsyncIterator[bytes]:
        yield os.urandom(MIB)
        raise StorageError("bad_request", "the client closed the connection")

    async def scenario() -> None:
        with pytest.raises(StorageError):
            await service.put_stripe(Tenant("alice"), "1" * 64, "a" * 32, 3 * MIB, breaks_off())
        for _ in range(200):  # the abort runs on in a task of its own
            if service._receive_budget.held == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert service._receive_budget.held == 0
