"""Requests that arrive while a write runs go out together in the next one.

At every commit PostgreSQL waits for its log to reach the disk, so on the hot
path the number of statements, more than their size, sets the pace. A
`Coalescer` sends the first request of a quiet period at once, in the caller's
own task (no hand-over, no added latency), and gathers whatever arrives while
that statement runs into the next one: one statement per round trip, however
many requests.

A coalescer is idle when no write is running and none is queued. `on_idle` is
called each time it becomes so: an owner that keeps one per key (findlock's,
per node set) drops it then, and holds only those with work in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class BatchStats:
    """What an operation's writes carried, for `$SRV.STATS`: few requests a
    write means little company to gather; writes that take long, a busy
    database. Several coalescers may share one (findlock's, one per node set)."""

    writes: int = 0
    items: int = 0
    write_time: int = 0  # nanoseconds, all writes together

    def note(self, items: int, took_ns: int) -> None:
        self.writes += 1
        self.items += items
        self.write_time += took_ns

    def as_dict(self) -> dict[str, Any]:
        return {
            "writes": self.writes,
            "batched_requests": self.items,
            "write_time": self.write_time,
            "average_batch": round(self.items / self.writes, 2) if self.writes else 0,
        }


class Coalescer(Generic[T, R]):
    """`write(items)` returns one result per item, in order."""

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R]]],
        name: str,
        max_batch: int = 256,
        on_idle: Callable[[], None] | None = None,
        stats: BatchStats | None = None,
    ) -> None:
        self.stats = BatchStats() if stats is None else stats
        self._write = write
        self._name = name
        self._max = max_batch
        self._on_idle = on_idle
        self._queue: list[tuple[T, asyncio.Future[R]]] | None = None
        self._runners: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self._queue is not None:
            self._queue.append((item, future))  # a write is under way: join the next
            return await future
        self._queue = [(item, future)]
        try:
            await self._write_some()
        finally:
            if self._queue:
                runner = asyncio.create_task(self._drain(), name=self._name)
                self._runners.add(runner)
                runner.add_done_callback(self._runners.discard)
            else:
                self._became_idle()
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._write_some()
        finally:
            queue = self._queue or []
            self._became_idle()
            for _, future in queue:
                if not future.done():
                    future.cancel()

    def _became_idle(self) -> None:
        self._queue = None  # nothing running or queued: the next submit writes at once
        if self._on_idle is not None:
            self._on_idle()

    async def _write_some(self) -> None:
        assert self._queue is not None
        batch, self._queue[:] = self._queue[: self._max], self._queue[self._max :]
        started = time.perf_counter_ns()
        try:
            results = await self._write([item for item, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, Exception):
                return
            raise
        finally:
            self.stats.note(len(batch), time.perf_counter_ns() - started)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
