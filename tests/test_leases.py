"""Leases on in-flight units: findlock with lease_s, release, renewal, expiry."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from daemon.app import Daemon
from tests.support import Client, fails, until

FAST = {"check_interval": 0.2}


async def in_flight(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT COALESCE(sum(in_flight), 0)::int FROM replicas")


async def lease_count(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT count(*)::int FROM leases")


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_findlock_with_a_lease_counts_in_flight_and_records_the_lease(
    client: Client, pg: asyncpg.Connection
) -> None:
    a = await client.healthy_node("gpu-a")
    replica = await client.replica(a, index=1)
    got = await client.call("findlock", model="m", lease_s=30)
    lease_id = got["replica"]["lease_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", lease_id)
    assert got["replica"]["id"] == replica["id"] and got["replica"]["in_flight"] == 1
    assert (await client.call("replica_get", node_id=a["id"], model="m", replica_index=1))[
        "in_flight"
    ] == 1
    row = await pg.fetchrow(
        "SELECT *, expires_at - now() AS left_ FROM leases WHERE id = $1", lease_id
    )
    assert row is not None
    assert (row["replica_id"], row["node_id"], row["model_name"], row["replica_index"]) == (
        replica["id"],
        a["id"],
        "m",
        1,
    )
    assert timedelta(seconds=25) < row["left_"] <= timedelta(seconds=30)


async def test_findlock_without_lease_s_is_unchanged(
    client: Client, pg: asyncpg.Connection
) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    got = await client.call("findlock", model="m")
    assert "lease_id" not in got["replica"]
    assert got["replica"]["in_flight"] == 1
    preferred = await client.call("findlock", model="m", prefer={"node_id": a["id"]})
    assert "lease_id" not in preferred["replica"]
    assert await lease_count(pg) == 0
    assert await in_flight(pg) == 2


async def test_a_preferred_pick_can_take_a_lease(client: Client, pg: asyncpg.Connection) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    await client.replica(a)
    wanted = await client.replica(b, index=2)
    got = await client.call(
        "findlock", model="m", prefer={"node_id": b["id"], "replica_index": 2}, lease_s=60
    )
    assert got["replica"]["id"] == wanted["id"]
    assert (
        await pg.fetchval("SELECT replica_id FROM leases WHERE id = $1", got["replica"]["lease_id"])
        == wanted["id"]
    )


async def test_batched_picks_with_and_without_leases(
    client: Client, pg: asyncpg.Connection
) -> None:
    for name in ("gpu-a", "gpu-b", "gpu-c"):
        await client.replica(await client.healthy_node(name))
    picks = await asyncio.gather(
        *(
            client.call("findlock", model="m", **({"lease_s": 60} if i % 2 else {}))
            for i in range(40)
        )
    )
    leased = [p["replica"] for i, p in enumerate(picks) if i % 2]
    plain = [p["replica"] for i, p in enumerate(picks) if not i % 2]
    assert all("lease_id" not in r for r in plain)
    assert len({r["lease_id"] for r in leased}) == 20
    rows = {r["id"]: r["replica_id"] for r in await pg.fetch("SELECT * FROM leases")}
    assert rows == {r["lease_id"]: r["id"] for r in leased}
    # Leases or not, the picks still spread level over the replicas.
    assert sorted(Counter(p["replica"]["id"] for p in picks).values()) == [13, 13, 14]
    assert await in_flight(pg) == 40


async def test_releasing_a_lease_decrements_once(client: Client, pg: asyncpg.Connection) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    first = await client.call("findlock", model="m", lease_s=60)
    await client.call("findlock", model="m", lease_s=60)
    assert await in_flight(pg) == 2
    lease_id = first["replica"]["lease_id"]
    replies = await asyncio.gather(
        *(client.call("inflight_dec", lease_id=lease_id) for _ in range(3))
    )
    assert replies == [{}, {}, {}]
    assert await in_flight(pg) == 1
    assert await lease_count(pg) == 1
    # Again, later: nothing changes, and it is still not an error.
    assert await client.call("inflight_dec", lease_id=lease_id) == {}
    assert await client.call("inflight_dec", lease_id="never-issued") == {}
    assert await in_flight(pg) == 1


async def test_the_replica_form_of_inflight_dec_still_works(
    client: Client, pg: asyncpg.Connection
) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a, in_flight=2)
    await client.call("inflight_dec", node_id=a["id"], model="m")
    assert await in_flight(pg) == 1
    await fails(client.call("inflight_dec"), 400, "'lease_id'")
    await fails(client.call("inflight_dec", model="m"), 400, "'node_id'")
    await fails(client.call("inflight_dec", node_id=a["id"]), 400, "'model'")
    await fails(client.call("inflight_dec", lease_id=""), 400, "lease_id")
    await fails(client.call("inflight_dec", lease_id=5), 400, "lease_id")
    assert await in_flight(pg) == 1


async def test_renew_extends_the_lease(client: Client, pg: asyncpg.Connection) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    lease_id = (await client.call("findlock", model="m", lease_s=5))["replica"]["lease_id"]
    before = await pg.fetchval("SELECT expires_at FROM leases WHERE id = $1", lease_id)
    got = await client.call("lease_renew", lease_id=lease_id, lease_s=600)
    after = await pg.fetchval("SELECT expires_at FROM leases WHERE id = $1", lease_id)
    assert when(got["expires_at"]) == after
    assert after - before > timedelta(seconds=590)
    assert got["expires_at"].endswith("Z")
    # Shortening is renewing too: the lease now ends lease_s from now.
    got = await client.call("lease_renew", lease_id=lease_id, lease_s=1.5)
    assert when(got["expires_at"]) < after
    await client.call("inflight_dec", lease_id=lease_id)
    await fails(client.call("lease_renew", lease_id=lease_id, lease_s=60), 404, lease_id)
    await fails(client.call("lease_renew", lease_id="nope", lease_s=60), 404, "nope")


async def test_an_expired_lease_cannot_be_renewed_but_is_released_once(
    client: Client, pg: asyncpg.Connection
) -> None:
    # The default check interval (15 s) leaves the expired lease in place here.
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    lease_id = (await client.call("findlock", model="m", lease_s=60))["replica"]["lease_id"]
    await pg.execute("UPDATE leases SET expires_at = now() - interval '1 second'")
    await fails(client.call("lease_renew", lease_id=lease_id, lease_s=60), 404, "expired")
    await client.call("inflight_dec", lease_id=lease_id)
    assert (await in_flight(pg), await lease_count(pg)) == (0, 0)


@pytest.mark.parametrize("bad", [0, -1, 86401, 86400.5, "x", "5", True, [1]])
async def test_a_bad_lease_s_is_400_naming_it(client: Client, bad: Any) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    await fails(client.call("findlock", model="m", lease_s=bad), 400, "lease_s")
    await fails(
        client.call("findlock", model="m", prefer={"node_id": a["id"]}, lease_s=bad),
        400,
        "lease_s",
    )
    await fails(client.call("lease_renew", lease_id="l", lease_s=bad), 400, "lease_s")
    got = await client.call("replica_get", node_id=a["id"], model="m")
    assert got["in_flight"] == 0


async def test_lease_renew_needs_both_fields(client: Client) -> None:
    await fails(client.call("lease_renew", lease_id="l"), 400, "missing", "lease_s")
    await fails(client.call("lease_renew", lease_s=5), 400, "missing", "lease_id")


async def test_the_longest_lease_is_a_day(client: Client, pg: asyncpg.Connection) -> None:
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    got = await client.call("findlock", model="m", lease_s=86400)
    assert await pg.fetchval(
        "SELECT expires_at > now() + interval '23 hours' FROM leases WHERE id = $1",
        got["replica"]["lease_id"],
    )
    got = await client.call("findlock", model="m", lease_s=0.001)
    assert got["replica"]["lease_id"]


async def test_removing_the_replica_drops_its_leases(
    client: Client, pg: asyncpg.Connection
) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    await client.replica(a)
    await client.replica(b)
    one = await client.call("findlock", model="m", lease_s=60)
    two = await client.call("findlock", model="m", lease_s=60)
    assert {one["node"]["id"], two["node"]["id"]} == {a["id"], b["id"]}
    await client.call("replica_remove", node_id=one["node"]["id"], model="m")
    await client.call("drain", node_id=two["node"]["id"])
    assert await lease_count(pg) == 0
    for got in (one, two):
        lease_id = got["replica"]["lease_id"]
        assert await client.call("inflight_dec", lease_id=lease_id) == {}
        await fails(client.call("lease_renew", lease_id=lease_id, lease_s=5), 404)


async def test_expired_leases_are_released_within_a_check_interval(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    pg: asyncpg.Connection,
) -> None:
    client = await clients(await start_daemon(**FAST))
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    short = await client.call("findlock", model="m", lease_s=0.3)
    await client.call("findlock", model="m", lease_s=3600)
    await client.call("findlock", model="m")
    assert await in_flight(pg) == 3
    started = time.monotonic()
    await until(lambda: lease_count_is(pg, 1), timeout=3)
    assert time.monotonic() - started < 0.3 + 1.0
    assert await in_flight(pg) == 2
    # Released as if by inflight_dec: giving it back now changes nothing.
    await client.call("inflight_dec", lease_id=short["replica"]["lease_id"])
    assert await in_flight(pg) == 2


async def lease_count_is(pg: asyncpg.Connection, n: int) -> bool:
    return await lease_count(pg) == n


# Slow: two daemons and leases left to expire.
@pytest.mark.slow
async def test_two_daemons_release_each_expired_lease_once(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    pg: asyncpg.Connection,
) -> None:
    # Rounds every 50 ms on both, so that they often overlap.
    first = await start_daemon(check_interval=0.05)
    await start_daemon(check_interval=0.05)
    client = await clients(first)
    for name in ("gpu-a", "gpu-b", "gpu-c"):
        await client.replica(await client.healthy_node(name))
    # Leases expiring over many rounds.
    bodies = [
        *({"model": "m", "lease_s": 0.1 + (i % 20) * 0.05} for i in range(200)),
        *({"model": "m", "lease_s": 3600} for _ in range(10)),
        *({"model": "m"} for _ in range(10)),
    ]
    await asyncio.gather(*(client.call("findlock", body) for body in bodies))
    await until(lambda: lease_count_is(pg, 10), timeout=5)
    assert await in_flight(pg) == 20
    # A few more rounds of both daemons: nothing is released twice.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert await in_flight(pg) == 20
        await asyncio.sleep(0.1)
    per_replica = await pg.fetch(
        """SELECT r.in_flight, (SELECT count(*) FROM leases l WHERE l.replica_id = r.id) AS leases
             FROM replicas r"""
    )
    assert all(r["in_flight"] >= r["leases"] for r in per_replica)


async def test_a_lease_survives_a_daemon_restart(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    pg: asyncpg.Connection,
) -> None:
    daemon = await start_daemon(**FAST)
    client = await clients(daemon)
    a = await client.healthy_node("gpu-a")
    await client.replica(a)
    lease_id = (await client.call("findlock", model="m", lease_s=3600))["replica"]["lease_id"]
    await daemon.stop()
    await start_daemon(**FAST)  # same subject prefix, same database
    got = await client.call("lease_renew", lease_id=lease_id, lease_s=0.3)
    assert when(got["expires_at"]) == await pg.fetchval("SELECT expires_at FROM leases")
    assert await in_flight(pg) == 1
    await until(lambda: lease_count_is(pg, 0), timeout=3)
    assert await in_flight(pg) == 0
    await fails(client.call("lease_renew", lease_id=lease_id, lease_s=5), 404)
