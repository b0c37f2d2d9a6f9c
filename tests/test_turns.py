"""How requests take turns (daemon/turns.py), with endpoints that record what
they were asked to do. The daemon-level behaviour is in test_flood.py; these
pin down the order and the bounds a flood test cannot see one by one."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nats.aio.msg import Msg

from daemon.nats_reads import READ_CHUNK
from daemon.turns import (
    BUSY_SLICE,
    CATCH_UP_TURNS,
    LARGE,
    LARGE_CREDIT,
    LARGE_SHARE,
    Turns,
    Work,
    requester_of,
)


def msg(requester: str, n: int) -> Msg:
    return Msg(_client=None, subject="p.op", reply=f"{requester}.{n}", data=b"")  # type: ignore[arg-type]


class Recorder:
    """Starts requests that wait until the test releases them."""

    def __init__(self) -> None:
        self.begun: list[str] = []
        self.running: set[str] = set()
        self.refused: list[str] = []
        self.release = asyncio.Event()

    async def begin(self, m: Msg) -> Work | None:
        self.begun.append(m.reply)
        if m.data == b"bad":
            return None  # answered at once, like a malformed request

        async def work() -> None:
            self.running.add(m.reply)
            await self.release.wait()
            self.running.discard(m.reply)

        return work

    async def overloaded(self, m: Msg) -> None:
        self.refused.append(m.reply)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def started(turns: Turns, endpoint: Recorder, *msgs: Msg) -> None:
    for m in msgs:
        await turns.submit(endpoint, m)
    await settle()


def test_requester_is_the_inbox_without_its_last_token() -> None:
    assert requester_of(msg("_INBOX.abc", 7)) == "_INBOX.abc"
    published = Msg(_client=None, subject="p.heartbeat.n", reply="", data=b"")  # type: ignore[arg-type]
    assert requester_of(published) == ""


async def test_requesters_take_turns() -> None:
    turns, endpoint = Turns(limit=100, per_requester=100), Recorder()
    endpoint.release.set()
    flood = [Msg(_client=None, reply=f"_INBOX.flood.{i}", data=b"bad") for i in range(50)]  # type: ignore[arg-type]
    for m in flood:
        await turns.submit(endpoint, m)
    await turns.submit(endpoint, msg("_INBOX.router", 0))
    turns.start()
    await turns.wait_idle()
    await turns.stop()
    # Filed behind 50 requests of another requester, the router's comes second.
    assert endpoint.begun.index("_INBOX.router.0") == 1
    assert len(endpoint.begun) == 51


async def test_one_requester_holds_at_most_its_share() -> None:
    turns, endpoint = Turns(limit=10, per_requester=3), Recorder()
    turns.start()
    await started(turns, endpoint, *(msg("_INBOX.big", i) for i in range(8)))
    assert len(endpoint.running) == 3
    # Another requester still gets a slot at once.
    await started(turns, endpoint, msg("_INBOX.small", 0))
    assert "_INBOX.small.0" in endpoint.running
    assert turns.in_flight == 9  # 4 running, 5 waiting
    endpoint.release.set()
    await turns.wait_idle()
    assert len(endpoint.begun) == 9 and not endpoint.running
    await turns.stop()


async def test_overall_limit() -> None:
    turns, endpoint = Turns(limit=4, per_requester=4), Recorder()
    turns.start()
    await started(turns, endpoint, *(msg(f"_INBOX.r{i}", 0) for i in range(6)))
    assert len(endpoint.running) == 4
    endpoint.release.set()
    await turns.wait_idle()
    assert len(endpoint.begun) == 6
    await turns.stop()


async def test_a_full_backlog_refuses_at_once() -> None:
    turns, endpoint = Turns(limit=1, per_requester=1, backlog=3), Recorder()
    turns.start()
    await started(turns, endpoint, msg("_INBOX.r", 0))
    await started(turns, endpoint, *(msg("_INBOX.r", i) for i in range(1, 6)))
    # One running, three waiting, the rest refused rather than queued.
    assert endpoint.refused == ["_INBOX.r.4", "_INBOX.r.5"]
    endpoint.release.set()
    await turns.wait_idle()
    assert endpoint.begun == [f"_INBOX.r.{i}" for i in range(4)]
    await turns.stop()


async def test_a_failing_begin_does_not_stop_the_turns() -> None:
    turns = Turns(limit=10, per_requester=10)

    class Broken(Recorder):
        async def begin(self, m: Msg) -> Any:
            if m.reply.endswith(".0"):
                raise RuntimeError("boom")
            return await super().begin(m)

    endpoint = Broken()
    endpoint.release.set()
    turns.start()
    await started(turns, endpoint, msg("_INBOX.r", 0), msg("_INBOX.r", 1))
    await turns.wait_idle()
    assert endpoint.begun == ["_INBOX.r.1"]
    await turns.stop()


class Socket:
    """What the kernel holds unread for the connection: `backlog` bytes for
    the first `for_calls` times it is asked, then nothing."""

    def __init__(self, backlog: int, for_calls: int) -> None:
        self.backlog, self.for_calls, self.calls = backlog, for_calls, 0

    def unread(self) -> int:
        self.calls += 1
        return self.backlog if self.calls <= self.for_calls else 0


def large(requester: str, n: int) -> Msg:
    return Msg(_client=None, subject="p.op", reply=f"{requester}.{n}", data=b"x" * LARGE)  # type: ignore[arg-type]


async def test_a_large_request_waits_for_the_socket_to_be_read_first() -> None:
    socket = Socket(backlog=2 * READ_CHUNK, for_calls=5)
    turns, endpoint = Turns(limit=10, per_requester=10, unread=socket.unread), Recorder()
    asked_when_begun: list[int] = []
    begin = endpoint.begin

    async def recording_begin(m: Msg) -> Work | None:
        asked_when_begun.append(socket.calls)
        return await begin(m)

    endpoint.begin = recording_begin  # type: ignore[method-assign]
    endpoint.release.set()
    turns.start()
    # A small request does not ask the socket at all.
    await started(turns, endpoint, msg("_INBOX.r", 0))
    assert asked_when_begun == [0]
    # A large one is checked only once the backlog is read (the sixth answer);
    # its handling asks once more before it runs.
    await started(turns, endpoint, large("_INBOX.r", 1))
    await turns.wait_idle()
    assert asked_when_begun == [0, 6] and socket.calls == 7
    await turns.stop()


async def test_a_socket_that_never_empties_delays_a_large_request_only_so_long() -> None:
    socket = Socket(backlog=2 * READ_CHUNK, for_calls=10**9)
    turns, endpoint = Turns(limit=10, per_requester=10, unread=socket.unread), Recorder()
    endpoint.release.set()
    turns.start()
    await turns.submit(endpoint, large("_INBOX.r", 0))
    await turns.wait_idle()
    # Checked and handled all the same, after a bounded number of turns each.
    assert endpoint.begun == ["_INBOX.r.0"] and not endpoint.running
    assert socket.calls == 2 * CATCH_UP_TURNS
    await turns.stop()


class Clock:
    """Time that passes only when a check says it does."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_of_large_requests_gets_a_share_of_checking_and_503s_past_it() -> None:
    # Checking megabyte bodies back to back would leave too little time to
    # read the socket. Checks of large bodies get LARGE_CREDIT at once, then
    # LARGE_SHARE of the time; the others are refused unchecked, so a client
    # bursting them hears 503.
    clock, endpoint = Clock(), Recorder()
    turns = Turns(limit=100, per_requester=100, clock=clock)
    begin = endpoint.begin

    async def costly_begin(m: Msg) -> Work | None:
        clock.now += LARGE_CREDIT  # what checking one takes
        return await begin(m)

    endpoint.begin = costly_begin  # type: ignore[method-assign]
    endpoint.release.set()
    for i in range(20):
        await turns.submit(endpoint, large("_INBOX.burst", i))
    turns.start()
    await turns.wait_idle()
    # The first spends the credit and earns back a share of its time, enough
    # to start one more; the rest are refused.
    assert endpoint.begun == ["_INBOX.burst.0", "_INBOX.burst.1"]
    assert endpoint.refused == [f"_INBOX.burst.{i}" for i in range(2, 20)]
    # Small requests are not held to it.
    await turns.submit(endpoint, msg("_INBOX.burst", 20))
    await turns.wait_idle()
    assert endpoint.begun[-1] == "_INBOX.burst.20"
    await turns.stop()


