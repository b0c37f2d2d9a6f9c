"""Placement: where a scheduler can put a new replica, and soft VRAM reservations.

Only healthy `backend` nodes are candidates. "Effectively free" VRAM is
available - reserved: a reservation is what a scheduler took within the current
heartbeat window, and the node's next VRAM reading clears it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from infra.errors import Conflict, NotFound
from subjects.base import (
    OK,
    ByteCount,
    Context,
    Group,
    Labels,
    ModelName,
    Name,
    NodeId,
    NodeIds,
    Paged,
    Request,
    by_name,
    found,
    page,
    records,
)
from subjects.nodes import NODE_COLUMNS

group = Group()


class NodeSet(Request):
    """`node_ids` restricts a query to those nodes; absent or empty means all."""

    node_ids: NodeIds = Field(default_factory=list)


# ------------------------------------------------------------ the predicates
#
# Each rule that decides whether a node `n` can take work is one named
# fragment, and every statement that applies the rule is built from it:
# the find_* operations below, and `explain` (subjects/explain.py), which
# evaluates each fragment on its own to say which rule keeps a node out. The
# fragments that take values are functions of the SQL expressions that give
# them ($n parameters or columns), never of the values themselves.

# Only healthy nodes take work (and only approved nodes are ever healthy:
# schema.sql's nodes_healthy_needs_approval).
HEALTHY = "n.status = 'healthy'"

# Agent nodes run agents, not model replicas.
BACKEND = "n.node_type = 'backend'"


def in_node_set(node_ids: str) -> str:
    """`n` is one of `node_ids` (a text[] expression), or that list is empty."""
    return f"(cardinality({node_ids}) = 0 OR n.id = ANY({node_ids}))"


def candidates(node_ids: str) -> str:
    """The nodes every placement query starts from."""
    return f"{HEALTHY} AND {BACKEND} AND {in_node_set(node_ids)}"


def vram_fits(min_bytes: str) -> str:
    """`n` has at least `min_bytes` (a bigint expression) effectively free:
    available minus what schedulers reserved within this heartbeat window."""
    return f"n.available_vram - n.reserved_vram >= {min_bytes}"


# Two rules count rows of another table per node: the rows are one fragment
# (a query of node_id), and one of two joins counts them for `n`. per_node
# looks them up node by node: for statements about some nodes, or a page of
# them, which stop early; it is also the only shape a generic plan cannot get
# wrong (a grouped join behind the paged statements' `$n IS NULL OR …`
# filters was planned as a nested loop over every node and every row: 2.6 s
# for an unpaged free_slots of 10,000 nodes, against 55 ms). every_node
# counts them for all nodes in one grouped pass: for explain, which judges
# every node (23 ms for 10,000 nodes, against 350 ms node by node).


def model_replicas(model: str) -> str:
    """The replica rows that count against a node's cap for `model` (a text
    expression): every row, whatever its state, so a load in progress keeps a
    second scale-up from overshooting."""
    return f"SELECT r.node_id FROM replicas r WHERE r.model_name = {model}"


def selector_labels(keys: str, values: str) -> str:
    """The label rows that are a pair of a selector (text[] expressions of
    its keys and values, pairwise)."""
    return f"""SELECT l.node_id FROM node_labels l
          JOIN unnest({keys}, {values}) AS s(key, value)
            ON s.key = l.key AND s.value = l.value"""


def per_node(rows: str, alias: str) -> str:
    """A join giving `<alias>.hits`: how many of `rows` are `n`'s, looked up for
    each node (by the node's index)."""
    return f"""
    LEFT JOIN LATERAL (
        SELECT count(*) AS hits FROM ({rows}) AS x WHERE x.node_id = n.id
    ) AS {alias} ON true"""


def every_node(rows: str, alias: str) -> str:
    """per_node's count in one grouped pass over `rows` (NULL for none)."""
    return f"""
    LEFT JOIN (
        SELECT x.node_id, count(*) AS hits FROM ({rows}) AS x GROUP BY x.node_id
    ) AS {alias} ON {alias}.node_id = n.id"""


# The joins' aliases: replica rows of the model, label rows of the selector.
TAKEN_AS = "taken"
MATCHED_AS = "matched"

# The replicas of the model on `n`, and whether it has a slot left for one more.
TAKEN = f"COALESCE({TAKEN_AS}.hits, 0)"
SLOT_FREE = f"{TAKEN} < n.max_replicas_per_model"


def has_labels(keys: str) -> str:
    """`n` carries every pair of the selector whose label rows were counted
    (`keys`, the same expression): an AND of pairs; an empty selector matches
    every node. A node has one value per key, so each pair matches once."""
    return f"COALESCE({MATCHED_AS}.hits, 0) = cardinality({keys})"


# The candidates of the node-set operations below, restricted by $1 (node_ids).
CANDIDATES = candidates("$1::text[]")

# Per node: does it have a loaded replica, and how many requests are in flight
# on all its replicas (Go counts every state here).
LOAD = """
    LEFT JOIN LATERAL (
        SELECT bool_or(r.state = 'loaded') AS busy, COALESCE(sum(r.in_flight), 0) AS in_flight
          FROM replicas r WHERE r.node_id = n.id
    ) AS load ON true"""


class FindVramRequest(NodeSet):
    min_bytes: ByteCount = 0


# Idle nodes (no loaded replica) first, most effectively-free VRAM first; then
# the others, least in flight first, then most effectively-free VRAM.
FIND_VRAM = f"""
    SELECT {NODE_COLUMNS} FROM nodes n {LOAD}
     WHERE {CANDIDATES} AND {vram_fits("$2")}
     ORDER BY COALESCE(load.busy, false),
              CASE WHEN load.busy THEN load.in_flight ELSE 0 END,
              n.available_vram - n.reserved_vram DESC, n.name
     LIMIT 1"""

FIND_IDLE = f"""
    SELECT {NODE_COLUMNS} FROM nodes n
     WHERE {CANDIDATES}
       AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.node_id = n.id AND r.state = 'loaded')
     ORDER BY n.available_vram DESC, n.name
     LIMIT 1"""

FIND_LEAST_LOADED = f"""
    SELECT {NODE_COLUMNS} FROM nodes n {LOAD}
     WHERE {CANDIDATES}
     ORDER BY load.in_flight, n.available_vram DESC, n.name
     LIMIT 1"""


@group.op("find_vram", FindVramRequest)
async def find_vram(ctx: Context, req: FindVramRequest) -> Any:
    """A node with at least `min_bytes` effectively-free VRAM, idle nodes first."""
    row = await ctx.db.fetchrow(FIND_VRAM, req.node_ids, req.min_bytes)
    return found(row, f"no healthy node has {req.min_bytes} bytes of free VRAM")


@group.op("find_idle", NodeSet)
async def find_idle(ctx: Context, req: NodeSet) -> Any:
    """A node with no loaded replica, most VRAM first."""
    return found(await ctx.db.fetchrow(FIND_IDLE, req.node_ids), "no idle healthy node")


@group.op("find_least_loaded", NodeSet)
async def find_least_loaded(ctx: Context, req: NodeSet) -> Any:
    """The node with the fewest requests in flight, most VRAM first on a tie."""
    return found(await ctx.db.fetchrow(FIND_LEAST_LOADED, req.node_ids), "no healthy node")


class SelectorRequest(Paged):
    selector: Labels = Field(default_factory=dict)


# A node matches when it has every pair of the selector (an AND of pairs).
FIND_SELECTOR = f"""
    SELECT {NODE_COLUMNS} FROM nodes n
    {per_node(selector_labels("$1::text[]", "$2::text[]"), MATCHED_AS)}
     WHERE {HEALTHY} AND {BACKEND} AND {has_labels("$1::text[]")}
       AND ($3::text IS NULL OR n.name > $3)
     ORDER BY n.name LIMIT $4"""


@group.op("find_selector", SelectorRequest)
async def find_selector(ctx: Context, req: SelectorRequest) -> Any:
    """Healthy backend nodes carrying every label of `selector` (empty: all of them)."""
    rows = await ctx.db.fetch(
        FIND_SELECTOR,
        list(req.selector),
        list(req.selector.values()),
        *req.cursor(Name),
        req.sql_limit(),
    )
    return page(req, records(rows), by_name, max_reply=ctx.max_reply)


class ModelOnNodes(NodeSet):
    model: ModelName


class FreeSlotsRequest(ModelOnNodes, Paged):
    pass


# $1 node_ids, $2 the model.
REPLICAS_OF_MODEL = per_node(model_replicas("$2"), TAKEN_AS)

FREE_SLOTS = f"""
    SELECT {NODE_COLUMNS} FROM nodes n {REPLICAS_OF_MODEL}
     WHERE {CANDIDATES} AND {SLOT_FREE}
       AND ($3::text IS NULL OR n.name > $3)
     ORDER BY n.name LIMIT $4"""

CAPACITY = f"""
    SELECT COALESCE(sum(GREATEST(n.max_replicas_per_model - {TAKEN}, 0)), 0)::bigint
      FROM nodes n {REPLICAS_OF_MODEL}
     WHERE {CANDIDATES}"""


@group.op("free_slots", FreeSlotsRequest)
async def free_slots(ctx: Context, req: FreeSlotsRequest) -> Any:
    """Healthy backend nodes that can host one more replica of `model`."""
    rows = await ctx.db.fetch(
        FREE_SLOTS, req.node_ids, req.model, *req.cursor(Name), req.sql_limit()
    )
    return page(req, records(rows), by_name, max_reply=ctx.max_reply)


@group.op("capacity", ModelOnNodes)
async def capacity(ctx: Context, req: ModelOnNodes) -> Any:
    """How many more replicas of `model` the candidate nodes can host in all."""
    return {"capacity": await ctx.db.fetchval(CAPACITY, req.node_ids, req.model)}


class VramRequest(Request):
    node_id: NodeId
    bytes: ByteCount


# The admission check is the WHERE clause of one UPDATE, so concurrent
# reservations cannot over-commit: each sees the one before it.
RESERVE_VRAM = """
    WITH up AS (
        UPDATE nodes SET reserved_vram = reserved_vram + $2::bigint
         WHERE id = $1 AND ($2::bigint = 0 OR available_vram - reserved_vram >= $2::bigint)
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM up) AS reserved,
           EXISTS (SELECT 1 FROM nodes WHERE id = $1) AS found"""

# Never below zero: a release after a heartbeat reset the reservation, or a
# duplicate release, leaves nothing reserved rather than a negative count.
RELEASE_VRAM = """
    UPDATE nodes SET reserved_vram = GREATEST(reserved_vram - $2::bigint, 0)
     WHERE id = $1 RETURNING 1"""


@group.op("reserve_vram", VramRequest)
async def reserve_vram(ctx: Context, req: VramRequest) -> Any:
    """Reserve VRAM on a node for a load about to start (409 when it does not fit)."""
    row = await ctx.db.fetchrow(RESERVE_VRAM, req.node_id, req.bytes)
    assert row is not None
    if not row["found"]:
        raise NotFound(f"node {req.node_id} not found")
    if not row["reserved"]:
        raise Conflict(f"node {req.node_id} has less than {req.bytes} bytes of free VRAM")
    return OK


@group.op("release_vram", VramRequest)
async def release_vram(ctx: Context, req: VramRequest) -> Any:
    """Give back a reservation (for a load that failed)."""
    if await ctx.db.fetchval(RELEASE_VRAM, req.node_id, req.bytes) is None:
        raise NotFound(f"node {req.node_id} not found")
    return OK
