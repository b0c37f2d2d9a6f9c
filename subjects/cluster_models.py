"""LLM models across the cluster (not pydantic models): where they are loaded,
how busy, what evicts first, and the load information a reconciler needs to
start another replica.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from subjects.base import (
    OK,
    Context,
    Group,
    ModelName,
    NodeId,
    NodeIds,
    NodeRef,
    Paged,
    ReplicaIndex,
    Request,
    found,
    page,
    records,
)
from subjects.nodes import NODE_COLUMNS
from subjects.replicas import REPLICA_COLUMNS, BackendType, Blob

group = Group()


LOADED_ON_HEALTHY = """
    r.state = 'loaded' AND n.status = 'healthy'"""


class StatsRequest(Paged):
    model: ModelName
    node_ids: NodeIds = Field(default_factory=list)


# replica_index is our addition: with it a router can name the exact replica in
# findlock's `prefer`.
REPLICA_STATS = f"""
    SELECT r.node_id, r.replica_index, r.in_flight
      FROM replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND {LOADED_ON_HEALTHY}
       AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))
       AND ($3::text IS NULL OR (r.node_id, r.replica_index) > ($3, $4::int))
     ORDER BY r.node_id, r.replica_index LIMIT $5"""


def by_node_and_index(stat: dict[str, Any]) -> list[Any]:
    return [stat["node_id"], stat["replica_index"]]


@group.op("replica_stats", StatsRequest)
async def replica_stats(ctx: Context, req: StatsRequest) -> Any:
    """In-flight counts of the loaded replicas of a model on healthy nodes."""
    rows = await ctx.db.fetch(
        REPLICA_STATS,
        req.model,
        req.node_ids,
        *req.cursor(NodeId, ReplicaIndex),
        req.sql_limit(),
    )
    return page(req, records(rows), by_node_and_index, max_reply=ctx.max_reply)


LOADED_MODELS = f"""
    SELECT {REPLICA_COLUMNS} FROM replicas r JOIN nodes n ON n.id = r.node_id
     WHERE {LOADED_ON_HEALTHY}
       AND ($1::text IS NULL OR (r.model_name, r.node_id, r.replica_index) > ($1, $2, $3::int))
     ORDER BY r.model_name, r.node_id, r.replica_index LIMIT $4"""


def by_model_node_and_index(replica: dict[str, Any]) -> list[Any]:
    return [replica["model_name"], replica["node_id"], replica["replica_index"]]


@group.op("loaded_models", Paged)
async def loaded_models(ctx: Context, req: Paged) -> Any:
    """Every loaded replica on a healthy node, by model."""
    rows = await ctx.db.fetch(
        LOADED_MODELS, *req.cursor(ModelName, NodeId, ReplicaIndex), req.sql_limit()
    )
    return page(req, records(rows), by_model_node_and_index, max_reply=ctx.max_reply)


class ModelRef(Request):
    model: ModelName


class NodesWithModelRequest(Paged):
    model: ModelName


# Each node once, ranked by its least busy replica of the model; that replica's
# in-flight count is in the reply too, as `model_in_flight` (our addition).
# Unpaged ($3 NULL): least in flight first. Paged: by node id, because a
# cursor of in-flight counts, which change between pages, would skip nodes
# or list them twice; the handler orders each page least in flight first.
NODES_WITH_MODEL = f"""
    SELECT {NODE_COLUMNS}, best.in_flight AS model_in_flight
      FROM nodes n
      JOIN LATERAL (
            SELECT min(r.in_flight) AS in_flight FROM replicas r
             WHERE r.node_id = n.id AND r.model_name = $1 AND r.state = 'loaded'
           ) AS best ON best.in_flight IS NOT NULL
     WHERE n.status = 'healthy' AND ($2::text IS NULL OR n.id > $2)
     ORDER BY CASE WHEN $3::int IS NULL THEN best.in_flight END, n.id LIMIT $3"""


def by_id(node: dict[str, Any]) -> list[Any]:
    return [node["id"]]


def least_in_flight_first(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(nodes, key=lambda n: (n["model_in_flight"], n["id"]))


@group.op("nodes_with_model", NodesWithModelRequest)
async def nodes_with_model(ctx: Context, req: NodesWithModelRequest) -> Any:
    """Healthy nodes with the model loaded, least in flight first."""
    rows = await ctx.db.fetch(NODES_WITH_MODEL, req.model, *req.cursor(NodeId), req.sql_limit())
    if req.limit is None:
        return records(rows)  # already in order
    return page(req, records(rows), by_id, max_reply=ctx.max_reply, body=least_in_flight_first)


LOADED_COUNT = "SELECT count(*) FROM replicas WHERE model_name = $1 AND state = 'loaded'"


@group.op("loaded_count", ModelRef)
async def loaded_count(ctx: Context, req: ModelRef) -> Any:
    """How many replicas of the model are loaded."""
    return {"count": await ctx.db.fetchval(LOADED_COUNT, req.model)}


LRU = f"""
    SELECT {REPLICA_COLUMNS} FROM replicas r
     WHERE r.node_id = $1 AND r.state = 'loaded' AND r.in_flight = 0
     ORDER BY r.last_used, r.model_name, r.replica_index LIMIT 1"""

LRU_GLOBAL = f"""
    SELECT {REPLICA_COLUMNS} FROM replicas r JOIN nodes n ON n.id = r.node_id
     WHERE {LOADED_ON_HEALTHY} AND n.node_type = 'backend' AND r.in_flight = 0
     ORDER BY r.last_used, r.model_name, r.replica_index LIMIT 1"""


@group.op("lru", NodeRef)
async def lru(ctx: Context, req: NodeRef) -> Any:
    """The least recently used idle replica on a node: the first to evict."""
    row = await ctx.db.fetchrow(LRU, req.node_id)
    return found(row, f"no loaded replica without requests in flight on {req.node_id}")


@group.op("lru_global", Request)
async def lru_global(ctx: Context, req: Request) -> Any:
    """The least recently used idle replica in the whole cluster."""
    return found(await ctx.db.fetchrow(LRU_GLOBAL), "no loaded replica without requests in flight")


class LoadInfoSetRequest(Request):
    model: ModelName
    backend_type: BackendType = ""
    model_opts: Blob | None = None


# Last write wins, as in Go: two frontends loading the same model converge.
LOAD_INFO_SET = """
    INSERT INTO model_load_info (model_name, backend_type, model_opts) VALUES ($1, $2, $3)
    ON CONFLICT (model_name) DO UPDATE SET
        backend_type = EXCLUDED.backend_type,
        model_opts = EXCLUDED.model_opts,
        updated_at = now()"""

# The model's own row first; else what a loaded replica was stamped with (load
# info written before any frontend kept the per-model copy). SQL promises no
# order of UNION ALL's rows without ORDER BY, hence `source`.
LOAD_INFO_GET = """
    SELECT backend_type, model_opts FROM (
        (SELECT 0 AS source, backend_type, model_opts FROM model_load_info
          WHERE model_name = $1)
        UNION ALL
        (SELECT 1, backend_type, model_opts FROM replicas
          WHERE model_name = $1 AND state = 'loaded' AND model_opts IS NOT NULL
          ORDER BY updated_at DESC LIMIT 1)
    ) AS info
    ORDER BY source LIMIT 1"""


@group.op("load_info_set", LoadInfoSetRequest)
async def load_info_set(ctx: Context, req: LoadInfoSetRequest) -> Any:
    """Keep how a model was loaded, so a reconciler can load it again."""
    await ctx.db.execute(LOAD_INFO_SET, req.model, req.backend_type, req.model_opts)
    return OK


@group.op("load_info_get", ModelRef)
async def load_info_get(ctx: Context, req: ModelRef) -> Any:
    """How the model was loaded: backend type and options (base64)."""
    row = await ctx.db.fetchrow(LOAD_INFO_GET, req.model)
    return found(row, f"no load information for model {req.model!r}")