async def test_large_requests_within_the_share_are_always_checked() -> None:
    # A router sending large node_ids sets now and then is never refused for
    # it: between two, the time spent on everything else earns the check back.
    clock, endpoint = Clock(), Recorder()
    turns = Turns(limit=100, per_requester=100, clock=clock)
    begin = endpoint.begin

    async def costly_begin(m: Msg) -> Work | None:
        clock.now += LARGE_CREDIT  # each check spends all the credit there is
        return await begin(m)

    endpoint.begin = costly_begin  # type: ignore[method-assign]
    endpoint.release.set()
    turns.start()
    for i in range(10):
        await turns.submit(endpoint, large("_INBOX.router", i))
        await turns.wait_idle()
        clock.now += LARGE_CREDIT / LARGE_SHARE  # other work meanwhile
    assert len(endpoint.begun) == 10 and not endpoint.refused
    await turns.stop()


async def test_a_lone_request_starts_at_once_but_never_ahead_of_others() -> None:
    # With nothing waiting, a request is begun as it is submitted (a quiet
    # router's findlock does not wait for the loop to come round); with
    # others waiting, it takes its turn like any other.
    turns, endpoint = Turns(limit=10, per_requester=10), Recorder()
    endpoint.release.set()
    await turns.submit(endpoint, msg("_INBOX.a", 0), alone=True)
    assert endpoint.begun == ["_INBOX.a.0"]  # the loop has not even started
    await turns.submit(endpoint, msg("_INBOX.a", 1))  # waits for the loop
    await turns.submit(endpoint, msg("_INBOX.b", 0), alone=True)
    assert endpoint.begun == ["_INBOX.a.0"]
    turns.start()
    await turns.wait_idle()
    assert endpoint.begun == ["_INBOX.a.0", "_INBOX.a.1", "_INBOX.b.0"]
    await turns.stop()


