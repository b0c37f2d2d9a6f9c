"""What clients send cannot grow the daemon without bound (contract v1.1).

The daemon runs as its own process, as in production, and its resident memory
is read from outside. Python never hands most freed memory back to the system,
so the level to compare with is the one after a warm-up of the same requests:
a structure that forgets what it no longer needs stays near that level however
many requests pass, and one that keeps an entry per distinct key grows with
every new one.

Each kind of request is sent COUNT times with keys never seen before: findlock
for a new model on a new `node_ids` set, inflight_dec and lease_renew of
made-up leases, registrations refused for new names, and heartbeats published
for made-up node ids. Every request with a reply comes from a reply inbox of its
own, so the daemon also meets as many distinct requesters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from daemon import service
from infra.errors import Unauthorized
from infra.wire import ERROR_CODE_HEADER
from tests.support import Client, Registryd, connect, serving

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

COUNT = 40_000
WARM_UP = 2_000
IN_FLIGHT = 500  # requests awaiting their reply at any time
HEARTBEAT_CHUNK = 1_000  # heartbeats published between two that wait for a reply
SLACK = 8 * 1024 * 1024  # bytes the daemon may end above its warm-up level
TOKEN = "the-right-token"

Make = Callable[[str, int], tuple[str, dict[str, Any]]]


def findlock(tag: str, i: int) -> tuple[str, dict[str, Any]]:
    node_ids = [f"{tag}-{i}-{side}" for side in ("a", "b", "c")]
    return "findlock", {"model": f"{tag}-model-{i}", "node_ids": node_ids}


def inflight_dec(tag: str, i: int) -> tuple[str, dict[str, Any]]:
    return "inflight_dec", {"lease_id": f"{tag}-dec-{i}"}


def lease_renew(tag: str, i: int) -> tuple[str, dict[str, Any]]:
    return "lease_renew", {"lease_id": f"{tag}-renew-{i}", "lease_s": 30}


def register(tag: str, i: int) -> tuple[str, dict[str, Any]]:
    body = {"name": f"{tag}-intruder-{i}", "address": "10.9.9.9:50051", "token": "a-guess"}
    return "register", body


# What each answers: no such replica, lease or node, and a refused token.
# (A release of an unknown lease is a no-op, as a second release is.)
REQUESTS: dict[str, tuple[Make, str]] = {
    "findlock": (findlock, "404"),
    "inflight_dec": (inflight_dec, "ok"),
    "lease_renew": (lease_renew, "404"),
    "register": (register, "401"),
}


class Flood:
    """Requests from a reply inbox of their own each, IN_FLIGHT at a time."""

    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self._waiting: dict[str, asyncio.Future[str]] = {}

    async def start(self) -> None:
        await self.nc.subscribe("_INBOX.>", cb=self._reply)
        await self.nc.flush()

    async def _reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)  # others' replies: not ours
        if future is not None and not future.done():
            future.set_result(dict(msg.headers or {}).get(ERROR_CODE_HEADER, "ok"))

    async def request(self, subject: str, body: dict[str, Any]) -> str:
        """The reply's error code, or "ok"."""
        inbox = f"_INBOX.{uuid.uuid4().hex}.1"
        future = self._waiting[inbox] = asyncio.get_running_loop().create_future()
        await self.nc.publish(f"{self.prefix}.{subject}", orjson.dumps(body), reply=inbox)
        return await future

    async def requests(self, make: Make, tag: str, count: int) -> Counter[str]:
        codes: Counter[str] = Counter()
        numbers: Iterator[int] = iter(range(count))

        async def sender() -> None:
            for i in numbers:
                codes[await self.request(*make(tag, i))] += 1

        async with asyncio.timeout(120):
            await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
        return codes

    async def heartbeats(self, tag: str, count: int) -> Counter[str]:
        """Publish `count` heartbeats for made-up node ids. Each chunk ends with
        one that waits for its reply: it is written after those published
        before it, so when it is answered the daemon is done with all of them."""
        codes: Counter[str] = Counter()
        numbers = iter(range(count))
        async with asyncio.timeout(120):
            while chunk := list(itertools.islice(numbers, HEARTBEAT_CHUNK)):
                for i in chunk:
                    await self.nc.publish(
                        f"{self.prefix}.heartbeat.{tag}-hb-{i}", b'{"available_vram": 1}'
                    )
                codes[await self.request(f"heartbeat.{tag}-hb-sync-{chunk[0]}", {})] += 1
        return codes


# 168,000 requests and 42,000 heartbeats: some 40 s of the daemon's CPU alone, more on a
# busy machine.
@pytest.mark.timeout(300)
async def test_distinct_keys_from_clients_leave_the_daemon_at_its_warm_up_size(
    spawn: Callable[..., Awaitable[Registryd]],
    daemon_env: dict[str, str],
    nats_url: str,
) -> None:
    daemon = await spawn(env=daemon_env | {"REGISTRY_REGISTRATION_TOKEN": TOKEN})
    prefix = daemon_env["REGISTRY_SUBJECT_PREFIX"]
    nc = await connect(nats_url)
    client = Client(nc, prefix)
    assert await serving(client, daemon) == []
    flood = Flood(nc, prefix)
    await flood.start()
    process = psutil.Process(daemon.pid)

    async def run(tag: str, count: int) -> dict[str, int]:
        """Every kind, `count` times; the resident size after each kind."""
        sizes = {}
        for kind, (make, expected) in REQUESTS.items():
            codes = await flood.requests(make, tag, count)
            assert codes == {expected: count}, (kind, codes)
            sizes[kind] = process.memory_info().rss
        codes = await flood.heartbeats(tag, count)
        assert codes == {"404": -(-count // HEARTBEAT_CHUNK)}, ("heartbeat", codes)
        sizes["heartbeat"] = process.memory_info().rss
        return sizes

    await run("warm", WARM_UP)
    warm = process.memory_info().rss
    sizes = await run("big", COUNT)
    daemon.assert_running()

    growth = {kind: f"{(size - warm) / 2**20:+.1f} MB" for kind, size in sizes.items()}
    assert sizes["heartbeat"] - warm < SLACK, (
        f"resident memory after the warm-up {warm / 2**20:.1f} MB; after {COUNT:,} "
        f"distinct requests of each kind, in turn: {growth}"
    )
    await nc.close()


def test_refusals_name_a_bounded_number_of_claimants(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="registryd.service")
    refusals = service.Refusals(every=60, remember=3)

    def refuse(name: str) -> None:
        err = Unauthorized("registration token missing or wrong", who=f"node {name!r}", why="x")
        refusals.note("register", err, "inbox _INBOX.x.1")

    for i in range(10):  # a flood of made-up names within a minute
        refuse(f"made-up-{i}")
    refuse("made-up-0")  # remembered: held back, as before
    lines = [r.getMessage() for r in caplog.records]
    # Three named, then one line for the rest, however many they are.
    assert len(lines) == 4, lines
    assert all(f"'made-up-{i}'" in lines[i] for i in range(3))
    assert "(1 refused since the last such line" in lines[3]
    assert len(refusals._seen) == 3

    # A minute on, a name refused again is logged with what was held back, and
    # the name logged longest ago makes room for a new one.
    clock[0] += 61
    caplog.clear()
    refuse("made-up-0")
    refuse("worker-1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "'made-up-0'" in lines[0] and "(1 more refused since the last line)" in lines[0]
    assert "'worker-1'" in lines[1] and "more" not in lines[1]
    assert len(refusals._seen) == 3
