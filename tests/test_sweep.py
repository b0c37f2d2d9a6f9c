"""The health sweep: stale nodes go unhealthy (or offline), revived ones healthy."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from daemon.app import Daemon
from daemon.sweep import SWEEP_LOCK_KEY
from tests.conftest import through
from tests.support import Client, Listener, Proxy, drained_for, next_for, until

# A round every 0.2 s; a node is stale after 30 s without a heartbeat, so the
# nodes a test registers stay fresh unless the test ages them.
FAST = {"check_interval": 0.2, "stale_after": 30}
PERIOD = FAST["check_interval"]


async def age(pg: asyncpg.Connection, *node_ids: str, seconds: int = 120) -> None:
    """Pretend the nodes have been silent for `seconds`."""
    await pg.execute(
        "UPDATE nodes SET last_heartbeat = now() - make_interval(secs => $2) WHERE id = ANY($1)",
        list(node_ids),
        seconds,
    )


async def status(pg: asyncpg.Connection, node_id: str) -> str:
    return await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node_id)


def becomes(pg: asyncpg.Connection, node_id: str, wanted: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await status(pg, node_id) == wanted

    return check


async def heartbeat(client: Client, node_id: str) -> None:
    """A real heartbeat, as a worker sends it (with a reply, to know it landed)."""
    assert await client.call(f"heartbeat.{node_id}", available_vram=1) == {}


@pytest.fixture
async def sweeping(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
) -> Callable[..., Awaitable[Client]]:
    """A daemon sweeping every 0.2 s (with setting overrides), and its client."""

    async def make(**overrides: Any) -> Client:
        return await clients(await start_daemon(**{**FAST, **overrides}))

    return make


async def node_events(client: Client) -> Listener:
    return await client.listen(f"{client.prefix}.events.node.>")


async def test_a_silent_healthy_node_becomes_unhealthy(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection
) -> None:
    client = await sweeping()
    silent = await client.healthy_node("gpu-silent")
    alive = await client.healthy_node("gpu-alive")
    await client.replica(silent)
    events = await node_events(client)
    invalidations = await client.listen("prefixcache.invalidate")

    await age(pg, silent["id"])
    await until(becomes(pg, silent["id"], "unhealthy"))
    _, event = await next_for(events, silent["id"])
    assert event == {
        "node_id": silent["id"],
        "name": "gpu-silent",
        "status": "unhealthy",
        "previous_status": "healthy",
        "reason": event["reason"],
    }
    assert re.fullmatch(r"no heartbeat for 12\ds", event["reason"]), event
    # Unhealthy keeps the replicas (the next heartbeat may revive the node),
    # but routing no longer picks them.
    assert await client.call("replica_get", node_id=silent["id"], model="m")
    assert await status(pg, alive["id"]) == "healthy"
    assert await drained_for(invalidations, client, silent["id"], alive["id"]) == []
    assert await drained_for(events, client, silent["id"], alive["id"]) == []


async def test_with_auto_offline_a_silent_node_goes_offline_and_loses_its_replicas(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection
) -> None:
    client = await sweeping(auto_offline=True)
    silent = await client.healthy_node("gpu-silent")
    alive = await client.healthy_node("gpu-alive")
    await client.replica(silent, "m1", 0)
    await client.replica(silent, "m1", 1)
    await client.replica(silent, "m2", 0)
    await client.replica(alive, "m1", 0)
    lease = await client.call("findlock", model="m2", lease_s=600)
    events = await node_events(client)
    invalidations = await client.listen("prefixcache.invalidate")

    await age(pg, silent["id"])
    await until(becomes(pg, silent["id"], "offline"))
    _, event = await next_for(events, silent["id"])
    assert (event["status"], event["previous_status"]) == ("offline", "healthy")
    assert event["reason"].startswith("no heartbeat for ")
    assert await pg.fetchval("SELECT count(*) FROM replicas WHERE node_id = $1", silent["id"]) == 0
    assert (
        await pg.fetchval("SELECT count(*) FROM leases WHERE id = $1", lease["replica"]["lease_id"])
        == 0
    )
    removed = await drained_for(invalidations, client, silent["id"], alive["id"])
    assert sorted(removed, key=lambda e: e["model"]) == [
        {"model": "m1", "node_id": silent["id"], "replica": -1},
        {"model": "m2", "node_id": silent["id"], "replica": -1},
    ]
    assert await client.call("replica_get", node_id=alive["id"], model="m1")
    assert await status(pg, alive["id"]) == "healthy"


@pytest.mark.parametrize("auto_offline", [False, True])
async def test_a_heartbeat_brings_a_swept_node_back(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection, auto_offline: bool
) -> None:
    client = await sweeping(auto_offline=auto_offline)
    node = await client.healthy_node("gpu-1")
    gone = "offline" if auto_offline else "unhealthy"
    events = await node_events(client)
    await age(pg, node["id"])
    await until(becomes(pg, node["id"], gone))
    assert (await next_for(events, node["id"]))[1]["status"] == gone

    await heartbeat(client, node["id"])
    await until(becomes(pg, node["id"], "healthy"))
    _, event = await next_for(events, node["id"])
    assert event == {
        "node_id": node["id"],
        "name": "gpu-1",
        "status": "healthy",
        "previous_status": gone,
        "reason": "heartbeat resumed",
    }
    # Routing picks it again once it has a replica.
    await client.replica(node)
    assert (await client.call("findlock", model="m"))["node"]["id"] == node["id"]


@pytest.mark.parametrize("op", ["unhealthy", "offline"])
async def test_a_node_marked_down_by_hand_waits_for_its_next_heartbeat(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection, op: str
) -> None:
    # Its last heartbeat is fresh, but older than the mark: not a sign of life.
    client = await sweeping()
    node = await client.healthy_node("gpu-1")
    control = await client.healthy_node("gpu-control")
    await client.call(op, node_id=node["id"])
    await age(pg, control["id"])
    await until(becomes(pg, control["id"], "unhealthy"))  # a round went by...
    await heartbeat(client, control["id"])
    await until(becomes(pg, control["id"], "healthy"))  # ...and another
    assert await status(pg, node["id"]) == op
    await heartbeat(client, node["id"])
    await until(becomes(pg, node["id"], "healthy"))


async def test_draining_and_pending_nodes_are_left_alone(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection
) -> None:
    client = await sweeping(auto_offline=True)
    draining = await client.healthy_node("gpu-draining")
    await client.call("drain", node_id=draining["id"])
    pending = await client.register("gpu-pending")
    assert pending["status"] == "pending"
    control = await client.healthy_node("gpu-control")
    events = await node_events(client)

    # Stale: the round that takes the control node down passes them over.
    await age(pg, draining["id"], pending["id"], control["id"])
    await until(becomes(pg, control["id"], "offline"))
    # Fresh again: the round that revives the control node passes them over.
    for node in (draining, pending, control):
        await heartbeat(client, node["id"])
    await until(becomes(pg, control["id"], "healthy"))
    assert await status(pg, draining["id"]) == "draining"
    assert await status(pg, pending["id"]) == "pending"  # still needs approval
    assert await drained_for(events, client, draining["id"], pending["id"]) == []
    # Approval still works, and then the node is swept like any other.
    await client.call("approve", node_id=pending["id"])
    await age(pg, pending["id"])
    await until(becomes(pg, pending["id"], "offline"))


async def test_a_registering_node_is_left_alone(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection
) -> None:
    client = await sweeping()
    node = await client.healthy_node("gpu-1")
    control = await client.healthy_node("gpu-control")
    await pg.execute("UPDATE nodes SET status = 'registering' WHERE id = $1", node["id"])
    await age(pg, node["id"], control["id"])
    await until(becomes(pg, control["id"], "unhealthy"))
    assert await status(pg, node["id"]) == "registering"


async def test_one_instance_sweeps_and_each_change_is_announced_once(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    pg: asyncpg.Connection,
) -> None:
    first = await start_daemon(**FAST, auto_offline=True)
    await start_daemon(**FAST, auto_offline=True)
    client = await clients(first)
    nodes = [await client.healthy_node(f"gpu-{i}") for i in range(6)]
    ids = [n["id"] for n in nodes]
    for node in nodes:
        await client.replica(node)
    events = await node_events(client)
    invalidations = await client.listen("prefixcache.invalidate")

    async def all_are(wanted: str) -> bool:
        rows = await pg.fetch("SELECT status FROM nodes WHERE id = ANY($1)", ids)
        return all(r[0] == wanted for r in rows)

    await age(pg, *ids)
    await until(lambda: all_are("offline"))
    for node_id in ids:
        await heartbeat(client, node_id)
    await until(lambda: all_are("healthy"))
    # Listen on through a few more rounds of both daemons.
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5 * PERIOD
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.append((await events.next(timeout=left))[1])
        except TimeoutError:
            break
    seen += await drained_for(events, client, *ids)
    changes = Counter((e["node_id"], e["status"]) for e in seen if e["node_id"] in ids)
    assert changes == Counter(
        {**{(i, "offline"): 1 for i in ids}, **{(i, "healthy"): 1 for i in ids}}
    )
    removed = Counter(e["node_id"] for e in await drained_for(invalidations, client, *ids))
    assert removed == Counter(ids)


async def test_a_round_is_skipped_while_another_instance_holds_the_lock(
    sweeping: Callable[..., Awaitable[Client]], pg: asyncpg.Connection
) -> None:
    client = await sweeping()
    node = await client.healthy_node("gpu-1")
    await age(pg, node["id"])
    async with pg.transaction():
        await pg.execute("SELECT pg_advisory_xact_lock($1)", SWEEP_LOCK_KEY)
        deadline = time.monotonic() + 5 * PERIOD
        while time.monotonic() < deadline:
            assert await status(pg, node["id"]) == "healthy"
            await asyncio.sleep(PERIOD / 2)
    await until(becomes(pg, node["id"], "unhealthy"))


async def test_the_sweep_outlives_a_broken_database(
    sweeping: Callable[..., Awaitable[Client]],
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registryd.sweep")
    client = await sweeping()
    node = await client.healthy_node("gpu-1")

    def failures() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "registryd.sweep" and "health sweep failed" in r.getMessage()
        ]

    async def failed() -> bool:
        return bool(failures())

    await pg.execute("ALTER TABLE nodes RENAME TO nodes_away")
    try:
        await until(failed)
        assert "nodes" in failures()[0].getMessage()
        # Further rounds fail the same way: the outage is logged once.
        deadline = time.monotonic() + 5 * PERIOD
        while time.monotonic() < deadline:
            assert len(failures()) == 1
            await asyncio.sleep(PERIOD / 2)
    finally:
        await pg.execute("ALTER TABLE nodes_away RENAME TO nodes")
    await age(pg, node["id"])
    await until(becomes(pg, node["id"], "unhealthy"))

    # The round logs its recovery once it has published its events, a moment
    # after the commit the line above saw: wait for the line, too.
    async def recovered() -> bool:
        return any(
            r.name == "registryd.sweep" and r.getMessage() == "health sweep working again"
            for r in caplog.records
        )

    await until(recovered)
    assert len(failures()) == 1


async def test_the_sweep_outlives_an_unreachable_database(
    sweeping: Callable[..., Awaitable[Client]],
    pg: asyncpg.Connection,
    database_url: str,
    proxy: Proxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registryd.sweep")
    client = await sweeping(database_url=through(database_url, proxy.port), db_timeout=1.0)
    node = await client.healthy_node("gpu-1")
    proxy.cut()

    def logged(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "registryd.sweep" and text in r.getMessage()]

    async def failed() -> bool:
        return bool(logged("health sweep failed"))

    await until(failed, timeout=10)
    proxy.restore()
    await age(pg, node["id"])
    await until(becomes(pg, node["id"], "unhealthy"), timeout=15)

    async def recovered() -> bool:  # logged after the round's events: wait for it
        return logged("health sweep working again")

    await until(recovered)
