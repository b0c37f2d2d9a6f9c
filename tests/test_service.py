"""The `registry` micro service: discovery, statistics, and concurrent requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from daemon.app import Daemon
from subjects import OPERATIONS
from tests.support import CallError, Client, eventually


async def srv(client: Client, verb: str, daemon: Daemon) -> dict[str, Any]:
    # Address this daemon's instance by id: other test runs may share the NATS server.
    assert daemon.service is not None
    reply = await client.nc.request(f"$SRV.{verb}.registry.{daemon.service.id}", b"", timeout=5)
    return orjson.loads(reply.data)


# Every operation of the wire contract (CONTRACT.md), and its additions.
CONTRACT = """
register approve deregister offline unhealthy healthy drain heartbeat auth_refs get list stale
max_replicas max_replicas_reset find_vram find_idle find_least_loaded find_selector free_slots
capacity reserve_vram release_vram findlock replica_set replica_get replica_remove
replica_remove_all replica_touch replica_load_info inflight_inc inflight_dec replica_count
replica_next_index replica_stats node_models loaded_models nodes_with_model lru lru_global
loaded_count load_info_set load_info_get label_set labels_set label_remove labels_get labels_all
scheduling_set scheduling_get scheduling_list scheduling_delete unsatisfiable_bump
unsatisfiable_mark unsatisfiable_clear backend_op backend_ops backend_ops_count
backend_op_cancel lease_renew offline_self self node_key_reset explain replica_set_self
""".split()


async def test_every_operation_of_the_contract_is_served(client: Client, daemon: Daemon) -> None:
    info = await srv(client, "INFO", daemon)
    assert sorted(e["name"] for e in info["endpoints"]) == sorted(CONTRACT)


async def test_ping_and_info_describe_every_operation(client: Client, daemon: Daemon) -> None:
    ping = await srv(client, "PING", daemon)
    assert ping["name"] == "registry"
    info = await srv(client, "INFO", daemon)
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == {op.name for op in OPERATIONS}
    assert {e["queue_group"] for e in endpoints.values()} == {"registry"}
    prefix = client.prefix
    assert endpoints["register"]["subject"] == f"{prefix}.register"
    assert endpoints["heartbeat"]["subject"] == f"{prefix}.heartbeat.*"
    assert all(e["metadata"]["description"] for e in endpoints.values())


async def test_stats_count_requests_and_errors(client: Client, daemon: Daemon) -> None:
    await client.call("list")
    try:
        await client.call("approve", node_id="nope")
    except CallError as err:
        assert err.code == 404
    stats = {e["name"]: e for e in (await srv(client, "STATS", daemon))["endpoints"]}
    assert stats["list"]["num_requests"] == 1 and stats["list"]["num_errors"] == 0
    assert stats["approve"]["num_requests"] == 1 and stats["approve"]["num_errors"] == 1
    assert "404" in stats["approve"]["last_error"]
    assert stats["list"]["processing_time"] > 0


async def waiting_on_lock(pg: asyncpg.Connection, deadline: float) -> None:
    async def waiting() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
        )

    await eventually(
        waiting, "the first request to reach the database lock", deadline - time.monotonic()
    )


async def test_slow_requests_on_one_endpoint_overlap(
    client: Client, pg: asyncpg.Connection, database_url: str
) -> None:
    a = await client.healthy_node("gpu-a")
    b = await client.healthy_node("gpu-b")
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE", a["id"])
        slow = asyncio.create_task(client.call("offline", node_id=a["id"]))
        await waiting_on_lock(pg, time.monotonic() + 5)
        # The same endpoint answers another request while the first one waits:
        # served one at a time, this would wait behind the lock.
        assert await client.call("offline", node_id=b["id"]) == {}
        assert not slow.done()
        await tx.rollback()
        assert await slow == {}
    finally:
        await blocker.close()
    statuses = dict(await pg.fetch("SELECT name, status FROM nodes"))
    assert statuses == {"gpu-a": "offline", "gpu-b": "offline"}


async def test_stats_show_how_many_requests_each_batched_write_carried(
    client: Client, daemon: Daemon
) -> None:
    # An operator's view of the coalescing: routers' picks and releases that
    # arrive together go to PostgreSQL as fewer statements.
    node = await client.healthy_node("gpu-a")
    await client.replica(node)
    picks = await asyncio.gather(*(client.call("findlock", model="m") for _ in range(20)))
    await asyncio.gather(
        *(
            client.call("inflight_dec", node_id=node["id"], model="m", replica_index=0)
            for _ in picks
        )
    )
    stats = {e["name"]: e for e in (await srv(client, "STATS", daemon))["endpoints"]}
    for name in ("findlock", "inflight_dec"):
        data = stats[name]["data"]
        assert data["batched_requests"] == 20, name
        assert 1 <= data["writes"] < 20, name
        assert data["average_batch"] == round(20 / data["writes"], 2)
        assert 0 < data["write_time"] <= stats[name]["processing_time"]
    assert stats["list"]["data"] is None  # no batches there
    row = await client.call("replica_get", node_id=node["id"], model="m")
    assert row["in_flight"] == 0
