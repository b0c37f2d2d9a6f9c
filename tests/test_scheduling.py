"""Scheduling configs and the reconciler's cooldown flags."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from infra.wire import NEXT_HEADER
from tests.support import CallError, Client


async def fails(client: Client, op: str, code: int, needle: str, **fields: Any) -> None:
    with pytest.raises(CallError) as err:
        await client.call(op, **fields)
    assert err.value.code == code, err.value.message
    assert needle in err.value.message


async def test_set_get_replace_and_delete_a_config(client: Client) -> None:
    created = await client.call(
        "scheduling_set",
        model_name="qwen3-8b",
        node_selector={"gpu.vendor": "nvidia"},
        min_replicas=1,
        max_replicas=3,
        route_policy="prefix",
        balance_abs_threshold=4,
        balance_rel_threshold=0.5,
        min_prefix_match=0.25,
    )
    assert created["node_selector"] == '{"gpu.vendor":"nvidia"}'
    assert (created["min_replicas"], created["max_replicas"]) == (1, 3)
    assert created["unsatisfiable_until"] is None and created["unsatisfiable_ticks"] == 0
    got = await client.call("scheduling_get", model="qwen3-8b")
    assert got == created
    # A second set replaces every field, and keeps the config's identity.
    replaced = await client.call(
        "scheduling_set", model_name="qwen3-8b", node_selector='{"zone": "eu"}'
    )
    assert replaced["id"] == created["id"]
    assert replaced["node_selector"] == '{"zone": "eu"}'
    assert (replaced["min_replicas"], replaced["route_policy"]) == (0, "")
    assert await client.call("scheduling_delete", model="qwen3-8b") == {}
    await fails(client, "scheduling_get", 404, "qwen3-8b", model="qwen3-8b")
    assert await client.call("scheduling_delete", model="qwen3-8b") == {}


async def test_no_selector_is_an_empty_string(client: Client) -> None:
    for selector in (None, "", {}, "{}"):
        fields = {} if selector is None else {"node_selector": selector}
        got = await client.call("scheduling_set", model_name="m", **fields)
        assert got["node_selector"] == ""


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "model_name"),
        ({"model_name": "m", "min_replicas": -1}, "min_replicas"),
        ({"model_name": "m", "max_replicas": -2}, "max_replicas"),
        ({"model_name": "m", "min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"model_name": "m", "node_selector": "not json"}, "node_selector"),
        ({"model_name": "m", "node_selector": "[1]"}, "node_selector"),
        ({"model_name": "m", "node_selector": {"a": 1}}, "node_selector"),
        ({"model_name": "m", "balance_rel_threshold": -0.1}, "balance_rel_threshold"),
        ({"model_name": "m", "route_policy": "x" * 33}, "route_policy"),
    ],
)
async def test_bad_configs_are_400_naming_the_field(
    client: Client, fields: dict[str, Any], field: str
) -> None:
    await fails(client, "scheduling_set", 400, f"'{field}'", **fields)
    assert await client.call("scheduling_list") == []


async def test_list_by_model_and_autoscaling_only(client: Client) -> None:
    await client.call("scheduling_set", model_name="b", min_replicas=1)
    await client.call("scheduling_set", model_name="a", node_selector={"zone": "eu"})
    await client.call("scheduling_set", model_name="c", max_replicas=2)
    assert [c["model_name"] for c in await client.call("scheduling_list")] == ["a", "b", "c"]
    scaling = await client.call("scheduling_list", autoscaling=True)
    assert [c["model_name"] for c in scaling] == ["b", "c"]
    first, headers = await client.call_with_headers("scheduling_list", limit=2)
    assert [c["model_name"] for c in first] == ["a", "b"]
    rest, headers = await client.call_with_headers(
        "scheduling_list", limit=2, after=headers[NEXT_HEADER]
    )
    assert [c["model_name"] for c in rest] == ["c"] and NEXT_HEADER not in headers


async def test_the_cooldown_cycle(client: Client) -> None:
    await client.call("scheduling_set", model_name="m", min_replicas=2)
    await client.call("scheduling_set", model_name="n", min_replicas=2)
    assert await client.call("unsatisfiable_bump", model="m") == {"ticks": 1}
    assert await client.call("unsatisfiable_bump", model="m") == {"ticks": 2}
    await client.call("unsatisfiable_bump", model="n")
    await client.call("unsatisfiable_mark", model="m", until="2030-01-01T00:00:00+02:00")
    got = await client.call("scheduling_get", model="m")
    assert got["unsatisfiable_until"] == "2029-12-31T22:00:00Z"
    # A new set keeps the cooldown: only capacity changes or clear end it.
    await client.call("scheduling_set", model_name="m", min_replicas=3)
    assert (await client.call("scheduling_get", model="m"))["unsatisfiable_ticks"] == 2
    await client.call("unsatisfiable_clear", model="m")
    got = await client.call("scheduling_get", model="m")
    assert (got["unsatisfiable_until"], got["unsatisfiable_ticks"]) == (None, 0)
    assert (await client.call("scheduling_get", model="n"))["unsatisfiable_ticks"] == 1
    await client.call("unsatisfiable_clear")
    assert (await client.call("scheduling_get", model="n"))["unsatisfiable_ticks"] == 0


async def test_cooldown_operations_need_a_config(client: Client) -> None:
    await fails(client, "unsatisfiable_bump", 404, "ghost", model="ghost")
    await fails(
        client, "unsatisfiable_mark", 404, "ghost", model="ghost", until="2030-01-01T00:00:00Z"
    )
    assert await client.call("unsatisfiable_clear", model="ghost") == {}


@pytest.mark.parametrize(
    "until", ["2030-01-01T00:00:00", "soon", 1700000000, "2030-02-30T00:00:00Z"]
)
async def test_until_must_be_an_rfc3339_time(client: Client, until: Any) -> None:
    await client.call("scheduling_set", model_name="m")
    await fails(client, "unsatisfiable_mark", 400, "'until'", model="m", until=until)


@pytest.mark.parametrize(
    ("op", "fields"),
    [
        ("register", {"name": "gpu-new", "address": "a:1"}),
        ("approve", None),
        ("label_set", {"key": "zone", "value": "eu"}),
        ("labels_set", {"labels": {"zone": "eu"}}),
        ("label_remove", {"key": "zone"}),
        ("max_replicas", {"max_replicas_per_model": 2}),
    ],
)
async def test_a_change_that_can_add_capacity_ends_every_cooldown(
    client: Client, pg: asyncpg.Connection, op: str, fields: dict[str, Any] | None
) -> None:
    node = await client.register("gpu-1")
    for model in ("m", "n"):
        await client.call("scheduling_set", model_name=model, min_replicas=1)
        await client.call("unsatisfiable_bump", model=model)
        await client.call("unsatisfiable_mark", model=model, until="2099-01-01T00:00:00Z")
    body = {"node_id": node["id"]} if fields is None else fields
    if op != "register":
        body = {"node_id": node["id"], **body}
    await client.call(op, **body)
    rows = await pg.fetch("SELECT unsatisfiable_ticks, unsatisfiable_until FROM scheduling_configs")
    assert [tuple(r) for r in rows] == [(0, None), (0, None)]
