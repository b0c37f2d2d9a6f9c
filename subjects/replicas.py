"""Replicas: which model replica runs where (Go: NodeModel rows).

Removing rows announces them on `prefixcache.invalidate` after the commit, so a
prefix-cache index never routes to a replica that is gone.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import StringConstraints

from daemon.errors import NotFound
from subjects.base import (
    OK,
    Context,
    Count,
    Group,
    ModelName,
    NodeId,
    Paged,
    ReplicaIndex,
    Request,
    page,
    record,
    records,
)

group = Group()

REPLICA_COLUMNS = """
    r.id, r.node_id, r.model_name, r.replica_index, r.address, r.state, r.in_flight,
    r.last_used, r.loading_by, r.backend_type, r.created_at, r.updated_at"""

ReplicaState = Literal["loading", "loaded", "unloading", "idle"]


class ReplicaRef(Request):
    node_id: NodeId
    model: ModelName
    replica_index: ReplicaIndex = 0


class NodeModelRef(Request):
    node_id: NodeId
    model: ModelName


class ReplicaSetRequest(ReplicaRef):
    state: ReplicaState
    address: Annotated[str, StringConstraints(max_length=512)] = ""
    in_flight: Count = 0


# A row for an unknown node violates replicas_node_id_fkey: the edge says 404.
REPLICA_SET = f"""
    INSERT INTO replicas AS r (node_id, model_name, replica_index, state, address, in_flight)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (node_id, model_name, replica_index) DO UPDATE SET
        state = EXCLUDED.state,
        address = EXCLUDED.address,
        in_flight = EXCLUDED.in_flight,
        last_used = now(),
        updated_at = now()
    RETURNING {REPLICA_COLUMNS}"""

REPLICA_GET = f"""
    SELECT {REPLICA_COLUMNS} FROM replicas r
     WHERE r.node_id = $1 AND r.model_name = $2 AND r.replica_index = $3"""

NODE_MODELS = f"""
    SELECT {REPLICA_COLUMNS} FROM replicas r
     WHERE r.node_id = $1
       AND ($2::text IS NULL OR (r.model_name, r.replica_index) > ($2, $3::int))
     ORDER BY r.model_name, r.replica_index LIMIT $4"""

REPLICA_REMOVE = """
    DELETE FROM replicas
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3
    RETURNING 1"""

REPLICA_REMOVE_ALL = """
    WITH gone AS (DELETE FROM replicas WHERE node_id = $1 AND model_name = $2 RETURNING 1)
    SELECT count(*) FROM gone"""


@group.op("replica_set", ReplicaSetRequest)
async def replica_set(ctx: Context, req: ReplicaSetRequest) -> Any:
    """Record a replica of a model on a node (insert, or replace its state)."""
    row = await ctx.db.fetchrow(
        REPLICA_SET,
        req.node_id,
        req.model,
        req.replica_index,
        req.state,
        req.address,
        req.in_flight,
    )
    return record(row)


@group.op("replica_get", ReplicaRef)
async def replica_get(ctx: Context, req: ReplicaRef) -> Any:
    """One replica row."""
    row = await ctx.db.fetchrow(REPLICA_GET, req.node_id, req.model, req.replica_index)
    if row is None:
        raise NotFound(f"replica {req.replica_index} of {req.model!r} on {req.node_id} not found")
    return record(row)


class NodeModelsRequest(Paged):
    node_id: NodeId


def by_model_and_index(replica: dict[str, Any]) -> list[Any]:
    return [replica["model_name"], replica["replica_index"]]


@group.op("node_models", NodeModelsRequest)
async def node_models(ctx: Context, req: NodeModelsRequest) -> Any:
    """Every replica row on a node, by model and replica index."""
    model, index = req.cursor(str, int)
    rows = await ctx.db.fetch(NODE_MODELS, req.node_id, model, index, req.sql_limit())
    return page(req, records(rows), by_model_and_index)


@group.op("replica_remove", ReplicaRef)
async def replica_remove(ctx: Context, req: ReplicaRef) -> Any:
    """Remove one replica row (removing an absent one is not an error)."""
    if await ctx.db.fetchval(REPLICA_REMOVE, req.node_id, req.model, req.replica_index):
        await ctx.events.replicas_removed(req.node_id, [req.model], req.replica_index)
    return OK


@group.op("replica_remove_all", NodeModelRef)
async def replica_remove_all(ctx: Context, req: NodeModelRef) -> Any:
    """Remove every replica of a model on a node."""
    if await ctx.db.fetchval(REPLICA_REMOVE_ALL, req.node_id, req.model):
        await ctx.events.replicas_removed(req.node_id, [req.model])
    return OK

