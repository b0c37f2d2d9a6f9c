"""Labels: key/value pairs on nodes that scheduling selectors match (AND of pairs).

Every change clears the reconciler's cooldown flags in the same statement: a new
label can make a selector match, so a model marked unsatisfiable may now fit.

A node has at most REGISTRY_MAX_LABELS labels, so that no node can make a reply
(`get`, `labels_get`, a page of a list) larger than NATS carries. The cap
counts the automatic labels registration keeps (AUTO_LABELS) whether the node
has them yet or not: a worker's re-registration, which may add them, is never
refused for labels an admin set.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import asyncpg

from infra.errors import BadRequest, NotFound
from subjects.base import (
    OK,
    Context,
    Group,
    LabelKey,
    Labels,
    LabelValue,
    NodeId,
    NodeRef,
    Paged,
    Request,
    page,
    wake_scheduling,
)

group = Group()


class LabelSetRequest(Request):
    node_id: NodeId
    key: LabelKey
    value: LabelValue


class LabelsSetRequest(Request):
    node_id: NodeId
    labels: Labels


class LabelRemoveRequest(Request):
    node_id: NodeId
    key: LabelKey


# The labels registration sets itself (subjects/nodes.py), counted by the cap
# whether a node has them or not.
AUTO_LABELS = ("node.name", "gpu.vendor", "gpu.vram", "node.replica-slots")

# Writers that may add a label to a node lock its row first, so their counts
# and inserts take turns. The count is a statement of its own, after the
# lock: a statement sees the database as it was when the statement began,
# before it waited, and would miss the labels of the writer it waited for.
LOCK_NODE_LABELS = "SELECT id FROM nodes WHERE id = $1 FOR NO KEY UPDATE"

# The labels of node $1 (none for NULL, a node not created yet) merged with
# the keys $2, counting the automatic keys $3 as present: before and after.
LABEL_COUNTS = """
    SELECT count(*) FILTER (WHERE had) AS before, count(*) AS after FROM (
        SELECT key, bool_or(had) AS had FROM (
            SELECT key, true AS had FROM node_labels WHERE node_id = $1
            UNION ALL SELECT key, true FROM unnest($3::text[]) AS auto(key)
            UNION ALL SELECT key, false FROM unnest($2::text[]) AS new(key)
        ) AS keys GROUP BY key
    ) AS merged"""


def too_many(cap: int, count: int) -> BadRequest:
    return BadRequest(
        f"invalid field 'labels': a node may have at most {cap} labels, counting the "
        f"automatic {', '.join(AUTO_LABELS)}; this would make {count}"
    )


async def check_room(
    conn: asyncpg.Connection, cap: int, node_id: str | None, keys: Collection[str]
) -> None:
    """400 unless merging `keys` into the labels of a node whose row this
    transaction has locked keeps it within the cap. A node above it (the cap
    was lowered) may keep and change what it has, but gain no new key."""
    row = await conn.fetchrow(LABEL_COUNTS, node_id, list(keys), list(AUTO_LABELS))
    assert row is not None
    if row["after"] > cap and row["after"] > row["before"]:
        raise too_many(cap, row["after"])


LABEL_SET = f"""
    WITH set AS (
        INSERT INTO node_labels (node_id, key, value) VALUES ($1, $2, $3)
        ON CONFLICT (node_id, key) DO UPDATE SET value = EXCLUDED.value
    ),
    {wake_scheduling()}
    SELECT 1"""

# Replace the whole set: upsert the new pairs, delete the keys not among them
# (two disjoint sets of rows, so one statement can do both).
LABELS_SET = f"""
    WITH n AS (SELECT id FROM nodes WHERE id = $1 FOR UPDATE),
    kept AS (
        INSERT INTO node_labels (node_id, key, value)
        SELECT n.id, l.key, l.value FROM n, unnest($2::text[], $3::text[]) AS l(key, value)
        ON CONFLICT (node_id, key) DO UPDATE SET value = EXCLUDED.value
    ),
    dropped AS (
        DELETE FROM node_labels l USING n WHERE l.node_id = n.id AND NOT (l.key = ANY($2))
    ),
    {wake_scheduling("EXISTS (SELECT 1 FROM n)")}
    SELECT id FROM n"""

LABEL_REMOVE = f"""
    WITH n AS (SELECT id FROM nodes WHERE id = $1),
    gone AS (DELETE FROM node_labels l USING n WHERE l.node_id = n.id AND l.key = $2),
    {wake_scheduling("EXISTS (SELECT 1 FROM n)")}
    SELECT id FROM n"""

LABELS_GET = """
    SELECT (SELECT COALESCE(jsonb_object_agg(l.key, l.value), '{}')
              FROM node_labels l WHERE l.node_id = n.id) AS labels
      FROM nodes n WHERE n.id = $1"""

# Paged by node id ($1: the last one of the previous page).
LABELS_ALL = """
    SELECT node_id, jsonb_object_agg(key, value) AS labels
      FROM node_labels
     WHERE $1::text IS NULL OR node_id > $1
     GROUP BY node_id ORDER BY node_id LIMIT $2"""


@group.op("label_set", LabelSetRequest)
async def label_set(ctx: Context, req: LabelSetRequest) -> Any:
    """Set one label on a node (insert or replace its value)."""
    async with ctx.db.transaction() as conn:
        if await conn.fetchval(LOCK_NODE_LABELS, req.node_id) is None:
            raise NotFound(f"node {req.node_id} not found")
        await check_room(conn, ctx.settings.max_labels, req.node_id, [req.key])
        await conn.execute(LABEL_SET, req.node_id, req.key, req.value)
    return OK


@group.op("labels_set", LabelsSetRequest)
async def labels_set(ctx: Context, req: LabelsSetRequest) -> Any:
    """Replace all of a node's labels with the given object."""
    # The node ends with exactly these labels: the cap needs no look at it.
    count = len(req.labels.keys() | set(AUTO_LABELS))
    if count > ctx.settings.max_labels:
        raise too_many(ctx.settings.max_labels, count)
    found = await ctx.db.fetchval(
        LABELS_SET, req.node_id, list(req.labels), list(req.labels.values())
    )
    if found is None:
        raise NotFound(f"node {req.node_id} not found")
    return OK


@group.op("label_remove", LabelRemoveRequest)
async def label_remove(ctx: Context, req: LabelRemoveRequest) -> Any:
    """Remove one label from a node (removing an absent key is not an error)."""
    if await ctx.db.fetchval(LABEL_REMOVE, req.node_id, req.key) is None:
        raise NotFound(f"node {req.node_id} not found")
    return OK


@group.op("labels_get", NodeRef)
async def labels_get(ctx: Context, req: NodeRef) -> Any:
    """A node's labels as one object."""
    row = await ctx.db.fetchrow(LABELS_GET, req.node_id)
    if row is None:
        raise NotFound(f"node {req.node_id} not found")
    return row["labels"]


def by_node(item: dict[str, Any]) -> list[Any]:
    return [item["node_id"]]


def keyed_by_node(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["node_id"]: item["labels"] for item in items}


@group.op("labels_all", Paged)
async def labels_all(ctx: Context, req: Paged) -> Any:
    """Every node's labels, keyed by node id (nodes without labels are left out)."""
    rows = await ctx.db.fetch(LABELS_ALL, *req.cursor(NodeId), req.sql_limit())
    items = [dict(row) for row in rows]
    return page(req, items, by_node, max_reply=ctx.max_reply, body=keyed_by_node)
