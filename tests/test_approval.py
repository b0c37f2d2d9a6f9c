"""Approval is sticky, and only `approve` (or auto-approve) grants it (v1.1).

On v1 a worker could approve itself: register (pending), go offline, register
again (healthy). Status said whether a node had been approved, and status is
what a worker can change. Approval is now stored, and the database itself
refuses a healthy node that was never approved.
"""

from __future__ import annotations

import asyncpg
import pytest

from daemon.app import Daemon
from tests.support import Client, fails


@pytest.mark.parametrize("detour", ["offline", "unhealthy", "drain"])
async def test_a_worker_cannot_approve_itself_by_registering_again(
    client: Client, detour: str
) -> None:
    node = await client.register("w")
    assert node["status"] == "pending"
    await client.replica(node, "m")
    assert await client.call(detour, node_id=node["id"]) == {}
    again = await client.register("w")
    assert again["status"] == "pending"
    await client.replica(again, "m")
    await fails(client.call("findlock", model="m"), 404)
    await fails(client.call("find_vram", min_bytes=0), 404)


async def test_the_sweep_does_not_revive_a_node_never_approved(
    client: Client, daemon: Daemon, pg: asyncpg.Connection
) -> None:
    node = await client.register("w")
    await client.call("offline", node_id=node["id"])
    # A fresh heartbeat after the change: an approved node would be revived.
    await pg.execute(
        "UPDATE nodes SET status_since = now() - interval '1 minute', last_heartbeat = now()"
    )
    assert daemon.sweep is not None
    await daemon.sweep.sweep_nodes()
    assert (await client.call("get", node_id=node["id"]))["status"] == "offline"
    await fails(client.call("healthy", node_id=node["id"]), 409, "never been approved")


async def test_an_approved_node_keeps_its_approval_until_deregistered(
    client: Client, daemon: Daemon, pg: asyncpg.Connection
) -> None:
    node = await client.healthy_node("w")
    for detour in ("offline", "unhealthy", "drain"):
        await client.call(detour, node_id=node["id"])
        assert (await client.register("w"))["status"] == "healthy"
    await client.call("offline", node_id=node["id"])
    await pg.execute(
        "UPDATE nodes SET status_since = now() - interval '1 minute', last_heartbeat = now()"
    )
    assert daemon.sweep is not None
    await daemon.sweep.sweep_nodes()
    assert (await client.call("get", node_id=node["id"]))["status"] == "healthy"
    # Deregistration ends it: the same name starts over, pending.
    await client.call("deregister", node_id=node["id"])
    assert (await client.register("w"))["status"] == "pending"


async def test_the_database_refuses_a_healthy_node_never_approved(
    client: Client, pg: asyncpg.Connection
) -> None:
    node = await client.register("w")
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE nodes SET status = 'healthy' WHERE id = $1", node["id"])
    node = await client.healthy_node("w2")
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE nodes SET approved = false WHERE id = $1", node["id"])


async def test_auto_approve_grants_approval_at_registration(
    start_daemon: object, clients: object
) -> None:
    daemon = await start_daemon(auto_approve=True)  # type: ignore[operator]
    client = await clients(daemon)  # type: ignore[operator]
    node = await client.register("w")
    assert node["status"] == "healthy"
    await client.call("offline", node_id=node["id"])
    assert (await client.register("w"))["status"] == "healthy"
