"""Nodes: registration, approval, status changes, heartbeats, look-ups and caps.

Every test talks to a real daemon over NATS and looks behind it in PostgreSQL;
events are checked on the subjects LocalAI listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from daemon import service
from daemon.app import Daemon
from infra.errors import Unauthorized
from subjects.nodes import write_heartbeats
from tests.support import (
    CallError,
    Client,
    Listener,
    add_cooldowns,
    connect,
    cooldowns,
    drained_for,
    eventually,
    every_page,
    fails,
    next_for,
    parse,
)

GIB = 2**30
INVALIDATE = "prefixcache.invalidate"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
NODE_FIELDS = {
    "id",
    "name",
    "node_type",
    "address",
    "http_address",
    "status",
    "total_vram",
    "available_vram",
    "reserved_vram",
    "total_ram",
    "available_ram",
    "gpu_vendor",
    "max_replicas_per_model",
    "max_replicas_per_model_manually_set",
    "last_heartbeat",
    "created_at",
    "updated_at",
}
EXTRAS_FIELDS = {"model_count", "in_flight_count", "labels"}
SECRET_FIELDS = {"token", "token_hash", "auth_user_id", "api_key_id"}


# ---------------------------------------------------------------- helpers


async def collect_for(listener: Listener, node_id: str, count: int) -> list[Any]:
    return [(await next_for(listener, node_id))[1] for _ in range(count)]


async def node_events(client: Client) -> Listener:
    """Node events of every node of this daemon."""
    return await client.listen(f"{client.prefix}.events.node.*")


async def poll(
    pg: asyncpg.Connection,
    sql: str,
    *args: Any,
    until: Callable[[asyncpg.Record], bool],
    timeout: float = 5.0,
) -> asyncpg.Record:
    """Re-read a row until `until` holds, failing after `timeout` seconds."""

    async def holds() -> asyncpg.Record | None:
        row = await pg.fetchrow(sql, *args)
        return row if row is not None and until(row) else None

    return await eventually(holds, f"a row of {sql!r} to change", timeout)


async def assert_cooldowns_cleared(pg: asyncpg.Connection, count: int = 2) -> None:
    assert await cooldowns(pg) == [(0, None)] * count


async def assert_cooldowns_kept(pg: asyncpg.Connection, count: int = 2) -> None:
    rows = await cooldowns(pg)
    assert len(rows) == count
    assert all(ticks == 3 and until is not None for ticks, until in rows)


@contextlib.asynccontextmanager
async def client_of(daemon: Daemon, nats_url: str) -> AsyncIterator[Client]:
    nc = await connect(nats_url)
    try:
        yield Client(nc, daemon.settings.subject_prefix)
    finally:
        await nc.close()


async def add_replicas(client: Client, node_id: str, *replicas: tuple[str, int]) -> None:
    for model, index in replicas:
        await client.call(
            "replica_set", node_id=node_id, model=model, replica_index=index, state="loaded"
        )


async def replica_rows(pg: asyncpg.Connection, node_id: str) -> list[tuple[str, int]]:
    rows = await pg.fetch(
        "SELECT model_name, replica_index FROM replicas WHERE node_id = $1 ORDER BY 1, 2", node_id
    )
    return [(r[0], r[1]) for r in rows]


async def heartbeat(client: Client, node_id: str, **fields: Any) -> Any:
    """A heartbeat sent as a request, so the reply says it was applied."""
    msg = await client.nc.request(
        f"{client.prefix}.heartbeat.{node_id}", orjson.dumps(fields), timeout=client.timeout
    )
    return parse(msg)


# ---------------------------------------------------------------- register


async def test_register_new_node_is_pending(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.register(
        "gpu-1",
        address="10.0.0.1:50051",
        http_address="10.0.0.1:8080",
        total_vram=24 * GIB,
        available_vram=20 * GIB,
        total_ram=64 * GIB,
        available_ram=32 * GIB,
        gpu_vendor="nvidia",
    )
    assert set(node) == NODE_FIELDS
    assert node["status"] == "pending"
    assert node["name"] == "gpu-1"
    assert node["node_type"] == "backend"
    assert node["address"] == "10.0.0.1:50051"
    assert node["http_address"] == "10.0.0.1:8080"
    assert node["total_vram"] == 24 * GIB
    assert node["available_vram"] == 20 * GIB
    assert node["reserved_vram"] == 0
    assert node["total_ram"] == 64 * GIB
    assert node["available_ram"] == 32 * GIB
    assert node["gpu_vendor"] == "nvidia"
    assert node["max_replicas_per_model"] == 1
    assert node["max_replicas_per_model_manually_set"] is False
    for key in ("last_heartbeat", "created_at", "updated_at"):
        assert RFC3339_UTC.match(node[key]), node[key]
    row = await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node["id"])
    assert row["status"] == "pending"
    assert row["name"] == "gpu-1"
    assert row["total_vram"] == 24 * GIB


async def test_register_with_auto_approve_is_healthy(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str, pg: asyncpg.Connection
) -> None:
    daemon = await start_daemon(auto_approve=True)
    async with client_of(daemon, nats_url) as client:
        node = await client.register("gpu-1")
        assert node["status"] == "healthy"
        assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "healthy"


async def test_reregistration_keeps_id_and_clears_replicas(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1")
    other = await client.healthy_node("gpu-2")
    await add_replicas(client, node["id"], ("llama", 0), ("llama", 1), ("qwen", 0))
    await add_replicas(client, other["id"], ("llama", 0))
    invalidations = await client.listen(INVALIDATE)

    again = await client.register("gpu-1")

    assert again["id"] == node["id"]
    assert await pg.fetchval("SELECT count(*) FROM nodes") == 2
    assert await replica_rows(pg, node["id"]) == []
    assert await replica_rows(pg, other["id"]) == [("llama", 0)]
    events = await collect_for(invalidations, node["id"], 2)
    assert sorted(events, key=lambda e: e["model"]) == [
        {"model": "llama", "node_id": node["id"], "replica": -1},
        {"model": "qwen", "node_id": node["id"], "replica": -1},
    ]
    # One event per model, none for the other node.
    assert await drained_for(invalidations, client, node["id"], other["id"]) == []


async def test_reregistration_without_replicas_publishes_no_invalidation(
    client: Client,
) -> None:
    node = await client.healthy_node("gpu-1")
    invalidations = await client.listen(INVALIDATE)

    await client.register("gpu-1")
    # A later removal that does publish: it must be the first event we see.
    await add_replicas(client, node["id"], ("marker", 4))
    await client.call("replica_remove", node_id=node["id"], model="marker", replica_index=4)

    _, event = await next_for(invalidations, node["id"])
    assert event == {"model": "marker", "node_id": node["id"], "replica": 4}


@pytest.mark.parametrize("op", ["offline", "unhealthy", "drain", None])
async def test_reregistration_of_an_approved_node_is_healthy(
    client: Client, pg: asyncpg.Connection, op: str | None
) -> None:
    node = await client.healthy_node("gpu-1")
    if op:
        await client.call(op, node_id=node["id"])
    again = await client.register("gpu-1")
    assert again["status"] == "healthy"
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "healthy"


async def test_reregistration_with_auto_approve_makes_a_pending_node_healthy(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str, pg: asyncpg.Connection
) -> None:
    daemon = await start_daemon(auto_approve=True)
    async with client_of(daemon, nats_url) as client:
        node = await client.register("gpu-1")
        # Registered before auto-approve was switched on.
        await pg.execute("UPDATE nodes SET status = 'pending' WHERE id = $1", node["id"])
        again = await client.register("gpu-1")
        assert again["id"] == node["id"]
        assert again["status"] == "healthy"


async def test_reregistration_of_a_never_approved_node_stays_pending(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.register("gpu-1")
    again = await client.register("gpu-1", total_vram=8 * GIB)
    assert again["id"] == node["id"]
    assert again["status"] == "pending"
    assert again["total_vram"] == 8 * GIB
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "pending"


async def test_reregistration_keeps_fields_the_worker_leaves_out(client: Client) -> None:
    node = await client.register(
        "gpu-1", total_vram=24 * GIB, available_vram=20 * GIB, gpu_vendor="amd"
    )
    again = await client.register("gpu-1", address="10.0.0.9:50051")
    assert again["address"] == "10.0.0.9:50051"
    assert again["total_vram"] == node["total_vram"]
    assert again["available_vram"] == node["available_vram"]
    assert again["gpu_vendor"] == "amd"


async def test_worker_labels_merge_without_wiping_admin_labels(client: Client) -> None:
    node = await client.register("gpu-1", labels={"zone": "a", "rack": "1"})
    await client.call("label_set", node_id=node["id"], key="owner", value="ops")

    await client.register("gpu-1", labels={"zone": "b"})

    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["zone"] == "b"
    assert labels["rack"] == "1"
    assert labels["owner"] == "ops"
    assert labels["node.name"] == "gpu-1"


@pytest.mark.parametrize(
    ("total_vram", "bucket"),
    [
        (4 * GIB, "4GB"),
        (8 * GIB - 1, "7GB"),
        (8 * GIB, "8GB"),
        (15 * GIB, "8GB"),
        (16 * GIB, "16GB"),
        (23 * GIB, "16GB"),
        (24 * GIB, "24GB"),
        (47 * GIB, "24GB"),
        (48 * GIB, "48GB"),
        (79 * GIB, "48GB"),
        (80 * GIB, "80GB+"),
        (100 * GIB, "80GB+"),
    ],
)
async def test_auto_labels(client: Client, total_vram: int, bucket: str) -> None:
    node = await client.register(
        "gpu-1", total_vram=total_vram, gpu_vendor="nvidia", max_replicas_per_model=3
    )
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels == {
        "gpu.vendor": "nvidia",
        "gpu.vram": bucket,
        "node.name": "gpu-1",
        "node.replica-slots": "3",
    }


async def test_reregistration_refreshes_auto_labels(client: Client) -> None:
    node = await client.register("gpu-1", total_vram=16 * GIB, gpu_vendor="amd")
    await client.register("gpu-1", total_vram=48 * GIB, gpu_vendor="nvidia")
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["gpu.vram"] == "48GB"
    assert labels["gpu.vendor"] == "nvidia"


async def test_auto_labels_without_gpu(client: Client) -> None:
    node = await client.register("cpu-1")
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels == {"node.name": "cpu-1", "node.replica-slots": "1"}


async def test_worker_cannot_override_auto_labels(client: Client) -> None:
    node = await client.register(
        "gpu-1",
        gpu_vendor="nvidia",
        max_replicas_per_model=2,
        labels={"node.name": "fake", "node.replica-slots": "99", "gpu.vendor": "x"},
    )
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["node.name"] == "gpu-1"
    assert labels["node.replica-slots"] == "2"
    assert labels["gpu.vendor"] == "nvidia"


@pytest.mark.parametrize(("given", "stored"), [(0, 1), (1, 1), (4, 4)])
async def test_register_max_replicas_per_model(client: Client, given: int, stored: int) -> None:
    node = await client.register("gpu-1", max_replicas_per_model=given)
    assert node["max_replicas_per_model"] == stored
    assert node["max_replicas_per_model_manually_set"] is False
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["node.replica-slots"] == str(stored)


async def test_manual_max_replicas_survives_reregistration_until_reset(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.register("gpu-1", max_replicas_per_model=2)
    manual = await client.call("max_replicas", node_id=node["id"], max_replicas_per_model=5)
    assert manual["max_replicas_per_model"] == 5
    assert manual["max_replicas_per_model_manually_set"] is True

    again = await client.register("gpu-1", max_replicas_per_model=2)
    assert again["max_replicas_per_model"] == 5
    assert again["max_replicas_per_model_manually_set"] is True
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["node.replica-slots"] == "5"

    reset = await client.call("max_replicas_reset", node_id=node["id"])
    assert reset["max_replicas_per_model"] == 5  # left in place until the worker says
    assert reset["max_replicas_per_model_manually_set"] is False

    after = await client.register("gpu-1", max_replicas_per_model=3)
    assert after["max_replicas_per_model"] == 3
    assert after["max_replicas_per_model_manually_set"] is False
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["node.replica-slots"] == "3"
    row = await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node["id"])
    assert row["max_replicas_per_model"] == 3
    assert row["max_replicas_per_model_manually_set"] is False


async def test_max_replicas_reset_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("max_replicas_reset", node_id="nope"), 404, "nope")


async def test_backend_node_needs_an_address(client: Client, pg: asyncpg.Connection) -> None:
    await fails(client.call("register", name="gpu-1"), 400, "'address'")
    await fails(
        client.call("register", name="gpu-1", node_type="backend", address=""), 400, "'address'"
    )
    assert await pg.fetchval("SELECT count(*) FROM nodes") == 0


async def test_agent_node_needs_no_address(client: Client) -> None:
    node = await client.call("register", name="agent-1", node_type="agent")
    assert node["node_type"] == "agent"
    assert node["address"] == ""
    # Re-registering, it may leave out its type: it stays an agent.
    again = await client.call("register", name="agent-1")
    assert (again["id"], again["node_type"]) == (node["id"], "agent")


async def test_a_backend_re_registering_may_leave_out_its_address(client: Client) -> None:
    node = await client.register("gpu-1", address="10.0.0.5:50051")
    again = await client.call("register", name="gpu-1", available_vram=5)
    assert (again["id"], again["address"]) == (node["id"], "10.0.0.5:50051")


async def test_reregistration_with_an_empty_address_keeps_the_stored_one(
    client: Client, pg: asyncpg.Connection
) -> None:
    # Go's Updates(struct) skips the empty string: a worker that sends
    # "address": "" must not make its node unroutable.
    node = await client.register("gpu-1", address="10.0.0.5:50051")
    again = await client.call("register", name="gpu-1", address="", http_address="")
    assert (again["id"], again["address"]) == (node["id"], "10.0.0.5:50051")
    assert await pg.fetchval("SELECT address FROM nodes WHERE id = $1", node["id"]) == (
        "10.0.0.5:50051"
    )


async def test_register_rejects_a_bad_node_type(client: Client) -> None:
    await fails(
        client.call("register", name="x", node_type="router", address="a:1"), 400, "'node_type'"
    )


async def test_register_name_length(client: Client) -> None:
    await fails(client.register("n" * 256), 400, "'name'")
    await fails(client.call("register", address="a:1"), 400, "'name'")
    await fails(client.register(""), 400, "'name'")
    node = await client.register("n" * 255)
    assert node["name"] == "n" * 255


@pytest.mark.parametrize(
    ("field", "value"),
    [("total_vram", -1), ("available_vram", "lots"), ("total_ram", 2**63), ("labels", [])],
)
async def test_register_rejects_bad_field_values(client: Client, field: str, value: Any) -> None:
    await fails(client.register("gpu-1", **{field: value}), 400, f"'{field}")


async def test_registration_token(
    start_daemon: Callable[..., Awaitable[Daemon]], nats_url: str, pg: asyncpg.Connection
) -> None:
    daemon = await start_daemon(registration_token="s3cret")
    digest = hashlib.sha256(b"s3cret").hexdigest()
    async with client_of(daemon, nats_url) as client:
        err = await fails(client.register("gpu-1"), 401)
        assert err.body["error"]["status"] == "unauthorized"
        await fails(client.register("gpu-1", token="wrong"), 401)
        await fails(client.register("gpu-1", token=""), 401)
        assert await pg.fetchval("SELECT count(*) FROM nodes") == 0

        node = await client.register("gpu-1", token="s3cret")
        assert node["status"] == "pending"
        row = await pg.fetchrow("SELECT token_hash FROM nodes WHERE id = $1", node["id"])
        assert row["token_hash"] == digest

        replies = [
            node,
            await client.call("get", node_id=node["id"]),
            await client.call("list"),
            await client.call("list", extras=True),
            await client.call("approve", node_id=node["id"]),
            await client.register("gpu-1", token="s3cret"),
        ]
        for reply in replies:
            text = orjson.dumps(reply).decode()
            assert "s3cret" not in text
            assert digest not in text
            for item in reply if isinstance(reply, list) else [reply]:
                assert not SECRET_FIELDS & set(item)

        # A re-registration with a wrong token changes nothing.
        await add_replicas(client, node["id"], ("llama", 0))
        await fails(client.register("gpu-1", token="wrong", address="evil:1"), 401)
        row = await pg.fetchrow("SELECT address, status FROM nodes WHERE id = $1", node["id"])
        assert (row["address"], row["status"]) == ("gpu-1.local:50051", "healthy")
        assert await replica_rows(pg, node["id"]) == [("llama", 0)]


async def test_refused_registrations_are_logged_without_the_token(
    start_daemon: Callable[..., Awaitable[Daemon]],
    nats_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="registryd.service")
    daemon = await start_daemon(registration_token="s3cret-configured")
    async with client_of(daemon, nats_url) as client:
        await fails(client.register("gpu-1", token="guess-one", address="10.0.0.5:50051"), 401)
        await fails(client.register("gpu-2"), 401)
        # A worker retrying with the wrong token does not fill the log.
        for _ in range(5):
            await fails(client.register("gpu-1", token="guess-two", address="10.0.0.5:50051"), 401)
        await client.register("gpu-3", token="s3cret-configured")

    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    gpu1, gpu2 = lines
    # The operator sees who claimed what, from which connection's inbox, and why.
    assert "node 'gpu-1' (address 10.0.0.5:50051)" in gpu1
    assert "wrong registration token" in gpu1
    assert "from inbox _INBOX." in gpu1
    assert "node 'gpu-2'" in gpu2 and "registration token missing" in gpu2
    # Neither the token given nor the one configured is ever written down.
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("guess-one", "guess-two", "s3cret-configured"):
        assert secret not in text


def test_repeated_refusals_are_counted_in_the_next_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.WARNING, logger="registryd.service")
    refusals = service.Refusals(every=60)
    err = Unauthorized("registration token missing or wrong", who="node 'a'", why="wrong")
    for step in (0, 10, 20, 30, 70):  # seconds since the first attempt
        clock[0] = 1000.0 + step
        refusals.note("register", err, "inbox _INBOX.x.1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "more refused" not in lines[0]
    assert "(3 more refused since the last line)" in lines[1]


async def test_no_registration_token_configured_accepts_any(
    client: Client, pg: asyncpg.Connection
) -> None:
    await client.register("gpu-1")
    node = await client.register("gpu-2", token="whatever")
    assert node["status"] == "pending"
    row = await pg.fetchrow("SELECT token_hash FROM nodes WHERE id = $1", node["id"])
    assert row["token_hash"] == hashlib.sha256(b"whatever").hexdigest()


async def test_registration_publishes_node_events(client: Client) -> None:
    events = await node_events(client)

    node = await client.register("gpu-1")
    subject, event = await next_for(events, node["id"])
    assert subject == f"{client.prefix}.events.node.{node['id']}"
    assert event["name"] == "gpu-1"
    assert event["status"] == "pending"
    assert event["previous_status"] is None
    assert "reason" in event

    await client.call("approve", node_id=node["id"])
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("pending", "healthy")

    await client.call("offline", node_id=node["id"])
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("healthy", "offline")

    await client.register("gpu-1")
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("offline", "healthy")
    assert event["name"] == "gpu-1"


async def test_concurrent_registrations_of_a_new_name_publish_one_new_node_event(
    client: Client,
) -> None:
    events = await client.listen(f"{client.prefix}.events.node.>")

    nodes = await asyncio.gather(*(client.register("gpu-1") for _ in range(30)))

    assert len({n["id"] for n in nodes}) == 1
    got = await events.collect(30)
    # One registration created the node; every other one re-registered it
    # and says so, with the status the node had.
    assert [e["previous_status"] for e in got].count(None) == 1
    assert {e["previous_status"] for e in got} == {None, "pending"}
    assert await events.drained(client.nc) == []


# ---------------------------------------------------------------- approve


async def test_approve_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("approve", node_id="no-such-node"), 404, "no-such-node")


async def test_approve_missing_node_id_is_400(client: Client) -> None:
    await fails(client.call("approve"), 400, "'node_id'")


@pytest.mark.parametrize("op", [None, "offline", "unhealthy", "drain"])
async def test_approve_a_node_that_is_not_pending_is_409(
    client: Client, pg: asyncpg.Connection, op: str | None
) -> None:
    node = await client.healthy_node("gpu-1")
    if op:
        await client.call(op, node_id=node["id"])
    status = await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"])
    await fails(client.call("approve", node_id=node["id"]), 409, status)
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == status


async def test_approve_makes_a_pending_node_healthy(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.register("gpu-1", total_vram=24 * GIB)
    events = await node_events(client)

    approved = await client.call("approve", node_id=node["id"])

    assert set(approved) == NODE_FIELDS
    assert approved["id"] == node["id"]
    assert approved["status"] == "healthy"
    assert approved["total_vram"] == 24 * GIB
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "healthy"
    subject, event = await next_for(events, node["id"])
    assert subject == f"{client.prefix}.events.node.{node['id']}"
    assert event["node_id"] == node["id"]
    assert event["name"] == "gpu-1"
    assert (event["previous_status"], event["status"]) == ("pending", "healthy")


# ---------------------------------------------------------------- scheduling cooldowns


async def test_register_clears_scheduling_cooldowns(client: Client, pg: asyncpg.Connection) -> None:
    await add_cooldowns(pg, "llama", "qwen")
    await client.register("gpu-1")
    await assert_cooldowns_cleared(pg)
    # Re-registration too.
    await add_cooldowns(pg, "mistral")
    await client.register("gpu-1")
    await assert_cooldowns_cleared(pg, 3)


async def test_approve_clears_scheduling_cooldowns(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.register("gpu-1")
    await add_cooldowns(pg, "llama", "qwen")
    await client.call("approve", node_id=node["id"])
    await assert_cooldowns_cleared(pg)


async def test_failed_approve_keeps_scheduling_cooldowns(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1")
    await add_cooldowns(pg, "llama", "qwen")
    await fails(client.call("approve", node_id=node["id"]), 409)
    await fails(client.call("approve", node_id="nope"), 404)
    await assert_cooldowns_kept(pg)


async def test_max_replicas_clears_scheduling_cooldowns(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1")
    await add_cooldowns(pg, "llama", "qwen")
    await client.call("max_replicas", node_id=node["id"], max_replicas_per_model=4)
    await assert_cooldowns_cleared(pg)


async def test_failed_max_replicas_keeps_scheduling_cooldowns(
    client: Client, pg: asyncpg.Connection
) -> None:
    await add_cooldowns(pg, "llama", "qwen")
    await fails(client.call("max_replicas", node_id="nope", max_replicas_per_model=4), 404)
    await assert_cooldowns_kept(pg)


# ---------------------------------------------------------------- offline / drain / health


@pytest.mark.parametrize(("op", "status"), [("offline", "offline"), ("drain", "draining")])
async def test_offline_and_drain_clear_replicas(
    client: Client, pg: asyncpg.Connection, op: str, status: str
) -> None:
    node = await client.healthy_node("gpu-1")
    other = await client.healthy_node("gpu-2")
    await add_replicas(client, node["id"], ("llama", 0), ("llama", 1), ("qwen", 0))
    await add_replicas(client, other["id"], ("llama", 0))
    invalidations = await client.listen(INVALIDATE)
    events = await node_events(client)

    assert await client.call(op, node_id=node["id"]) == {}

    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == status
    assert await replica_rows(pg, node["id"]) == []
    assert await replica_rows(pg, other["id"]) == [("llama", 0)]
    removed = await collect_for(invalidations, node["id"], 2)
    assert sorted(removed, key=lambda e: e["model"]) == [
        {"model": "llama", "node_id": node["id"], "replica": -1},
        {"model": "qwen", "node_id": node["id"], "replica": -1},
    ]
    subject, event = await next_for(events, node["id"])
    assert subject == f"{client.prefix}.events.node.{node['id']}"
    assert event["name"] == "gpu-1"
    assert (event["previous_status"], event["status"]) == ("healthy", status)
    assert await drained_for(invalidations, client, node["id"], other["id"]) == []
    assert (await client.call("get", node_id=node["id"]))["status"] == status


async def test_unhealthy_keeps_replicas(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    await add_replicas(client, node["id"], ("llama", 0), ("qwen", 0))
    invalidations = await client.listen(INVALIDATE)
    events = await node_events(client)

    assert await client.call("unhealthy", node_id=node["id"]) == {}

    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "unhealthy"
    assert await replica_rows(pg, node["id"]) == [("llama", 0), ("qwen", 0)]
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("healthy", "unhealthy")
    # Nothing was invalidated: the first invalidation is the later explicit removal.
    await client.call("replica_remove", node_id=node["id"], model="qwen", replica_index=0)
    _, removed = await next_for(invalidations, node["id"])
    assert removed == {"model": "qwen", "node_id": node["id"], "replica": 0}


async def test_healthy_revives_an_unhealthy_node(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    await client.call("unhealthy", node_id=node["id"])
    events = await node_events(client)
    assert await client.call("healthy", node_id=node["id"]) == {}
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "healthy"
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("unhealthy", "healthy")


async def test_healthy_on_a_pending_node_is_409(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.register("gpu-1")
    await fails(client.call("healthy", node_id=node["id"]), 409, "never been approved")
    assert await pg.fetchval("SELECT status FROM nodes WHERE id = $1", node["id"]) == "pending"


@pytest.mark.parametrize("op", ["offline", "unhealthy", "healthy", "drain", "deregister"])
async def test_status_change_on_an_unknown_node_is_404(client: Client, op: str) -> None:
    await fails(client.call(op, node_id="ghost"), 404, "ghost")


@pytest.mark.parametrize("op", ["offline", "unhealthy", "healthy", "drain", "deregister"])
async def test_status_change_without_node_id_is_400(client: Client, op: str) -> None:
    await fails(client.call(op), 400, "'node_id'")


@pytest.mark.parametrize(
    ("op", "status"),
    [("offline", "offline"), ("unhealthy", "unhealthy"), ("drain", "draining")],
)
async def test_no_node_event_when_status_does_not_change(
    client: Client, op: str, status: str
) -> None:
    node = await client.healthy_node("gpu-1")
    await client.call(op, node_id=node["id"])
    events = await node_events(client)

    await client.call(op, node_id=node["id"])  # already there: no event
    await client.call("healthy", node_id=node["id"])  # a change: an event

    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == (status, "healthy")


async def test_healthy_on_a_healthy_node_publishes_nothing(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    events = await node_events(client)
    assert await client.call("healthy", node_id=node["id"]) == {}
    await client.call("unhealthy", node_id=node["id"])
    _, event = await next_for(events, node["id"])
    assert (event["previous_status"], event["status"]) == ("healthy", "unhealthy")


# ---------------------------------------------------------------- deregister


async def test_deregister_removes_node_replicas_and_labels(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1", labels={"zone": "a"})
    other = await client.healthy_node("gpu-2")
    await client.call("label_set", node_id=node["id"], key="owner", value="ops")
    await add_replicas(client, node["id"], ("llama", 0), ("llama", 1), ("qwen", 0))
    await add_replicas(client, other["id"], ("llama", 0))
    invalidations = await client.listen(INVALIDATE)
    events = await node_events(client)

    assert await client.call("deregister", node_id=node["id"]) == {}

    assert await pg.fetchval("SELECT count(*) FROM nodes WHERE id = $1", node["id"]) == 0
    assert await pg.fetchval("SELECT count(*) FROM replicas WHERE node_id = $1", node["id"]) == 0
    assert await pg.fetchval("SELECT count(*) FROM node_labels WHERE node_id = $1", node["id"]) == 0
    assert await replica_rows(pg, other["id"]) == [("llama", 0)]
    assert await pg.fetchval("SELECT count(*) FROM node_labels WHERE node_id = $1", other["id"]) > 0
    removed = await collect_for(invalidations, node["id"], 2)
    assert sorted(removed, key=lambda e: e["model"]) == [
        {"model": "llama", "node_id": node["id"], "replica": -1},
        {"model": "qwen", "node_id": node["id"], "replica": -1},
    ]
    subject, event = await next_for(events, node["id"])
    assert subject == f"{client.prefix}.events.node.{node['id']}"
    assert event["name"] == "gpu-1"
    assert (event["previous_status"], event["status"]) == ("healthy", "deregistered")

    await fails(client.call("get", node_id=node["id"]), 404)
    await fails(client.call("deregister", node_id=node["id"]), 404)
    assert node["id"] not in await client.call("labels_all")
    # The name is free again: a new registration is a new node.
    fresh = await client.register("gpu-1")
    assert fresh["id"] != node["id"]
    assert fresh["status"] == "pending"


# ---------------------------------------------------------------- heartbeat


HEARTBEAT_ROW = """
    SELECT status, available_vram, reserved_vram, total_vram, available_ram, gpu_vendor,
           last_heartbeat > now() - interval '1 minute' AS fresh
      FROM nodes WHERE id = $1"""


async def age(pg: asyncpg.Connection, node_id: str) -> None:
    await pg.execute(
        "UPDATE nodes SET last_heartbeat = now() - interval '10 minutes' WHERE id = $1", node_id
    )


async def test_published_heartbeat_updates_the_node(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1", total_vram=24 * GIB, available_vram=24 * GIB)
    await age(pg, node["id"])

    await client.publish(
        f"heartbeat.{node['id']}",
        {
            "available_vram": 10 * GIB,
            "total_vram": 23 * GIB,
            "available_ram": 7 * GIB,
            "gpu_vendor": "amd",
        },
    )

    row = await poll(pg, HEARTBEAT_ROW, node["id"], until=lambda r: r["fresh"])
    assert row["available_vram"] == 10 * GIB
    assert row["total_vram"] == 23 * GIB
    assert row["available_ram"] == 7 * GIB
    assert row["gpu_vendor"] == "amd"
    assert row["status"] == "healthy"


async def test_requested_heartbeat_replies_empty_object(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1")
    await age(pg, node["id"])
    msg = await client.nc.request(
        f"{client.prefix}.heartbeat.{node['id']}", b'{"available_vram": 5}', timeout=5
    )
    assert not (msg.headers or {})
    assert orjson.loads(msg.data) == {}
    row = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert row["fresh"]
    assert row["available_vram"] == 5
    # An empty body is an empty object.
    msg = await client.nc.request(f"{client.prefix}.heartbeat.{node['id']}", b"", timeout=5)
    assert parse(msg) == {}


async def test_only_heartbeats_commit_without_waiting_for_the_disk(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    pg: asyncpg.Connection,
) -> None:
    # One connection: the heartbeat batch's and every write after it.
    daemon = await start_daemon(db_pool_size=1)
    client = await clients(daemon)
    node = await client.healthy_node("gpu-1")
    setting = "SELECT current_setting('synchronous_commit')"
    assert await daemon.db.fetch_soft(setting) == [("off",)]

    msg = await client.nc.request(
        f"{client.prefix}.heartbeat.{node['id']}", b'{"available_vram": 7}', timeout=5
    )
    assert orjson.loads(msg.data) == {}
    assert await pg.fetchval("SELECT available_vram FROM nodes WHERE id = $1", node["id"]) == 7
    # A reading may be lost in a crash of PostgreSQL; an approval, a drain, a
    # registration on the same connection afterwards may not.
    assert await daemon.db.fetchval(setting) == "on"
    await client.call("drain", node_id=node["id"])
    assert await daemon.db.fetchval(setting) == "on"


async def test_two_daemons_heartbeat_batches_of_the_same_nodes_never_deadlock(
    daemon: Daemon, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # Behind one queue group a node's readings go to either daemon, so two
    # batches hold the same nodes, each in its own arrival order.
    ids = [
        r["id"]
        for r in await pg.fetch(
            "INSERT INTO nodes (name, address, status, approved)"
            " SELECT 'gpu-' || g, 'a:1', 'healthy', true FROM generate_series(1, 2000) g"
            " RETURNING id"
        )
    ]
    caplog.set_level(logging.INFO, logger="registryd.db")
    for round_ in range(1, 11):
        forward = {i: {"available_vram": round_} for i in ids}
        backward = {i: {"available_vram": round_} for i in reversed(ids)}
        written = await asyncio.gather(
            write_heartbeats(daemon.db, forward), write_heartbeats(daemon.db, backward)
        )
        assert written == [set(ids), set(ids)]
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]
    assert await pg.fetchval("SELECT count(*) FROM nodes WHERE available_vram = 10") == 2000


async def test_heartbeat_with_vram_clears_reserved_vram(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1", total_vram=24 * GIB, available_vram=24 * GIB)
    await pg.execute("UPDATE nodes SET reserved_vram = $2 WHERE id = $1", node["id"], 4 * GIB)

    assert await heartbeat(client, node["id"], available_ram=3) == {}
    row = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert row["reserved_vram"] == 4 * GIB  # no VRAM reading: reservation stays
    assert row["available_vram"] == 24 * GIB
    assert row["available_ram"] == 3

    assert await heartbeat(client, node["id"], available_vram=18 * GIB) == {}
    row = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert row["reserved_vram"] == 0
    assert row["available_vram"] == 18 * GIB


async def test_heartbeat_of_an_unhealthy_node_updates_vram_and_keeps_status(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("gpu-1", available_vram=GIB)
    await client.call("unhealthy", node_id=node["id"])
    await heartbeat(client, node["id"], available_vram=2 * GIB)
    row = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert row["status"] == "unhealthy"
    assert row["available_vram"] == 2 * GIB


@pytest.mark.parametrize("status", ["pending", "offline"])
async def test_heartbeat_of_pending_or_offline_node_only_touches_the_timestamp(
    client: Client, pg: asyncpg.Connection, status: str
) -> None:
    fields = {"total_vram": 24 * GIB, "available_vram": 20 * GIB, "available_ram": GIB}
    if status == "pending":
        node = await client.register("gpu-1", gpu_vendor="nvidia", **fields)
    else:
        node = await client.healthy_node("gpu-1", gpu_vendor="nvidia", **fields)
        await client.call("offline", node_id=node["id"])
    await pg.execute("UPDATE nodes SET reserved_vram = $2 WHERE id = $1", node["id"], GIB)
    await age(pg, node["id"])
    before = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert not before["fresh"]

    reply = await heartbeat(
        client,
        node["id"],
        available_vram=1,
        total_vram=2,
        available_ram=3,
        gpu_vendor="amd",
    )

    assert reply == {}
    after = await pg.fetchrow(HEARTBEAT_ROW, node["id"])
    assert after["fresh"]
    assert after["status"] == status
    for key in ("available_vram", "reserved_vram", "total_vram", "available_ram", "gpu_vendor"):
        assert after[key] == before[key], key


async def test_heartbeat_of_an_unknown_node(client: Client, pg: asyncpg.Connection) -> None:
    msg = await client.nc.request(f"{client.prefix}.heartbeat.ghost", b"{}", timeout=5)
    with pytest.raises(CallError) as info:
        parse(msg)
    assert info.value.code == 404
    assert "ghost" in info.value.message

    # Published without a reply subject: nothing to answer, and the daemon carries on.
    await client.publish("heartbeat.ghost", {"available_vram": 1})
    node = await client.healthy_node("gpu-1")
    await age(pg, node["id"])
    await client.publish(f"heartbeat.{node['id']}", {"available_vram": 77})
    row = await poll(pg, HEARTBEAT_ROW, node["id"], until=lambda r: r["fresh"])
    assert row["available_vram"] == 77
    assert await pg.fetchval("SELECT count(*) FROM nodes") == 1


async def test_heartbeat_rejects_bad_values(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    with pytest.raises(CallError) as info:
        await heartbeat(client, node["id"], available_vram=-1)
    assert info.value.code == 400
    assert "'available_vram'" in info.value.message


# ---------------------------------------------------------------- auth refs


async def test_auth_refs_are_stored_and_never_returned(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("agent-1")
    reply = await client.call(
        "auth_refs", node_id=node["id"], auth_user_id="user-123", api_key_id="key-456"
    )
    assert reply == {}
    row = await pg.fetchrow("SELECT auth_user_id, api_key_id FROM nodes WHERE id = $1", node["id"])
    assert (row["auth_user_id"], row["api_key_id"]) == ("user-123", "key-456")

    replies = [
        await client.call("get", node_id=node["id"]),
        await client.call("get", name="agent-1"),
        await client.call("list"),
        await client.call("list", extras=True),
        await client.call("max_replicas", node_id=node["id"], max_replicas_per_model=2),
    ]
    for reply in replies:
        text = orjson.dumps(reply).decode()
        assert "user-123" not in text
        assert "key-456" not in text
        for item in reply if isinstance(reply, list) else [reply]:
            assert not SECRET_FIELDS & set(item)
    # Re-registration keeps them, and hands them back (below).
    await client.register("agent-1")
    row = await pg.fetchrow("SELECT auth_user_id, api_key_id FROM nodes WHERE id = $1", node["id"])
    assert (row["auth_user_id"], row["api_key_id"]) == ("user-123", "key-456")


async def test_reregistration_hands_back_the_provisioned_credentials(client: Client) -> None:
    # LocalAI's Register copies the stored ids back to its caller, which
    # revokes the old user and key before provisioning new ones (v1.1).
    node = await client.healthy_node("agent-1")
    assert "auth_refs" not in node
    assert "auth_refs" not in await client.register("agent-1")  # none stored yet
    await client.call("auth_refs", node_id=node["id"], auth_user_id="user-123", api_key_id="")
    again = await client.register("agent-1")
    assert again["auth_refs"] == {"auth_user_id": "user-123", "api_key_id": ""}
    assert again["status"] == "healthy"


async def test_deregistration_hands_back_the_provisioned_credentials(client: Client) -> None:
    node = await client.healthy_node("agent-1")
    await client.call(
        "auth_refs", node_id=node["id"], auth_user_id="user-123", api_key_id="key-456"
    )
    events = await client.listen(f"{client.prefix}.events.node.{node['id']}")
    reply = await client.call("deregister", node_id=node["id"])
    refs = {"auth_user_id": "user-123", "api_key_id": "key-456"}
    assert reply == {"auth_refs": refs}
    _, event = await events.next()
    assert event["status"] == "deregistered" and event["auth_refs"] == refs
    # A node without any: the reply is {} and the event carries none.
    other = await client.healthy_node("gpu-2")
    events = await client.listen(f"{client.prefix}.events.node.{other['id']}")
    assert await client.call("deregister", node_id=other["id"]) == {}
    _, event = await events.next()
    assert event["status"] == "deregistered" and "auth_refs" not in event


async def test_auth_refs_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("auth_refs", node_id="ghost", auth_user_id="u"), 404, "ghost")


# ---------------------------------------------------------------- get


async def test_get_by_id_and_by_name_with_extras(client: Client) -> None:
    node = await client.healthy_node(
        "gpu-1", gpu_vendor="nvidia", total_vram=24 * GIB, labels={"zone": "a"}
    )
    other = await client.healthy_node("gpu-2")
    for model, index, state, in_flight in [
        ("llama", 0, "loaded", 2),
        ("llama", 1, "unloading", 3),
        ("qwen", 0, "loading", 5),
        ("mistral", 0, "loaded", 1),
        ("phi", 0, "idle", 7),
    ]:
        await client.call(
            "replica_set",
            node_id=node["id"],
            model=model,
            replica_index=index,
            state=state,
            in_flight=in_flight,
        )
    await client.call(
        "replica_set", node_id=other["id"], model="llama", state="loaded", in_flight=100
    )

    by_id = await client.call("get", node_id=node["id"])
    by_name = await client.call("get", name="gpu-1")

    assert by_id == by_name
    assert set(by_id) == NODE_FIELDS | EXTRAS_FIELDS
    assert by_id["id"] == node["id"]
    assert by_id["name"] == "gpu-1"
    assert by_id["status"] == "healthy"
    assert by_id["model_count"] == 2  # loaded replicas only
    assert by_id["in_flight_count"] == 2 + 3 + 1  # loaded and unloading
    assert by_id["labels"] == {
        "zone": "a",
        "gpu.vendor": "nvidia",
        "gpu.vram": "24GB",
        "node.name": "gpu-1",
        "node.replica-slots": "1",
    }


async def test_get_node_without_replicas_or_labels(client: Client) -> None:
    node = await client.healthy_node("gpu-1")
    await client.call("labels_set", node_id=node["id"], labels={})
    got = await client.call("get", node_id=node["id"])
    assert got["model_count"] == 0
    assert got["in_flight_count"] == 0
    assert got["labels"] == {}


async def test_get_unknown_node_is_404(client: Client) -> None:
    await fails(client.call("get", node_id="ghost"), 404, "ghost")
    await fails(client.call("get", name="nobody"), 404, "nobody")


async def test_get_needs_node_id_or_name(client: Client) -> None:
    err = await fails(client.call("get"), 400, "node_id", "name")
    assert err.body["error"]["status"] == "bad_request"


# ---------------------------------------------------------------- list


async def test_list_is_ordered_by_name(client: Client) -> None:
    for name in ["charlie", "alpha", "bravo"]:
        await client.register(name)
    nodes = await client.call("list")
    assert [n["name"] for n in nodes] == ["alpha", "bravo", "charlie"]
    assert all(set(n) == NODE_FIELDS for n in nodes)


async def test_list_empty(client: Client) -> None:
    assert await client.call("list") == []
    assert await client.call("list", extras=True) == []


async def test_list_with_extras(client: Client) -> None:
    a = await client.healthy_node("a", labels={"zone": "x"})
    await client.healthy_node("b")
    await client.call("replica_set", node_id=a["id"], model="llama", state="loaded", in_flight=4)
    await client.call(
        "replica_set", node_id=a["id"], model="llama", replica_index=1, state="unloading"
    )
    nodes = await client.call("list", extras=True)
    assert [n["name"] for n in nodes] == ["a", "b"]
    assert all(set(n) == NODE_FIELDS | EXTRAS_FIELDS for n in nodes)
    first, second = nodes
    assert (first["model_count"], first["in_flight_count"]) == (1, 4)
    assert first["labels"]["zone"] == "x"
    assert first["labels"]["node.name"] == "a"
    assert (second["model_count"], second["in_flight_count"]) == (0, 0)
    assert second["labels"] == {"node.name": "b", "node.replica-slots": "1"}


@pytest.mark.parametrize("extras", [False, True])
async def test_list_paging(client: Client, extras: bool) -> None:
    names = ["n.1", "n 2", "n3", "n4", "n5"]
    for name in names:
        await client.register(name)
    everything = await client.call("list", extras=extras)

    pages = await every_page(client, "list", limit=2, extras=extras)

    assert [len(p) for p in pages] == [2, 2, 1]
    assert [n for p in pages for n in p] == everything
    # The order is the database's collation of names; every node is there once.
    assert sorted(n["name"] for n in everything) == sorted(names)


async def test_list_page_that_ends_exactly_has_no_cursor(client: Client) -> None:
    for name in ["a", "b"]:
        await client.register(name)
    items, headers = await client.call_with_headers("list", limit=2)
    assert [n["name"] for n in items] == ["a", "b"]
    assert "Registry-Next" not in headers
    items, headers = await client.call_with_headers("list", limit=10000)
    assert len(items) == 2
    assert "Registry-Next" not in headers


async def test_a_page_too_large_for_nats_is_cut_to_fit(
    nats_with: Callable[[str], Any],  # first: its server outlives the daemon
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    server = nats_with("max_payload: 65536\n")
    daemon = await start_daemon(nats_url=server.url)
    async with client_of(daemon, server.url) as client:
        ids = []
        for i in range(8):
            node = await client.register(f"n{i}")
            # As large as a node's labels get: ~23 KB each, two nodes a page.
            labels = {f"{i}-{j:02}".ljust(128, "k"): "v" * 255 for j in range(60)}
            await client.call("labels_set", node_id=node["id"], labels=labels)
            ids.append(node["id"])
        # Without a limit the reply cannot be cut: the 413 that says to page.
        await fails(client.call("list", extras=True), 413, "'limit'")

        for op, fields, listed in [
            ("list", {"extras": True}, lambda items: [n["id"] for n in items]),
            ("labels_all", {}, list),
        ]:
            seen: list[str] = []
            fields["limit"] = 8
            for _ in range(10):
                msg = await client.raw(op, orjson.dumps(fields))
                items = parse(msg)
                headers = dict(msg.headers or {})
                body_and_headers = len(msg.data) + sum(
                    len(k) + len(v) + 4 for k, v in headers.items()
                )
                assert body_and_headers <= 65536
                assert 1 <= len(items) < 8
                seen += listed(items)
                if "Registry-Next" not in headers:
                    break
                fields["after"] = headers["Registry-Next"]
            assert sorted(seen) == sorted(ids), op


@pytest.mark.parametrize("after", ["not a cursor!", "W10", "WzFd", ""])
async def test_list_bad_cursor_is_400(client: Client, after: str) -> None:
    await client.register("a")
    await fails(client.call("list", limit=1, after=after), 400, "'after'")


async def test_list_extras_must_be_a_bool(client: Client) -> None:
    await fails(client.call("list", extras="yes"), 400, "'extras'")


@pytest.mark.parametrize("limit", [0, -1, 10001, "5"])
async def test_list_bad_limit_is_400(client: Client, limit: Any) -> None:
    await fails(client.call("list", limit=limit), 400, "'limit'")


# ---------------------------------------------------------------- stale


async def test_stale_lists_only_active_nodes_with_old_heartbeats(
    client: Client, pg: asyncpg.Connection
) -> None:
    ids: dict[str, str] = {}
    for name, op in [
        ("healthy-old", None),
        ("draining-old", "drain"),
        ("unhealthy-old", "unhealthy"),
        ("offline-old", "offline"),
        ("healthy-fresh", None),
    ]:
        node = await client.healthy_node(name)
        if op:
            await client.call(op, node_id=node["id"])
        ids[name] = node["id"]
    ids["pending-old"] = (await client.register("pending-old"))["id"]
    for name, node_id in ids.items():
        if name.endswith("-old"):
            await age(pg, node_id)

    stale = await client.call("stale", threshold_s=60)
    assert [n["name"] for n in stale] == ["draining-old", "healthy-old"]
    assert all(set(n) == NODE_FIELDS for n in stale)
    assert await client.call("stale", threshold_s=3600) == []
    # Fractional seconds work, and 0 finds every active node.
    stale = await client.call("stale", threshold_s=0.5)
    assert [n["name"] for n in stale] == ["draining-old", "healthy-old"]
    stale = await client.call("stale", threshold_s=0)
    assert [n["name"] for n in stale] == ["draining-old", "healthy-fresh", "healthy-old"]


async def test_stale_paging(client: Client, pg: asyncpg.Connection) -> None:
    for name in ["a", "b", "c"]:
        node = await client.healthy_node(name)
        await age(pg, node["id"])
    items, headers = await client.call_with_headers("stale", threshold_s=60, limit=2)
    assert [n["name"] for n in items] == ["a", "b"]
    items, headers = await client.call_with_headers(
        "stale", threshold_s=60, limit=2, after=headers["Registry-Next"]
    )
    assert [n["name"] for n in items] == ["c"]
    assert "Registry-Next" not in headers


@pytest.mark.parametrize("threshold", [None, -1, "60"])
async def test_stale_bad_threshold_is_400(client: Client, threshold: Any) -> None:
    fields = {} if threshold is None else {"threshold_s": threshold}
    await fails(client.call("stale", **fields), 400, "'threshold_s'")


# ---------------------------------------------------------------- max replicas


async def test_max_replicas_sets_a_manual_override(client: Client, pg: asyncpg.Connection) -> None:
    node = await client.healthy_node("gpu-1")
    updated = await client.call("max_replicas", node_id=node["id"], max_replicas_per_model=4)
    assert set(updated) == NODE_FIELDS
    assert updated["id"] == node["id"]
    assert updated["max_replicas_per_model"] == 4
    assert updated["max_replicas_per_model_manually_set"] is True
    row = await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node["id"])
    assert row["max_replicas_per_model"] == 4
    assert row["max_replicas_per_model_manually_set"] is True
    labels = await client.call("labels_get", node_id=node["id"])
    assert labels["node.replica-slots"] == "4"


@pytest.mark.parametrize("value", [0, -3, "2", None])
async def test_max_replicas_bad_value_is_400(
    client: Client, pg: asyncpg.Connection, value: Any
) -> None:
    node = await client.healthy_node("gpu-1")
    fields = {} if value is None else {"max_replicas_per_model": value}
    await fails(client.call("max_replicas", node_id=node["id"], **fields), 400, "max_replicas")
    row = await pg.fetchrow("SELECT * FROM nodes WHERE id = $1", node["id"])
    assert row["max_replicas_per_model"] == 1
    assert row["max_replicas_per_model_manually_set"] is False


async def test_max_replicas_unknown_node_is_404(client: Client) -> None:
    await fails(
        client.call("max_replicas", node_id="ghost", max_replicas_per_model=2), 404, "ghost"
    )


# ---------------------------------------------------------------- request bodies


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'"x"'])
async def test_body_must_be_a_json_object(client: Client, body: bytes) -> None:
    await fails(client.call("get", body), 400)


async def test_unknown_fields_are_ignored(client: Client) -> None:
    node = await client.register("gpu-1", future_field={"x": 1}, another=3)
    assert node["name"] == "gpu-1"
