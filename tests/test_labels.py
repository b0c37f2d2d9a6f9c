"""Labels: the key/value pairs on nodes that scheduling selectors match."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from tests.support import CallError, Client, add_cooldowns, cooldowns, every_page, fails

# ---------------------------------------------------------------- helpers


async def db_labels(pg: asyncpg.Connection, node_id: str) -> dict[str, str]:
    rows = await pg.fetch("SELECT key, value FROM node_labels WHERE node_id = $1", node_id)
    return {r["key"]: r["value"] for r in rows}


async def bare_node(client: Client, name: str) -> str:
    """A healthy node whose labels were all removed, so tests see only their own."""
    node = await client.healthy_node(name)
    await client.call("labels_set", node_id=node["id"], labels={})
    return node["id"]


# ---------------------------------------------------------------- label_set


async def test_label_set_inserts_and_replaces(client: Client, pg: asyncpg.Connection) -> None:
    node_id = await bare_node(client, "gpu-1")

    assert await client.call("label_set", node_id=node_id, key="zone", value="eu-1") == {}
    assert await client.call("labels_get", node_id=node_id) == {"zone": "eu-1"}

    assert await client.call("label_set", node_id=node_id, key="zone", value="eu-2") == {}
    await client.call("label_set", node_id=node_id, key="tier", value="")
    assert await client.call("labels_get", node_id=node_id) == {"zone": "eu-2", "tier": ""}
    assert await db_labels(pg, node_id) == {"zone": "eu-2", "tier": ""}


async def test_label_set_keeps_other_nodes_apart(client: Client) -> None:
    a = await bare_node(client, "a")
    b = await bare_node(client, "b")
    await client.call("label_set", node_id=a, key="zone", value="x")
    await client.call("label_set", node_id=b, key="zone", value="y")
    assert await client.call("labels_get", node_id=a) == {"zone": "x"}
    assert await client.call("labels_get", node_id=b) == {"zone": "y"}


async def test_label_keys_and_values_with_odd_characters(client: Client) -> None:
    node_id = await bare_node(client, "gpu-1")
    labels = {"k8s.io/zone": "eu west 1", "ключ": "значение ✓", "a*b>c": "x.y.z"}
    for key, value in labels.items():
        await client.call("label_set", node_id=node_id, key=key, value=value)
    assert await client.call("labels_get", node_id=node_id) == labels


async def test_label_set_unknown_node_is_404(client: Client, pg: asyncpg.Connection) -> None:
    await fails(client.call("label_set", node_id="ghost", key="k", value="v"), 404, "node")
    assert await pg.fetchval("SELECT count(*) FROM node_labels") == 0


async def test_label_length_limits(client: Client, pg: asyncpg.Connection) -> None:
    node_id = await bare_node(client, "gpu-1")
    await fails(client.call("label_set", node_id=node_id, key="k" * 129, value="v"), 400, "'key'")
    await fails(client.call("label_set", node_id=node_id, key="k", value="v" * 256), 400, "'value'")
    await fails(client.call("label_set", node_id=node_id, key="", value="v"), 400, "'key'")
    assert await db_labels(pg, node_id) == {}

    await client.call("label_set", node_id=node_id, key="k" * 128, value="v" * 255)
    assert await db_labels(pg, node_id) == {"k" * 128: "v" * 255}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"key": "k", "value": "v"}, "'node_id'"),
        ({"node_id": "n", "value": "v"}, "'key'"),
        ({"node_id": "n", "key": "k"}, "'value'"),
        ({"node_id": "n", "key": 5, "value": "v"}, "'key'"),
        ({"node_id": "n", "key": "k", "value": 5}, "'value'"),
    ],
)
async def test_label_set_bad_request_names_the_field(
    client: Client, fields: dict[str, Any], named: str
) -> None:
    await fails(client.call("label_set", **fields), 400, named)


# ---------------------------------------------------------------- labels_set


async def test_labels_set_replaces_all(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1", gpu_vendor="nvidia", labels={"zone": "a"})
    await client.call("label_set", node_id=node["id"], key="owner", value="ops")

    reply = await client.call("labels_set", node_id=node["id"], labels={"zone": "b", "rack": "7"})

    assert reply == {}
    assert await client.call("labels_get", node_id=node["id"]) == {"zone": "b", "rack": "7"}
    assert await db_labels(pg, node["id"]) == {"zone": "b", "rack": "7"}


async def test_labels_set_empty_clears(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1", labels={"zone": "a"})
    await client.call("labels_set", node_id=node["id"], labels={})
    assert await client.call("labels_get", node_id=node["id"]) == {}
    assert await db_labels(pg, node["id"]) == {}


async def test_labels_set_leaves_other_nodes_alone(client: Client) -> None:
    a = await bare_node(client, "a")
    b = await bare_node(client, "b")
    await client.call("label_set", node_id=b, key="zone", value="y")
    await client.call("labels_set", node_id=a, labels={"zone": "x"})
    await client.call("labels_set", node_id=a, labels={})
    assert await client.call("labels_get", node_id=b) == {"zone": "y"}


async def test_labels_set_unknown_node_is_404(client: Client, pg: asyncpg.Connection) -> None:
    await fails(client.call("labels_set", node_id="ghost", labels={"a": "b"}), 404, "ghost")
    await fails(client.call("labels_set", node_id="ghost", labels={}), 404, "ghost")
    assert await pg.fetchval("SELECT count(*) FROM node_labels") == 0


@pytest.mark.parametrize(
    "labels",
    [{"k" * 129: "v"}, {"k": "v" * 256}, {"": "v"}, {"k": 1}, ["k", "v"], "k=v", None],
)
async def test_labels_set_bad_labels_is_400(
    client: Client, pg: asyncpg.Connection, labels: Any
) -> None:
    node_id = await bare_node(client, "gpu-1")
    await client.call("label_set", node_id=node_id, key="keep", value="me")
    fields = {} if labels is None else {"labels": labels}
    await fails(client.call("labels_set", node_id=node_id, **fields), 400, "'labels")
    assert await db_labels(pg, node_id) == {"keep": "me"}


# ---------------------------------------------------------------- label_remove


async def test_label_remove(client: Client, pg: asyncpg.Connection) -> None:
    node_id = await bare_node(client, "gpu-1")
    await client.call("labels_set", node_id=node_id, labels={"a": "1", "b": "2"})

    assert await client.call("label_remove", node_id=node_id, key="a") == {}
    assert await client.call("labels_get", node_id=node_id) == {"b": "2"}

    # An absent key is fine.
    assert await client.call("label_remove", node_id=node_id, key="a") == {}
    assert await client.call("label_remove", node_id=node_id, key="never") == {}
    assert await db_labels(pg, node_id) == {"b": "2"}


async def test_label_remove_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("label_remove", node_id="ghost", key="a"), 404, "ghost")


async def test_label_remove_missing_key_is_400(client: Client) -> None:
    node_id = await bare_node(client, "gpu-1")
    await fails(client.call("label_remove", node_id=node_id), 400, "'key'")


# ---------------------------------------------------------------- labels_get / labels_all


async def test_labels_get_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("labels_get", node_id="ghost"), 404, "ghost")
    await fails(client.call("labels_get"), 400, "'node_id'")


async def test_labels_get_of_a_node_without_labels_is_empty(client: Client) -> None:
    node_id = await bare_node(client, "gpu-1")
    assert await client.call("labels_get", node_id=node_id) == {}


async def test_labels_all(client: Client) -> None:
    assert await client.call("labels_all") == {}
    a = await bare_node(client, "a")
    b = await bare_node(client, "b")
    c = await bare_node(client, "c")
    await client.call("labels_set", node_id=a, labels={"zone": "x", "rack": "1"})
    await client.call("labels_set", node_id=b, labels={"zone": "y"})

    everything = await client.call("labels_all")

    # Nodes without labels are left out.
    assert everything == {a: {"zone": "x", "rack": "1"}, b: {"zone": "y"}}
    assert c not in everything


async def test_labels_all_includes_auto_labels(client: Client) -> None:
    node = await client.register("gpu-1", gpu_vendor="amd")
    assert await client.call("labels_all") == {
        node["id"]: {"gpu.vendor": "amd", "node.name": "gpu-1", "node.replica-slots": "1"}
    }


# ---------------------------------------------------------------- scheduling cooldowns


@pytest.mark.parametrize(
    ("op", "fields"),
    [
        ("label_set", {"key": "zone", "value": "x"}),
        ("labels_set", {"labels": {"zone": "x"}}),
        ("labels_set", {"labels": {}}),
        ("label_remove", {"key": "zone"}),
        ("label_remove", {"key": "absent"}),
    ],
)
async def test_label_changes_clear_scheduling_cooldowns(
    client: Client, pg: asyncpg.Connection, op: str, fields: dict[str, Any]
) -> None:
    node = await client.healthy_node("gpu-1", labels={"zone": "a"})
    await add_cooldowns(pg, "llama", "qwen")

    await client.call(op, node_id=node["id"], **fields)

    assert await cooldowns(pg) == [(0, None), (0, None)]


@pytest.mark.parametrize(
    ("op", "fields"),
    [
        ("label_set", {"key": "zone", "value": "x"}),
        ("labels_set", {"labels": {"zone": "x"}}),
        ("label_remove", {"key": "zone"}),
    ],
)
async def test_failed_label_changes_keep_scheduling_cooldowns(
    client: Client, pg: asyncpg.Connection, op: str, fields: dict[str, Any]
) -> None:
    await add_cooldowns(pg, "llama", "qwen")
    await fails(client.call(op, node_id="ghost", **fields), 404)
    rows = await cooldowns(pg)
    assert len(rows) == 2
    assert all(ticks == 3 and until is not None for ticks, until in rows)


async def test_labels_all_pages_by_node_id(client: Client) -> None:
    ids = []
    for name in ["a", "b", "c", "d", "e"]:
        node_id = await bare_node(client, name)
        await client.call("labels_set", node_id=node_id, labels={"zone": name})
        ids.append(node_id)
    await bare_node(client, "unlabelled")  # left out, as without paging
    everything = await client.call("labels_all")

    pages: list[Any] = await every_page(client, "labels_all", limit=2)

    # Still an object keyed by node id, in node id order across the pages.
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [k for p in pages for k in p] == sorted(ids)
    assert {k: v for p in pages for k, v in p.items()} == everything
    await fails(client.call("labels_all", limit=1, after="W10"), 400, "'after'")
    await fails(client.call("labels_all", limit=0), 400, "'limit'")


# ---------------------------------------------------------------- the label cap


def many(count: int, prefix: str = "k") -> dict[str, str]:
    return {f"{prefix}{i}": "v" for i in range(count)}


async def test_a_node_has_at_most_max_labels_labels(client: Client, pg: asyncpg.Connection) -> None:
    # 64 by default, the four automatic keys (node.name, gpu.vendor, gpu.vram,
    # node.replica-slots) counted whether the node has them yet or not.
    node_id = await bare_node(client, "gpu-1")
    await fails(client.call("labels_set", node_id=node_id, labels=many(61)), 400, "'labels'", "64")
    assert await db_labels(pg, node_id) == {}

    assert await client.call("labels_set", node_id=node_id, labels=many(60)) == {}
    await fails(client.call("label_set", node_id=node_id, key="one", value="more"), 400, "'labels'")
    # Replacing the value of a key the node has adds nothing: allowed.
    assert await client.call("label_set", node_id=node_id, key="k0", value="w") == {}
    # Setting an automatic key never counts twice.
    assert await client.call("label_set", node_id=node_id, key="gpu.vendor", value="amd") == {}
    assert len(await db_labels(pg, node_id)) == 61

    # A worker's labels merge into the node's: past the cap, nothing changes.
    before = await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node_id)
    await fails(client.register("gpu-1", labels={"extra": "x"}), 400, "'labels'")
    assert await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node_id) == before
    assert len(await db_labels(pg, node_id)) == 61
    # Re-registering with labels the node has, or with none, is fine.
    await client.register("gpu-1", labels={"k1": "v"}, gpu_vendor="nvidia", total_vram=2**34)
    labels = await db_labels(pg, node_id)
    assert len(labels) == 64
    assert labels["gpu.vram"] == "16GB"

    # A new node is refused as a whole, and never created.
    await fails(client.register("gpu-2", labels=many(61)), 400, "'labels'")
    assert await pg.fetchval("SELECT count(*) FROM nodes WHERE name = 'gpu-2'") == 0
    node = await client.register("gpu-2", labels=many(60))
    assert len(await db_labels(pg, node["id"])) == 62  # and node.name, replica-slots; no GPU


async def test_the_label_cap_is_a_setting(start_daemon: Any, clients: Any) -> None:
    client = await clients(await start_daemon(max_labels=6))
    node_id = await bare_node(client, "gpu-1")
    await fails(client.call("labels_set", node_id=node_id, labels=many(3)), 400, "'labels'", "6")
    assert await client.call("labels_set", node_id=node_id, labels=many(2)) == {}


async def test_concurrent_label_sets_never_pass_the_cap(
    start_daemon: Any, clients: Any, pg: asyncpg.Connection
) -> None:
    client = await clients(await start_daemon(max_labels=8))  # room for 4 of our own
    node_id = await bare_node(client, "gpu-1")

    async def add(key: str) -> bool:
        try:
            await client.call("label_set", node_id=node_id, key=key, value="v")
        except CallError as err:
            assert err.code == 400 and "'labels'" in err.message, err
            return False
        return True

    added = await asyncio.gather(*(add(f"k{i}") for i in range(20)))

    assert sum(added) == 4
    assert len(await db_labels(pg, node_id)) == 4
