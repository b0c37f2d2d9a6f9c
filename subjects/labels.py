"""Labels: key/value pairs on nodes that scheduling selectors match (AND of pairs).

Every change clears the reconciler's cooldown flags in the same statement: a new
label can make a selector match, so a model marked unsatisfiable may now fit.
"""

from __future__ import annotations

from typing import Any

from daemon.errors import NotFound
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
)
from subjects.scheduling import wake_scheduling

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


# A missing node violates node_labels_node_id_fkey, which the edge reports as 404.
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
    await ctx.db.execute(LABEL_SET, req.node_id, req.key, req.value)
    return OK


@group.op("labels_set", LabelsSetRequest)
async def labels_set(ctx: Context, req: LabelsSetRequest) -> Any:
    """Replace all of a node's labels with the given object."""
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
