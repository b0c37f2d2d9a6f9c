"""Replicas: which model replica runs where (Go: NodeModel rows).

Removing rows announces them on `prefixcache.invalidate` after the commit, so a
prefix-cache index never routes to a replica that is gone.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints

from infra.errors import Conflict, NotFound
from subjects.base import (
    MAX_INT32,
    OK,
    Context,
    Count,
    Group,
    ModelName,
    NodeId,
    OwnNodeRequest,
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


class OwnReplicaSetRequest(OwnNodeRequest):
    model: ModelName
    replica_index: ReplicaIndex = 0
    state: ReplicaState
    address: Annotated[str, StringConstraints(max_length=512)] = ""


# What a worker says of its own replica is its state and address; the
# requests in flight on one already recorded are the routers' count and stay
# (a worker recording what it serves again must not zero them).
REPLICA_SET_OWN = f"""
    INSERT INTO replicas AS r (node_id, model_name, replica_index, state, address)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (node_id, model_name, replica_index) DO UPDATE SET
        state = EXCLUDED.state,
        address = EXCLUDED.address,
        last_used = now(),
        updated_at = now()
    RETURNING {REPLICA_COLUMNS}"""


@group.op(
    "replica_set_self",
    OwnReplicaSetRequest,
    subject="replica_set",
    subject_field="subject_node",
)
async def replica_set_self(ctx: Context, req: OwnReplicaSetRequest) -> Any:
    """A worker records a replica on its own node, on registry.replica_set.<node_id>."""
    row = await ctx.db.fetchrow(
        REPLICA_SET_OWN, req.subject_node, req.model, req.replica_index, req.state, req.address
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
    model, index = req.cursor(ModelName, ReplicaIndex)
    rows = await ctx.db.fetch(NODE_MODELS, req.node_id, model, index, req.sql_limit())
    return page(req, records(rows), by_model_and_index, max_reply=ctx.max_reply)


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


# ---------------------------------------------------------------- bookkeeping

REPLICA_TOUCH = """
    UPDATE replicas SET last_used = now()
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3"""


@group.op("replica_touch", ReplicaRef)
async def replica_touch(ctx: Context, req: ReplicaRef) -> Any:
    """Mark a replica used now, for LRU eviction (a missing one is not an error)."""
    await ctx.db.execute(REPLICA_TOUCH, req.node_id, req.model, req.replica_index)
    return OK


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (standard alphabet, padded)") from None


# Binary blobs travel as base64, as Go encodes []byte.
Blob = Annotated[bytes, BeforeValidator(_base64)]
BackendType = Annotated[str, StringConstraints(max_length=128)]


class ReplicaLoadInfoRequest(ReplicaRef):
    backend_type: BackendType = ""
    model_opts: Blob | None = None


REPLICA_LOAD_INFO = """
    UPDATE replicas SET backend_type = $4, model_opts = $5, updated_at = now()
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3"""


@group.op("replica_load_info", ReplicaLoadInfoRequest)
async def replica_load_info(ctx: Context, req: ReplicaLoadInfoRequest) -> Any:
    """Stamp a replica with how it was loaded (backend type, options)."""
    await ctx.db.execute(
        REPLICA_LOAD_INFO,
        req.node_id,
        req.model,
        req.replica_index,
        req.backend_type,
        req.model_opts,
    )
    return OK


REPLICA_COUNT = "SELECT count(*) FROM replicas WHERE node_id = $1 AND model_name = $2"


@group.op("replica_count", NodeModelRef)
async def replica_count(ctx: Context, req: NodeModelRef) -> Any:
    """How many replicas of a model a node has, in any state."""
    return {"count": await ctx.db.fetchval(REPLICA_COUNT, req.node_id, req.model)}


class NextIndexRequest(NodeModelRef):
    max_slots: Annotated[int, Field(ge=-MAX_INT32, le=MAX_INT32)]


# The lowest index not taken: 0 if free, else the first taken index whose
# successor is free. Lowest-first keeps slot numbers (and the worker's ports)
# compact across scale-down and scale-up. In bigint: the successor of a
# replica at the integer limit (2^31 - 1) is past any max_slots (a 409), not
# an overflow.
NEXT_INDEX = """
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM replicas
                          WHERE node_id = $1 AND model_name = $2 AND replica_index = 0) THEN 0
        ELSE (SELECT min(r.replica_index::bigint) + 1 FROM replicas r
               WHERE r.node_id = $1 AND r.model_name = $2
                 AND NOT EXISTS (SELECT 1 FROM replicas s
                                  WHERE s.node_id = $1 AND s.model_name = $2
                                    AND s.replica_index = r.replica_index::bigint + 1))
    END"""


@group.op("replica_next_index", NextIndexRequest)
async def replica_next_index(ctx: Context, req: NextIndexRequest) -> Any:
    """The lowest free replica index below `max_slots` (409 when all are taken)."""
    if req.max_slots <= 0:
        raise Conflict(f"no free replica slot: max_slots is {req.max_slots}")
    index = await ctx.db.fetchval(NEXT_INDEX, req.node_id, req.model)
    if index >= req.max_slots:
        raise Conflict(
            f"no free replica slot for {req.model!r} on {req.node_id}: "
            f"all {req.max_slots} are taken"
        )
    return {"replica_index": index}
