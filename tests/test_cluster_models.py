"""Cluster-wide model queries: where loaded, how busy, what to evict, load info."""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import pytest

from infra.wire import NEXT_HEADER
from tests.support import CallError, Client


async def test_replica_stats_and_loaded_models_see_loaded_replicas_on_healthy_nodes(
    client: Client,
) -> None:
    a = await client.healthy_node("a", max_replicas_per_model=2)
    b = await client.healthy_node("b")
    c = await client.healthy_node("c")
    await client.replica(a, "m", 0, in_flight=2)
    await client.replica(a, "m", 1, in_flight=0)
    await client.replica(b, "m", 0, state="loading")
    await client.replica(c, "m", 0, in_flight=7)
    await client.replica(c, "x", 0)
    await client.call("unhealthy", node_id=c["id"])

    stats = await client.call("replica_stats", model="m")
    assert sorted((s["node_id"], s["replica_index"], s["in_flight"]) for s in stats) == [
        (a["id"], 0, 2),
        (a["id"], 1, 0),
    ]
    assert await client.call("replica_stats", model="m", node_ids=[b["id"], c["id"]]) == []

    loaded = await client.call("loaded_models")
    assert sorted((r["model_name"], r["node_id"], r["replica_index"]) for r in loaded) == [
        ("m", a["id"], 0),
        ("m", a["id"], 1),
    ]
    await client.call("healthy", node_id=c["id"])
    page1, headers = await client.call_with_headers("loaded_models", limit=2)
    page2, headers2 = await client.call_with_headers(
        "loaded_models", limit=2, after=headers[NEXT_HEADER]
    )
    assert [r["model_name"] for r in page1 + page2] == ["m", "m", "m", "x"]
    assert NEXT_HEADER not in headers2


async def test_nodes_with_model_lists_each_node_once_least_busy_first(client: Client) -> None:
    a = await client.healthy_node("a", max_replicas_per_model=2)
    b = await client.healthy_node("b")
    d = await client.healthy_node("d")
    await client.replica(a, "m", 0, in_flight=5)
    await client.replica(a, "m", 1, in_flight=1)
    await client.replica(b, "m", 0, in_flight=3)
    await client.replica(d, "m", 0, in_flight=0)
    await client.call("drain", node_id=d["id"])
    nodes = await client.call("nodes_with_model", model="m")
    assert [(n["name"], n["model_in_flight"]) for n in nodes] == [("a", 1), ("b", 3)]
    assert await client.call("nodes_with_model", model="none") == []


async def test_nodes_with_model_pages_list_every_node_once_while_loads_change(
    client: Client,
) -> None:
    nodes = [await client.healthy_node(f"n{i}") for i in range(6)]
    for i, node in enumerate(nodes):
        await client.replica(node, "m", 0, in_flight=2 * i)
    ref = {"model": "m", "replica_index": 0}

    seen: list[str] = []
    fields: dict[str, Any] = {"model": "m", "limit": 1}
    for _ in range(20):
        items, headers = await client.call_with_headers("nodes_with_model", **fields)
        seen += [n["id"] for n in items]
        # The cluster works on between pages: the node just listed gets
        # busier, the busiest one not listed yet gets idler.
        for _ in range(3):
            await client.call("inflight_inc", node_id=items[0]["id"], **ref)
        busiest = max(
            (n for n in await client.call("nodes_with_model", model="m") if n["id"] not in seen),
            key=lambda n: n["model_in_flight"],
            default=None,
        )
        if busiest is not None:
            for _ in range(2):
                await client.call("inflight_dec", node_id=busiest["id"], **ref)
        if NEXT_HEADER not in headers:
            break
        fields["after"] = headers[NEXT_HEADER]

    assert sorted(seen) == sorted(n["id"] for n in nodes)

    # Each page is ordered least in flight first, as the whole list is.
    page, _ = await client.call_with_headers("nodes_with_model", model="m", limit=4)
    assert len(page) == 4
    assert page == sorted(page, key=lambda n: (n["model_in_flight"], n["id"]))
    everything = await client.call("nodes_with_model", model="m")
    assert everything == sorted(everything, key=lambda n: (n["model_in_flight"], n["id"]))


async def test_loaded_count(client: Client) -> None:
    a = await client.healthy_node("a", max_replicas_per_model=3)
    await client.replica(a, "m", 0)
    await client.replica(a, "m", 1)
    await client.replica(a, "m", 2, state="unloading")
    assert await client.call("loaded_count", model="m") == {"count": 2}
    assert await client.call("loaded_count", model="other") == {"count": 0}


async def test_lru_finds_the_idle_replica_used_longest_ago(
    client: Client, pg: asyncpg.Connection
) -> None:
    a = await client.healthy_node("a")
    b = await client.healthy_node("b")
    await client.replica(a, "old")
    await client.replica(a, "busy", in_flight=1)
    await client.replica(a, "new")
    await client.replica(b, "oldest")
    await pg.execute(
        "UPDATE replicas SET last_used = now() - CASE model_name WHEN 'oldest' THEN interval '3h'"
        " WHEN 'busy' THEN interval '4h' WHEN 'old' THEN interval '2h' ELSE interval '1h' END"
    )
    assert (await client.call("lru", node_id=a["id"]))["model_name"] == "old"
    assert (await client.call("lru_global"))["model_name"] == "oldest"
    await client.call("unhealthy", node_id=b["id"])
    assert (await client.call("lru_global"))["model_name"] == "old"
    with pytest.raises(CallError) as err:
        await client.call("lru", node_id=b["id"] + "x")
    assert err.value.code == 404
    await client.call("replica_remove_all", node_id=a["id"], model="old")
    await client.call("replica_remove_all", node_id=a["id"], model="new")
    with pytest.raises(CallError) as err:
        await client.call("lru_global")
    assert err.value.code == 404


async def test_load_info_round_trips_and_survives_the_replicas(client: Client) -> None:
    blob = bytes(range(256))
    opts = base64.b64encode(blob).decode()
    with pytest.raises(CallError) as err:
        await client.call("load_info_get", model="m")
    assert err.value.code == 404
    await client.call("load_info_set", model="m", backend_type="llama-cpp", model_opts=opts)
    assert await client.call("load_info_get", model="m") == {
        "backend_type": "llama-cpp",
        "model_opts": opts,
    }
    await client.call("load_info_set", model="m", backend_type="vllm")
    assert await client.call("load_info_get", model="m") == {
        "backend_type": "vllm",
        "model_opts": None,
    }
    with pytest.raises(CallError) as err:
        await client.call("load_info_set", model="m", model_opts="not base64!")
    assert err.value.code == 400 and "'model_opts'" in err.value.message


async def test_load_info_falls_back_to_a_loaded_replica(client: Client) -> None:
    a = await client.healthy_node("a")
    await client.replica(a, "m")
    opts = base64.b64encode(b"\x01\x02").decode()
    await client.call(
        "replica_load_info", node_id=a["id"], model="m", backend_type="llama-cpp", model_opts=opts
    )
    assert await client.call("load_info_get", model="m") == {
        "backend_type": "llama-cpp",
        "model_opts": opts,
    }
