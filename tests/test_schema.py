"""The schema at start-up: applied to a new or older database, skipped when current."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

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


async def node_then_stopped(
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
    then: str | None = None,
) -> dict[str, Any]:
    """An approved node, labelled (and `then` applied to it), in a database
    whose daemon has stopped."""
    first = await start_daemon()
    client = await clients(first)
    node = await client.healthy_node("gpu-1", labels={"zone": "a"})
    if then is not None:
        await client.call(then, node_id=node["id"])
    await first.stop()
    return node


async def test_a_database_from_before_status_since_is_upgraded_and_keeps_its_nodes(
    pg: asyncpg.Connection,
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
) -> None:
    node = await node_then_stopped(start_daemon, clients, then="offline")
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


NODES_OPTIONS = "SELECT reloptions FROM pg_class WHERE oid = 'nodes'::regclass"
# The catalog row of the table: a new version of it (another xmin) each time
# an ALTER TABLE touches the table.
NODES_CATALOG_ROW = "SELECT xmin::text FROM pg_class WHERE oid = 'nodes'::regclass"


async def test_a_database_with_full_node_pages_gets_room_for_heartbeats_and_keeps_its_nodes(
    pg: asyncpg.Connection,
    start_daemon: Callable[..., Awaitable[Daemon]],
    clients: Callable[[Daemon], Awaitable[Client]],
) -> None:
    node = await node_then_stopped(start_daemon, clients)
    # A database from before the fillfactor: full pages, and its digest.
    await pg.execute("ALTER TABLE nodes RESET (fillfactor)")
    await pg.execute("UPDATE registry_schema SET digest = 'before the fillfactor'")

    client = await clients(await start_daemon())
    assert await pg.fetchval(NODES_OPTIONS) == ["fillfactor=50"]
    got = await client.call("get", node_id=node["id"])
    assert (got["name"], got["status"], got["labels"]["zone"]) == ("gpu-1", "healthy", "a")
    assert await client.call(f"heartbeat.{node['id']}", available_vram=7) is not None
    assert (await client.call("get", node_id=node["id"]))["available_vram"] == 7
    # Applied again with the option already set, the schema leaves the table
    # alone: no ALTER TABLE, so no lock that serving instances would queue behind.
    catalog_row = await pg.fetchval(NODES_CATALOG_ROW)
    await pg.execute("UPDATE registry_schema SET digest = 'another version'")
    await db.migrate(pg)
    assert await pg.fetchval("SELECT digest FROM registry_schema") == db.schema_digest()
    assert await pg.fetchval(NODES_CATALOG_ROW) == catalog_row


# Bytes of the nodes table and of its indexes.
SIZES = """
    SELECT pg_relation_size('nodes'),
           (SELECT sum(pg_relation_size(indexrelid)) FROM pg_index
             WHERE indrelid = 'nodes'::regclass)::bigint"""
# Each node's page in the table.
PAGES = "SELECT id, (ctid::text::point)[0] AS page FROM nodes"


async def test_heartbeats_do_not_grow_the_nodes_table(
    pg: asyncpg.Connection, client: Client
) -> None:
    # Nodes that registered together, one after the other in the table, and
    # heartbeat together: a batch of readings rewrites whole pages at once.
    await pg.execute(
        """INSERT INTO nodes (name, address, status, approved)
           SELECT 'gpu-' || g, 'a:1', 'healthy', true FROM generate_series(1, 500) g"""
    )
    ids = [r[0] for r in await pg.fetch("SELECT id FROM nodes ORDER BY ctid")]
    heap, indexes = await pg.fetchrow(SIZES)
    pages = dict(await pg.fetch(PAGES))
    for n in range(1, 4):
        for node_id in ids[:-1]:
            body = orjson.dumps({"available_vram": n})
            await client.nc.publish(f"{client.prefix}.heartbeat.{node_id}", body)
        # Answered once its batch is written, and batches are written in
        # order: the whole round is in the table.
        assert await client.call(f"heartbeat.{ids[-1]}", available_vram=n) is not None
    assert await pg.fetchval("SELECT count(*) FROM nodes WHERE available_vram = 3") == len(ids)

    # Each new version of a row found room on its page, so no index got an
    # entry for it (a HOT update) and the old one was pruned in place. With
    # fillfactor 100, 493 rows of 500 moved: the table and its indexes grew
    # by a copy of the table each round, until a VACUUM.
    moved = sum(r["page"] != pages[r["id"]] for r in await pg.fetch(PAGES))
    assert moved <= 0.1 * len(ids)
    heap_after, indexes_after = await pg.fetchrow(SIZES)
    assert heap_after <= 1.1 * heap
    assert indexes_after <= 1.1 * indexes
