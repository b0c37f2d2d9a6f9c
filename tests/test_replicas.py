"""Replicas: which model replica runs where, and the invalidations their removal sends."""

from __future__ import annotations

import base64
import re
from typing import Any

import asyncpg
import pytest

from tests.support import Client, drained_for, every_page, fails, next_for

INVALIDATE = "prefixcache.invalidate"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
REPLICA_FIELDS = {
    "id",
    "node_id",
    "model_name",
    "replica_index",
    "address",
    "state",
    "in_flight",
    "last_used",
    "loading_by",
    "backend_type",
    "created_at",
    "updated_at",
}

# ---------------------------------------------------------------- helpers


async def rows(pg: asyncpg.Connection, node_id: str) -> list[tuple[str, int]]:
    found = await pg.fetch(
        "SELECT model_name, replica_index FROM replicas WHERE node_id = $1 ORDER BY 1, 2", node_id
    )
    return [(r[0], r[1]) for r in found]


# ---------------------------------------------------------------- replica_set / replica_get


async def test_replica_set_inserts_then_updates(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")

    first = await client.call(
        "replica_set",
        node_id=node["id"],
        model="llama",
        replica_index=2,
        state="loading",
        address="10.0.0.1:40001",
        in_flight=1,
    )

    assert set(first) == REPLICA_FIELDS
    assert first["node_id"] == node["id"]
    assert first["model_name"] == "llama"
    assert first["replica_index"] == 2
    assert first["state"] == "loading"
    assert first["address"] == "10.0.0.1:40001"
    assert first["in_flight"] == 1
    for key in ("last_used", "created_at", "updated_at"):
        assert RFC3339_UTC.match(first[key]), first[key]

    second = await client.call(
        "replica_set",
        node_id=node["id"],
        model="llama",
        replica_index=2,
        state="loaded",
        address="10.0.0.1:40002",
        in_flight=0,
    )

    assert second["id"] == first["id"]
    assert second["created_at"] == first["created_at"]
    assert second["state"] == "loaded"
    assert second["address"] == "10.0.0.1:40002"
    assert second["in_flight"] == 0
    assert second["last_used"] >= first["last_used"]
    db = await pg.fetch("SELECT * FROM replicas WHERE node_id = $1", node["id"])
    assert len(db) == 1
    assert (db[0]["id"], db[0]["state"], db[0]["address"], db[0]["in_flight"]) == (
        first["id"],
        "loaded",
        "10.0.0.1:40002",
        0,
    )


async def test_replica_set_defaults(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    replica = await client.call("replica_set", node_id=node["id"], model="llama", state="idle")
    assert replica["replica_index"] == 0
    assert replica["address"] == ""
    assert replica["in_flight"] == 0
    assert replica["state"] == "idle"


async def test_replica_indexes_are_separate_rows(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    a = await client.replica(node["id"], "llama", 0)
    b = await client.replica(node["id"], "llama", 1)
    c = await client.replica(node["id"], "qwen", 0)
    assert len({a["id"], b["id"], c["id"]}) == 3
    assert await rows(pg, node["id"]) == [("llama", 0), ("llama", 1), ("qwen", 0)]


async def test_replica_get(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    stored = await client.replica(node["id"], "llama", 3, address="a:1", in_flight=2)
    got = await client.call("replica_get", node_id=node["id"], model="llama", replica_index=3)
    assert got == stored


async def test_replica_get_absent_is_404(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node["id"], "llama", 0)
    await fails(
        client.call("replica_get", node_id=node["id"], model="llama", replica_index=1),
        404,
        "llama",
    )
    await fails(client.call("replica_get", node_id=node["id"], model="qwen"), 404, "qwen")
    await fails(client.call("replica_get", node_id="ghost", model="llama"), 404, "ghost")


async def test_replica_set_unknown_node_is_404(client: Client, pg: asyncpg.Connection) -> None:
    await fails(client.replica("ghost", "llama"), 404, "node")
    assert await pg.fetchval("SELECT count(*) FROM replicas") == 0


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"state": "running"}, "'state'"),
        ({"state": None}, "'state'"),
        ({"state": "LOADED"}, "'state'"),
        ({"replica_index": -1}, "'replica_index'"),
        ({"replica_index": "0"}, "'replica_index'"),
        ({"in_flight": -1}, "'in_flight'"),
        ({"model": ""}, "'model'"),
        ({"model": "m" * 256}, "'model'"),
        ({"address": "a" * 513}, "'address'"),
    ],
)
async def test_replica_set_bad_request_names_the_field(
    client: Client, pg: asyncpg.Connection, fields: dict[str, Any], named: str
) -> None:
    node = await client.healthy_node("gpu-1")
    body: dict[str, Any] = {"node_id": node["id"], "model": "llama", "state": "loaded", **fields}
    body = {k: v for k, v in body.items() if v is not None}
    await fails(client.call("replica_set", **body), 400, named)
    assert await rows(pg, node["id"]) == []


