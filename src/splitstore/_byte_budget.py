"""A server-wide bound on the bytes of uploads held in memory at once.

Each stripe being received is held a batch at a time on its way to disk. Without a bound
over all uploads, many connections could together make a server hold many times that;
with one, an upload that would go over it waits, and so stops reading its socket, until
another upload's batch is on disk (TCP flow control then slows its client). Reservations
are taken a whole batch at a time and given back by the write that empties the batch, so
a waiting upload never holds a reservation that only another waiting upload could free:
no deadlock, however many wait.
"""

from __future__ import annotations

import asyncio
import collections

__all__ = ["ByteBudget"]


class ByteBudget:
    """``total`` bytes handed out first come, first served (on one event loop)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def held(self) -> int:
        return self.total - self._free

    async def take(self, n: int) -> int:
        """Wait until ``n`` bytes (at most ``total``) are free and take them; return how many."""
        n = min(n, self.total)
        if not self._waiting and self._free >= n:
            self._free -= n
            return n
        granted = asyncio.get_running_loop().create_future()
        entry = (n, granted)
        self._waiting.append(entry)
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give(n)  # granted as the waiter was cancelled: not to be lost
            else:
                self._waiting.remove(entry)
                self.give(0)  # the next in line may fit now
            raise
        return n

    def give(self, n: int) -> None:
        self._free += n
        while self._waiting and self._free >= self._waiting[0][0]:
            need, granted = self._waiting.popleft()
            self._free -= need
            granted.set_result(None)