async def test_running_handlers_get_in_between_slices_of_checks() -> None:
    # A wave of requests is begun a slice of checking at a time, not one per
    # round of the loop (at 64 routers they queued here longer than their
    # statement took), and a handler already running still gets in after
    # every slice, however long the queue.
    clock, endpoint = Clock(), Recorder()
    turns = Turns(limit=100, per_requester=100, clock=clock)
    begin = endpoint.begin
    check = BUSY_SLICE / 2.5  # what checking one request takes

    async def timed_begin(m: Msg) -> Work | None:
        clock.now += check
        return await begin(m)

    endpoint.begin = timed_begin  # type: ignore[method-assign]
    turns.start()
    await started(turns, endpoint, msg("_INBOX.router", 0))  # a handler runs
    for i in range(30):
        await turns.submit(endpoint, msg("_INBOX.wave", i))
    seen = []  # requests begun, each time the running handler came round
    while len(endpoint.begun) < 31:
        await asyncio.sleep(0)
        seen.append(len(endpoint.begun))
    steps = [b - a for a, b in itertools.pairwise(seen) if b > a]
    assert max(steps) == 3  # as many as fit in a slice, then the handler's turn
    assert len(steps) >= 30 // 3
    endpoint.release.set()
    await turns.wait_idle()
    await turns.stop()
