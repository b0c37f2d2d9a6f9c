"""The schema at start-up: applied to a new or older database, skipped when current."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from daemon.app import Daemon
from infra import db
from tests.support import Client

INDEX = "SELECT count(*) FROM pg_indexes WHERE indexname = 'leases_expires_at_idx'"


async def test_a_current_schema_is_not_applied_again(pg: asyncpg.Connection) -> None:
    assert await pg.fetchval("SELECT digest FROM registry_schema") == db.schema_digest()
    # Something only a new run of schema.sql would put back: it stays gone,
    # because a start-up on a current database runs no DDL.
    await pg.execute("DROP INDEX leases_expires_at_idx")
    await db.migrate(pg)
    assert await pg.fetchval(INDEX) == 0
    # Another registryd version applied its schema last: this one applies its own.
    await pg.execute("UPDATE registry_schema SET digest = 'another version'")
    await db.migrate(pg)
    assert await pg.fetchval(INDEX) == 1
    assert await pg.fetchval("SELECT digest FROM registry_schema") == db.schema_digest()


async def test_a_database_from_before_status_since_is_upgraded_and_keeps_its_nodes(
    pg: asyncpg.Connection,
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
) -> None:
    first = await start_daemon()
    client = await clients(first)
    node = await client.healthy_node("gpu-1", labels={"zone": "a"})
    await client.call("offline", node_id=node["id"])
    await first.stop()
    # The shape of a v1.2 database: no status_since, no digest kept.
    await pg.execute("ALTER TABLE nodes DROP COLUMN status_since")
    await pg.execute("DROP TABLE registry_schema")

    client = await clients(await start_daemon())
    got = await client.call("get", node_id=node["id"])
    assert (got["name"], got["status"], got["labels"]["zone"]) == ("gpu-1", "offline", "a")
    # Still approved: `healthy` is allowed (a node never approved gets 409).
    assert await client.call("healthy", node_id=node["id"]) is not None
    assert (await client.call("get", node_id=node["id"]))["status"] == "healthy"
    assert await pg.fetchval("SELECT digest FROM registry_schema") == db.schema_digest()
