"""Null is absent (contract v1.1): JSON null in an optional field means "left out".

Go encodes a nil slice or map as null, so a Go router passing "no restriction"
sends `"node_ids": null` or `"selector": null` and must get every node, not a
400. The rule is the request layer's, for every field of every operation; a
required field sent as null is still a 400 naming it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from subjects import OPERATIONS
from subjects.base import Operation
from tests.support import CallError, Client, fails

# A valid value for each field some operation requires. An operation added
# with a new required field needs a sample here: the test says which.
SAMPLES: dict[str, Any] = {
    "name": "gpu-1",
    "node_id": "no-such-node",
    "model": "m",
    "model_name": "m",
    "threshold_s": 60,
    "max_replicas_per_model": 1,
    "bytes": 1,
    "lease_id": "no-such-lease",
    "lease_s": 10,
    "state": "loaded",
    "max_slots": 2,
    "key": "k",
    "value": "v",
    "labels": {},
    "until": "2030-01-01T00:00:00Z",
    "backend": "b",
    "op": "install",
    "id": "no-such-intent",
}

# Operations whose bare required fields are not a body that gets past the
# handler's own checks: give them the optional fields they need, too.
BASES: dict[str, dict[str, Any]] = {
    "register": {"name": "gpu-1", "address": "gpu-1.local:50051"},
    "inflight_dec": {"node_id": "no-such-node", "model": "m"},
}


def base_body(op: Operation[Any]) -> dict[str, Any]:
    body = dict(BASES.get(op.name, {}))
    for name, info in op.model.model_fields.items():
        if info.is_required() and name not in body and name != op.subject_field:
            assert name in SAMPLES, f"add a sample value of {name!r} (required by {op.name})"
            body[name] = SAMPLES[name]
    return body


def subject_of(op: Operation[Any]) -> str:
    return f"{op.verb}.no-such-node" if op.subject_field else op.verb


CASES = [
    pytest.param(op, name, id=f"{op.name}.{name}")
    for op in OPERATIONS
    for name, info in op.model.model_fields.items()
    # Fields the service edge fills in itself (from the subject, the reply subject).
    if not info.is_required() and name not in (op.subject_field, op.reply_field)
]


async def outcome(client: Client, subject: str, body: dict[str, Any]) -> tuple[int, str]:
    """What the daemon answered: (0, "") for a success, else (code, message)."""
    try:
        await client.call(subject, body)
    except CallError as err:
        return err.code, err.message
    return 0, ""


@pytest.mark.parametrize(("op", "field"), CASES)
async def test_null_in_an_optional_field_is_never_a_400_about_it(
    client: Client, op: Operation[Any], field: str
) -> None:
    body = base_body(op)
    subject = subject_of(op)
    code, message = await outcome(client, subject, {**body, field: None})
    names_it = re.compile(rf"'{re.escape(field)}[.']")
    if code == 400 and names_it.search(message):
        # Only as leaving it out is (inflight_dec without lease_id nor node_id).
        absent = {k: v for k, v in body.items() if k != field}
        assert (code, message) == await outcome(client, subject, absent)


async def test_findlock_with_null_node_ids_finds_a_replica_on_any_node(client: Client) -> None:
    await client.healthy_node("gpu-1")
    node = await client.healthy_node("gpu-2")
    await client.replica(node, "m", 3)
    got = await client.call("findlock", {"model": "m", "node_ids": None, "prefer": None})
    assert (got["node"]["id"], got["replica"]["replica_index"]) == (node["id"], 3)
    # Inside a nested object too: a null replica_index is the default, 0.
    await client.replica(node, "m", 0)
    got = await client.call(
        "findlock",
        {"model": "m", "node_ids": None, "prefer": {"node_id": node["id"], "replica_index": None}},
    )
    assert (got["node"]["id"], got["replica"]["replica_index"]) == (node["id"], 0)


async def test_find_selector_with_a_null_selector_returns_every_healthy_node(
    client: Client,
) -> None:
    a = await client.healthy_node("gpu-a", labels={"zone": "x"})
    b = await client.healthy_node("gpu-b")
    await client.register("gpu-pending")
    for body in ({"selector": None}, {"selector": None, "limit": None, "after": None}):
        nodes = await client.call("find_selector", body)
        assert [n["id"] for n in nodes] == [a["id"], b["id"]]


@pytest.mark.parametrize(
    "op", ["find_vram", "find_idle", "find_least_loaded", "free_slots", "capacity", "replica_stats"]
)
async def test_null_node_ids_means_every_node(client: Client, op: str) -> None:
    node = await client.healthy_node("gpu-1", total_vram=100, available_vram=100)
    await client.replica(node, "m", 0)
    await client.healthy_node("gpu-2", total_vram=100, available_vram=100)  # idle
    with_model = op in ("free_slots", "capacity", "replica_stats")
    body: dict[str, Any] = {"model": "m"} if with_model else {}
    assert await client.call(op, {**body, "node_ids": None}) == await client.call(op, body)


async def test_null_is_the_zero_value_where_the_default_is_not_null(client: Client) -> None:
    # Go's zero values: false, "", 0. Stored as if left out.
    got = await client.call(
        "scheduling_set",
        {
            "model_name": "m",
            "node_selector": None,
            "min_replicas": None,
            "max_replicas": None,
            "route_policy": None,
            "balance_rel_threshold": None,
        },
    )
    assert (got["node_selector"], got["min_replicas"], got["route_policy"]) == ("", 0, "")
    assert got["balance_rel_threshold"] == 0
    node = await client.healthy_node("gpu-1")
    listed = await client.call("list", {"extras": None})
    assert [n["id"] for n in listed] == [node["id"]] and "labels" not in listed[0]
    await client.call(
        "replica_set",
        {"node_id": node["id"], "model": "m", "state": "loaded", "replica_index": None},
    )
    replica = await client.call(
        "replica_get", {"node_id": node["id"], "model": "m", "replica_index": None}
    )
    assert (replica["replica_index"], replica["address"], replica["in_flight"]) == (0, "", 0)


@pytest.mark.parametrize(
    ("op", "body", "field"),
    [
        ("approve", {"node_id": None}, "node_id"),
        ("register", {"name": None, "address": "a:1"}, "name"),
        ("findlock", {"model": None, "node_ids": None}, "model"),
        ("labels_set", {"node_id": "n", "labels": None}, "labels"),
        ("findlock", {"model": "m", "prefer": {"node_id": None}}, "prefer.node_id"),
    ],
)
async def test_null_in_a_required_field_is_still_a_400_naming_it(
    client: Client, op: str, body: dict[str, Any], field: str
) -> None:
    await fails(client.call(op, body), 400, f"'{field}'")