async def test_replica_set_without_model_or_node_is_400(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await fails(client.call("replica_set", node_id=node["id"], state="loaded"), 400, "'model'")
    await fails(client.call("replica_set", model="llama", state="loaded"), 400, "'node_id'")


# ---------------------------------------------------------------- node_models


async def test_node_models(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    other = await client.healthy_node("gpu-2")
    for model, index in [("qwen", 0), ("llama", 1), ("llama", 0), ("mistral", 0)]:
        await client.replica(node["id"], model, index)
    await client.replica(other["id"], "llama", 0)

    replicas = await client.call("node_models", node_id=node["id"])

    assert [(r["model_name"], r["replica_index"]) for r in replicas] == [
        ("llama", 0),
        ("llama", 1),
        ("mistral", 0),
        ("qwen", 0),
    ]
    assert all(r["node_id"] == node["id"] for r in replicas)
    assert all(set(r) == REPLICA_FIELDS for r in replicas)


async def test_node_models_empty_and_unknown(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    assert await client.call("node_models", node_id=node["id"]) == []
    assert await client.call("node_models", node_id="ghost") == []


async def test_node_models_paging(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    for model, index in [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 10)]:
        await client.replica(node["id"], model, index)
    everything = await client.call("node_models", node_id=node["id"])

    pages = await every_page(client, "node_models", node_id=node["id"], limit=2)

    assert [len(p) for p in pages] == [2, 2, 1]
    assert [r for p in pages for r in p] == everything


async def test_node_models_bad_paging_is_400(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await fails(client.call("node_models", node_id=node["id"], limit=0), 400, "'limit'")
    await fails(client.call("node_models", node_id=node["id"], after="%%%"), 400, "'after'")
    # A cursor of another operation (list pages by name alone).
    await client.register("x")
    await client.register("y")
    _, headers = await client.call_with_headers("list", limit=1)
    await fails(
        client.call("node_models", node_id=node["id"], after=headers["Registry-Next"]),
        400,
        "'after'",
    )


# ---------------------------------------------------------------- replica_remove


async def test_replica_remove(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node["id"], "llama", 0)
    await client.replica(node["id"], "llama", 1)
    invalidations = await client.listen(INVALIDATE)

    reply = await client.call("replica_remove", node_id=node["id"], model="llama", replica_index=1)

    assert reply == {}
    assert await rows(pg, node["id"]) == [("llama", 0)]
    assert (await next_for(invalidations, node["id"]))[1] == {
        "model": "llama",
        "node_id": node["id"],
        "replica": 1,
    }
    assert await drained_for(invalidations, client, node["id"]) == []

    # Without replica_index, index 0 is meant.
    await client.call("replica_remove", node_id=node["id"], model="llama")
    assert await rows(pg, node["id"]) == []
    assert (await next_for(invalidations, node["id"]))[1] == {
        "model": "llama",
        "node_id": node["id"],
        "replica": 0,
    }


async def test_replica_remove_of_nothing_publishes_nothing(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node["id"], "llama", 0)
    invalidations = await client.listen(INVALIDATE)

    # Absent index, absent model, unknown node: all fine, none announced.
    assert (
        await client.call("replica_remove", node_id=node["id"], model="llama", replica_index=5)
        == {}
    )
    assert await client.call("replica_remove", node_id=node["id"], model="qwen") == {}
    assert await client.call("replica_remove", node_id="ghost", model="llama") == {}
    assert await rows(pg, node["id"]) == [("llama", 0)]

    await client.call("replica_remove", node_id=node["id"], model="llama", replica_index=0)
    assert (await next_for(invalidations, node["id"]))[1] == {
        "model": "llama",
        "node_id": node["id"],
        "replica": 0,
    }
    assert await drained_for(invalidations, client, node["id"], "ghost") == []


# ---------------------------------------------------------------- replica_remove_all


async def test_replica_remove_all(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    other = await client.healthy_node("gpu-2")
    for index in range(3):
        await client.replica(node["id"], "llama", index)
    await client.replica(node["id"], "qwen", 0)
    await client.replica(other["id"], "llama", 0)
    invalidations = await client.listen(INVALIDATE)

    assert await client.call("replica_remove_all", node_id=node["id"], model="llama") == {}

    assert await rows(pg, node["id"]) == [("qwen", 0)]
    assert await rows(pg, other["id"]) == [("llama", 0)]
    assert (await next_for(invalidations, node["id"]))[1] == {
        "model": "llama",
        "node_id": node["id"],
        "replica": -1,
    }
    # One event for all replicas, and nothing about the other node.
    assert await drained_for(invalidations, client, node["id"], other["id"]) == []


async def test_replica_remove_all_of_nothing_publishes_nothing(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node["id"], "qwen", 0)
    invalidations = await client.listen(INVALIDATE)

    assert await client.call("replica_remove_all", node_id=node["id"], model="llama") == {}
    assert await client.call("replica_remove_all", node_id="ghost", model="llama") == {}
    await client.call("replica_remove_all", node_id=node["id"], model="qwen")

    assert (await next_for(invalidations, node["id"]))[1] == {
        "model": "qwen",
        "node_id": node["id"],
        "replica": -1,
    }


@pytest.mark.parametrize("op", ["replica_remove", "replica_remove_all", "replica_get"])
async def test_replica_lookups_need_node_and_model(client: Client, op: str) -> None:
    await fails(client.call(op, model="llama"), 400, "'node_id'")
    await fails(client.call(op, node_id="n"), 400, "'model'")


async def test_deregistered_node_loses_its_replicas(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node["id"], "llama", 0)
    await client.call("deregister", node_id=node["id"])
    await fails(client.call("replica_get", node_id=node["id"], model="llama"), 404)
    assert await client.call("node_models", node_id=node["id"]) == []


# ---------------------------------------------------------------- bookkeeping


async def test_touch_refreshes_last_used_only(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node, "m", in_flight=2)
    await pg.execute("UPDATE replicas SET last_used = now() - interval '1 hour'")
    before = await client.call("replica_get", node_id=node["id"], model="m")
    assert await client.call("replica_touch", node_id=node["id"], model="m") == {}
    after = await client.call("replica_get", node_id=node["id"], model="m")
    assert after["last_used"] > before["last_used"]
    assert after["in_flight"] == 2
    assert await client.call("replica_touch", node_id=node["id"], model="absent") == {}


async def test_load_info_is_stamped_on_the_replica(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    await client.replica(node, "m")
    opts = base64.b64encode(b"\x00opts\xff").decode()
    await client.call(
        "replica_load_info",
        node_id=node["id"],
        model="m",
        backend_type="llama-cpp",
        model_opts=opts,
    )
    row = await pg.fetchrow("SELECT backend_type, model_opts FROM replicas")
    assert (row["backend_type"], row["model_opts"]) == ("llama-cpp", b"\x00opts\xff")
    got = await client.call("replica_get", node_id=node["id"], model="m")
    assert got["backend_type"] == "llama-cpp"
    assert "model_opts" not in got  # option blobs are never returned with the replica
    await fails(
        client.call("replica_load_info", node_id=node["id"], model="m", model_opts="%%%"),
        400,
        "'model_opts'",
    )


async def test_replica_count_counts_every_state(client: Client) -> None:
    node = await client.healthy_node("gpu-1", max_replicas_per_model=4)
    for index, state in enumerate(("loaded", "loading", "unloading")):
        await client.replica(node, "m", index, state=state)
    await client.replica(node, "other")
    assert await client.call("replica_count", node_id=node["id"], model="m") == {"count": 3}
    assert await client.call("replica_count", node_id="ghost", model="m") == {"count": 0}


async def test_next_index_is_the_lowest_free_one(client: Client) -> None:
    node = await client.healthy_node("gpu-1", max_replicas_per_model=4)
    ref = {"node_id": node["id"], "model": "m"}
    assert await client.call("replica_next_index", **ref, max_slots=3) == {"replica_index": 0}
    await client.replica(node, "m", 0)
    await client.replica(node, "m", 2)
    assert await client.call("replica_next_index", **ref, max_slots=3) == {"replica_index": 1}
    await client.replica(node, "m", 1)
    err = await fails(client.call("replica_next_index", **ref, max_slots=3), 409, "3")
    assert err.body["error"]["status"] == "conflict"
    assert await client.call("replica_next_index", **ref, max_slots=4) == {"replica_index": 3}
    await client.call("replica_remove", **ref, replica_index=0)
    assert await client.call("replica_next_index", **ref, max_slots=3) == {"replica_index": 0}
    for slots in (0, -1):
        await fails(client.call("replica_next_index", **ref, max_slots=slots), 409)
    await fails(client.call("replica_next_index", **ref), 400, "'max_slots'")
