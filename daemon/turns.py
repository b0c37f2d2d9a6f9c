"""Requests take turns by requester, so one client's flood cannot starve the rest.

nats-py hands each subscription's messages over in arrival order. Served in that
order, 10,000 junk requests from one client would stand in front of every
router's findlock for as long as they take to refuse. Instead each request is
filed under its requester (the reply inbox without its last token: one NATS
connection, for every client library that multiplexes replies) and one loop
takes the requesters in turn. For each request it runs the endpoint's `begin`,
which checks the request (CPU only) and answers a bad one at once, then starts a
task for a good one's handler. It yields after every 0.1 ms of checking while
handlers are running (else every half millisecond), so those already running
are not held up behind a queue of checks either.
A request with nothing waiting, here or behind it in its subscription (a
quiet router's), is begun as it is submitted: its turn is now, and waking
the loop for it would cost a round of the event loop on every request.

Bounds: `limit` handler tasks at once; `per_requester` of them for any one
requester (the rest of its requests wait for its next turn); `backlog` requests
waiting in all, `backlog_bytes` of bodies waiting from one requester and four
times that from all, past which a request is refused at once with 503, unread,
rather than held without end. Checking bodies of 64 KiB or more gets at most
a tenth of the time (`_may_check_large`); past it, 503 unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from nats.aio.msg import Msg

from daemon.nats_reads import READ_CHUNK

log = logging.getLogger("registryd.turns")

SLICE = 0.0005  # seconds of checking between two chances for others to run
BUSY_SLICE = 0.0001  # the same, while handlers are running
LARGE = 64 * 1024  # a body whose check takes long enough to read first
CATCH_UP_TURNS = 100  # at most, before checking a large body
LARGE_SHARE = 0.1  # of the time, at most, spent checking large bodies
LARGE_CREDIT = 0.02  # seconds of large checks allowed in one go

Work = Callable[[], Coroutine[Any, Any, None]]


class Endpoint(Protocol):
    async def begin(self, msg: Msg) -> Work | None:
        """Check `msg`; answer it if it is bad (None), else the work to run."""

    async def overloaded(self, msg: Msg) -> None:
        """Refuse `msg` at once: too many requests are waiting."""


def requester_of(msg: Msg) -> str:
    # nats-py, nats.go and the nats CLI reply to "<inbox prefix>.<token>", the
    # prefix being one per connection. Published messages share one turn.
    return msg.reply.rpartition(".")[0] if msg.reply else ""


class Turns:
    def __init__(
        self,
        limit: int,
        per_requester: int,
        backlog: int = 100_000,
        backlog_bytes: int = 16 * 1024 * 1024,
        unread: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._unread = unread  # bytes the kernel holds, not yet read by nats-py
        self._clock = clock  # what checking is timed by
        self._limit = limit
        self._per_requester = per_requester
        self._backlog = backlog
        # Requesters in turn order: the one served moves to the back. Requesters
        # are the clients' choice (a fresh inbox prefix each time costs nothing),
        # so each map holds one only while it has requests waiting, or running:
        # at most `backlog` and `limit` of them.
        self._waiting: dict[str, deque[tuple[Endpoint, Msg]]] = {}
        self._waiting_count = 0
        self._waiting_bytes = 0
        self._bytes_of: dict[str, int] = {}  # waiting bytes per requester (those waiting)
        self._backlog_bytes = backlog_bytes
        self._running: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.Task[None] | None = None
        self._credit = LARGE_CREDIT  # seconds of large checks we may spend now
        self._credited = clock()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._serve(), name="turns")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def submit(self, endpoint: Endpoint, msg: Msg, alone: bool = False) -> None:
        requester = requester_of(msg)
        size = len(msg.data)
        if alone and not self._waiting_count and size < LARGE and self._may_run(requester):
            # Nothing waits, here or behind it in the subscription: its turn
            # is now, without waking the loop for it.
            self._idle.clear()
            await self._begin(requester, endpoint, msg, large=False)
            self._settle()
            return
        if (
            self._waiting_count >= self._backlog
            or self._waiting_bytes + size > 4 * self._backlog_bytes
            or self._bytes_of.get(requester, 0) + size > self._backlog_bytes
        ):
            # Refused unread: a flood of requests, or of large ones, costs us
            # a small reply each and never holds up reading the socket. One
            # requester's large bodies are refused before anyone else's.
            await endpoint.overloaded(msg)
            return
        self._waiting.setdefault(requester, deque()).append((endpoint, msg))
        self._waiting_count += 1
        self._waiting_bytes += size
        if size:
            self._bytes_of[requester] = self._bytes_of.get(requester, 0) + size
        self._idle.clear()
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks) + self._waiting_count

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _may_run(self, requester: str) -> bool:
        return (
            len(self._tasks) < self._limit and self._running.get(requester, 0) < self._per_requester
        )

    def _next(self) -> tuple[str, Endpoint, Msg] | None:
        if len(self._tasks) >= self._limit:
            return None
        for requester in self._waiting:
            if self._may_run(requester):
                break
        else:
            return None
        queue = self._waiting[requester]
        endpoint, msg = queue.popleft()
        self._waiting_count -= 1
        self._waiting_bytes -= len(msg.data)
        left = self._bytes_of.pop(requester, 0) - len(msg.data)
        if left > 0:
            self._bytes_of[requester] = left
        del self._waiting[requester]
        if queue:
            self._waiting[requester] = queue
        return requester, endpoint, msg

    async def _serve(self) -> None:
        sliced = self._clock()
        while True:
            turn = self._next()
            if turn is None:
                self._settle()
                self._wake.clear()
                await self._wake.wait()
                continue
            requester, endpoint, msg = turn
            large = len(msg.data) >= LARGE
            if large:
                await self._read_first()
                if not self._may_check_large():
                    await endpoint.overloaded(msg)
                    continue
            await self._begin(requester, endpoint, msg, large)
            # While handlers run, let their continuations in every 0.1 ms, so
            # a flood of checks does not stretch their latency by more. Not
            # after every request: a wave of 30 routers' requests, each
            # checked in ~40 us, then took 30 rounds of the loop to begin, and
            # at 64 routers they waited 2 ms on average in this queue, longer
            # than their statement. Otherwise yield every half millisecond:
            # yielding after each would halve how many bad requests a second
            # we can turn away.
            spent = self._clock() - sliced
            if spent > SLICE or (self._tasks and spent > BUSY_SLICE):
                await asyncio.sleep(0)
                sliced = self._clock()

    async def _begin(self, requester: str, endpoint: Endpoint, msg: Msg, large: bool) -> None:
        checking = self._clock()
        try:
            work = await endpoint.begin(msg)
        except Exception:  # begin answers what it can; never lose the loop
            log.exception("could not start a request")
            work = None
        if large:
            self._credit -= self._clock() - checking
        if work is not None:
            self._run(requester, work, large=large)

    async def _read_first(self) -> None:
        # Checking a large body holds the loop for milliseconds, and nats-py
        # reads the socket only when the loop comes round. While a burst of
        # large requests keeps arriving, checking each as it comes would let
        # the unread bytes pile up in the kernel and then in nats-server,
        # which cuts the daemon off as a slow consumer past its max_pending.
        # So the socket is read first: we come round until what the kernel
        # holds is under a chunk (bounded, so a steady stream of small
        # requests cannot hold a large one back for long). What is read but
        # cannot be checked in time is refused unread (503) by `submit`.
        for _ in range(CATCH_UP_TURNS):
            if self._unread() < READ_CHUNK:
                return
            await asyncio.sleep(0)

    def _may_check_large(self) -> bool:
        # Reading must outpace a client that only writes: nats-server cuts
        # the daemon off once 64 MiB wait for it. Checking a megabyte body
        # costs a few milliseconds, about what reading two or three does, so
        # a burst of them checked back to back leaves reading half the time.
        # Checking large bodies gets at most LARGE_SHARE of the time
        # (LARGE_CREDIT at once); those past it are refused unchecked (503).
        # Whether others wait is no guide: in a burst the loop empties the
        # queue as fast as nats-py fills it, while nats-server holds the rest.
        now = self._clock()
        self._credit = min(LARGE_CREDIT, self._credit + (now - self._credited) * LARGE_SHARE)
        self._credited = now
        return self._credit > 0

    async def _read_first_then(self, work: Work) -> None:
        # A large request's handling costs in proportion (a findlock over
        # 10,000 node ids sorts and sends them all), and many can be ready in
        # one turn of the loop: they too let the reader at the socket first.
        await self._read_first()
        await work()

    def _run(self, requester: str, work: Work, large: bool) -> None:
        self._running[requester] = self._running.get(requester, 0) + 1
        task = asyncio.create_task(self._read_first_then(work) if large else work(), name="request")
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            left = self._running[requester] - 1
            if left:
                self._running[requester] = left
            else:
                del self._running[requester]
            self._wake.set()
            self._settle()

        task.add_done_callback(done)

    def _settle(self) -> None:
        if not self._tasks and not self._waiting_count:
            self._idle.set()
