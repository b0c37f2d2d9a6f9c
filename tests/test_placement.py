"""Placement queries and VRAM reservations, as a scheduler uses them."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest

from tests.support import CallError, Client

GiB = 1 << 30


async def not_found(client: Client, op: str, **fields: Any) -> CallError:
    with pytest.raises(CallError) as err:
        await client.call(op, **fields)
    assert err.value.code == 404
    return err.value


async def test_find_vram_prefers_idle_nodes_by_effectively_free_vram(
    client: Client, pg: asyncpg.Connection
) -> None:
    busy = await client.healthy_node("busy", available_vram=40 * GiB)
    await client.healthy_node("idle-a", available_vram=20 * GiB)
    idle_b = await client.healthy_node("idle-b", available_vram=24 * GiB)
    await client.replica(busy)
    # idle-b has more VRAM, but 8 GiB of it is reserved: idle-a is freer.
    await client.call("reserve_vram", node_id=idle_b["id"], bytes=8 * GiB)
    got = await client.call("find_vram", min_bytes=10 * GiB)
    assert got["name"] == "idle-a"
    # Idle nodes first even when a busy one has more room...
    assert (await client.call("find_vram", min_bytes=GiB))["name"] == "idle-a"
    # ...but only those with room: then the busy one.
    assert (await client.call("find_vram", min_bytes=30 * GiB))["name"] == "busy"
    await not_found(client, "find_vram", min_bytes=41 * GiB)
    # node_ids restricts the candidates.
    got = await client.call("find_vram", min_bytes=GiB, node_ids=[busy["id"], idle_b["id"]])
    assert got["name"] == "idle-b"


async def test_find_vram_among_busy_nodes_takes_the_least_in_flight(client: Client) -> None:
    a = await client.healthy_node("a", available_vram=10 * GiB)
    b = await client.healthy_node("b", available_vram=20 * GiB)
    await client.replica(a, in_flight=1)
    await client.replica(b, in_flight=4)
    assert (await client.call("find_vram", min_bytes=GiB))["name"] == "a"
    await client.replica(a, in_flight=4)
    assert (await client.call("find_vram", min_bytes=GiB))["name"] == "b"  # tie: more VRAM


async def test_only_healthy_backend_nodes_are_candidates(client: Client) -> None:
    await client.register("pending", available_vram=80 * GiB)
    agent = await client.healthy_node("agent", node_type="agent", available_vram=80 * GiB)
    sick = await client.healthy_node("sick", available_vram=80 * GiB)
    await client.call("unhealthy", node_id=sick["id"])
    for op in ("find_vram", "find_idle", "find_least_loaded"):
        await not_found(client, op)
    assert await client.call("find_selector") == []
    assert await client.call("free_slots", model="m") == []
    assert await client.call("capacity", model="m") == {"capacity": 0}
    ok = await client.healthy_node("ok", available_vram=GiB)
    for op in ("find_vram", "find_idle", "find_least_loaded"):
        assert (await client.call(op))["id"] == ok["id"]
    assert agent["node_type"] == "agent"


async def test_find_idle_skips_nodes_with_a_loaded_replica(client: Client) -> None:
    a = await client.healthy_node("a", available_vram=80 * GiB)
    b = await client.healthy_node("b", available_vram=8 * GiB)
    c = await client.healthy_node("c", available_vram=16 * GiB)
    await client.replica(a)
    await client.replica(c, state="loading")  # loading is not loaded: still idle
    assert (await client.call("find_idle"))["name"] == "c"
    assert (await client.call("find_idle", node_ids=[a["id"], b["id"]]))["name"] == "b"
    await not_found(client, "find_idle", node_ids=[a["id"]])


async def test_find_least_loaded_counts_every_replica_of_the_node(client: Client) -> None:
    a = await client.healthy_node("a", available_vram=GiB, max_replicas_per_model=3)
    b = await client.healthy_node("b", available_vram=2 * GiB)
    await client.replica(a, index=0, in_flight=1)
    await client.replica(a, index=1, in_flight=1)
    await client.replica(b, in_flight=1)
    assert (await client.call("find_least_loaded"))["name"] == "b"
    await client.replica(b, in_flight=2)
    assert (await client.call("find_least_loaded"))["name"] == "b"  # 2 = 2: more VRAM
    await client.replica(b, in_flight=3)
    assert (await client.call("find_least_loaded"))["name"] == "a"


async def test_find_selector_is_an_and_of_label_pairs(client: Client) -> None:
    a = await client.healthy_node("a", labels={"zone": "eu", "tier": "a100"})
    b = await client.healthy_node("b", labels={"zone": "eu", "tier": "l4"})
    await client.healthy_node("c", labels={"zone": "us", "tier": "a100"})
    names = lambda nodes: [n["name"] for n in nodes]  # noqa: E731
    assert names(await client.call("find_selector", selector={"zone": "eu"})) == ["a", "b"]
    assert names(await client.call("find_selector", selector={"zone": "eu", "tier": "a100"})) == [
        "a"
    ]
    assert names(await client.call("find_selector", selector={"zone": "mars"})) == []
    assert names(await client.call("find_selector", selector={})) == ["a", "b", "c"]
    assert names(await client.call("find_selector", selector={"node.name": "b"})) == ["b"]
    await client.call("drain", node_id=b["id"])
    assert names(await client.call("find_selector", selector={"zone": "eu"})) == ["a"]
    assert a["status"] == "healthy"
    with pytest.raises(CallError) as err:
        await client.call("find_selector", selector={"zone": 1})
    assert err.value.code == 400 and "'selector.zone'" in err.value.message


async def test_free_slots_and_capacity_follow_the_replica_caps(client: Client) -> None:
    one = await client.healthy_node("one")
    three = await client.healthy_node("three", max_replicas_per_model=3)
    assert [n["name"] for n in await client.call("free_slots", model="m")] == ["one", "three"]
    assert await client.call("capacity", model="m") == {"capacity": 4}
    await client.replica(one)
    await client.replica(three, index=0)
    await client.replica(three, index=1, state="loading")  # a load in progress counts
    assert [n["name"] for n in await client.call("free_slots", model="m")] == ["three"]
    assert await client.call("capacity", model="m") == {"capacity": 1}
    assert await client.call("capacity", model="m", node_ids=[one["id"]]) == {"capacity": 0}
    assert await client.call("capacity", model="other") == {"capacity": 4}
    # A cap lowered below what runs counts as no room, never as negative room.
    await client.call("max_replicas", node_id=three["id"], max_replicas_per_model=1)
    assert await client.call("capacity", model="m") == {"capacity": 0}


async def test_reservations_are_admitted_in_one_update(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu", available_vram=10 * GiB)
    results = await asyncio.gather(
        *(client.call("reserve_vram", node_id=node["id"], bytes=GiB) for _ in range(25)),
        return_exceptions=True,
    )
    outcome = Counter("ok" if r == {} else r.code for r in results)  # type: ignore[union-attr]
    assert outcome == {"ok": 10, 409: 15}
    assert await pg.fetchval("SELECT reserved_vram FROM nodes") == 10 * GiB
    await not_found(client, "find_vram", min_bytes=1)


async def test_release_never_goes_below_zero_and_a_reading_clears_reservations(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu", available_vram=10 * GiB)
    await client.call("reserve_vram", node_id=node["id"], bytes=3 * GiB)
    await client.call("release_vram", node_id=node["id"], bytes=GiB)
    assert await pg.fetchval("SELECT reserved_vram FROM nodes") == 2 * GiB
    await client.call("release_vram", node_id=node["id"], bytes=5 * GiB)
    assert await pg.fetchval("SELECT reserved_vram FROM nodes") == 0
    await client.call("reserve_vram", node_id=node["id"], bytes=4 * GiB)
    await client.call(f"heartbeat.{node['id']}", available_vram=9 * GiB)
    assert await pg.fetchval("SELECT reserved_vram FROM nodes") == 0
    # Zero bytes is a no-op, even on a full node.
    await client.call("reserve_vram", node_id=node["id"], bytes=9 * GiB)
    assert await client.call("reserve_vram", node_id=node["id"], bytes=0) == {}
    for op in ("reserve_vram", "release_vram"):
        await not_found(client, op, node_id="ghost", bytes=1)
    with pytest.raises(CallError) as err:
        await client.call("reserve_vram", node_id=node["id"], bytes=-1)
    assert err.value.code == 400 and "'bytes'" in err.value.message
