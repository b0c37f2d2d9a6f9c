"""The router's hot path: pick and lock a replica, and give the lock back.

Every inference request in the cluster calls `findlock` and later
`inflight_dec`. The pick policy is LocalAI's (reference/replicapicker.go):
least in flight, then least recently used, then the node with most free VRAM;
only loaded replicas on healthy nodes.

Concurrent picks of one model are placed together. A plain
`SELECT … FOR UPDATE LIMIT 1` per request makes every concurrent pick queue on
the same best row and then take it (a waiter re-checks its WHERE clause but
does not re-sort), so 64 simultaneous requests pile onto one replica. Instead,
the requests for one model that arrive while a pick for it is running wait
for it to finish and are then placed by one statement, as if one after the
other: k picks fill the replicas' in-flight counts level, like water. A
single request is one statement as before; a burst costs one statement too.

Leases (an addition to the Go registry): a findlock with `lease_s` also records
a lease on its unit in flight, in the same statement, so a router that dies
mid-request cannot pin the replica for ever. `inflight_dec` with the lease id
gives the unit back once; `lease_renew` extends it; daemon/sweep.py releases
the expired ones. Every statement that touches a lease and a replica locks the
replica first, as the cascade from a removed replica does, so a release, an
expiry and a removal of the same replica wait for each other instead of
deadlocking.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from infra.batching import BatchStats, Coalescer
from infra.db import Database
from infra.errors import BadRequest, NotFound
from subjects.base import (
    OK,
    Context,
    Group,
    ModelName,
    NodeId,
    NodeIds,
    ReplicaIndex,
    Request,
    record,
)
from subjects.nodes import NODE_COLUMNS
from subjects.replicas import REPLICA_COLUMNS, ReplicaRef

group = Group()

# The node's columns, renamed so they can travel in one row with the replica's.
NODE_FIELDS = [c.strip().removeprefix("n.") for c in NODE_COLUMNS.split(",")]
NODE_AS = ", ".join(f"n.{c} AS node__{c}" for c in NODE_FIELDS)
REPLICA_FIELDS = [c.strip().removeprefix("r.") for c in REPLICA_COLUMNS.split(",")]
UP_REPLICA = ", ".join(f"up.{c}" for c in REPLICA_FIELDS)

# Most picks one statement places; more waiting requests go in the next one.
MAX_BATCH = 64


class Preference(Request):
    node_id: NodeId
    replica_index: ReplicaIndex = 0


# A lease's duration in seconds: more than nothing, at most a day.
LeaseSeconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
LeaseId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class FindLockRequest(Request):
    model: ModelName
    node_ids: NodeIds = []
    prefer: Preference | None = None
    lease_s: LeaseSeconds | None = None


def new_lease_id() -> str:
    return uuid.uuid4().hex


CANDIDATES = """
    replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
       AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))"""

# Several picks at once, of one model or of many. $1 the model of each pick,
# $2 node_ids, $3/$4 each pick's lease id and duration (NULL: no lease).
# Slot j of a replica is its (j+1)-th pick in this batch, at load in_flight + j;
# taking each model's k lowest slots is what k picks one after the other would
# do (a replica just picked is the most recently used, hence `j` before
# last_used). Only a model's k best replicas can receive a pick, so only they
# are locked, in id order: two daemons never wait for each other in a circle.
PICK_BATCH = f"""
    WITH item AS (
        SELECT t.ord, t.model, t.lease_id, t.lease_s,
               row_number() OVER (PARTITION BY t.model ORDER BY t.ord) AS seq
          FROM unnest($1::text[], $3::text[], $4::float8[])
               WITH ORDINALITY AS t(model, lease_id, lease_s, ord)
    ),
    want AS (SELECT model, count(*)::int AS k FROM item GROUP BY model),
    best AS (
        SELECT b.id FROM want w CROSS JOIN LATERAL (
            SELECT r.id FROM replicas r JOIN nodes n ON n.id = r.node_id
             WHERE r.model_name = w.model AND r.state = 'loaded' AND n.status = 'healthy'
               AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))
             ORDER BY r.in_flight, r.last_used, n.available_vram DESC, r.id
             LIMIT w.k
        ) AS b
    ),
    cand AS (
        SELECT r.id, r.model_name, r.in_flight, r.last_used, n.available_vram
          FROM replicas r JOIN nodes n ON n.id = r.node_id
         WHERE r.id IN (SELECT id FROM best) AND r.state = 'loaded' AND n.status = 'healthy'
         ORDER BY r.id
           FOR UPDATE OF r
    ),
    slot AS (
        SELECT c.id, c.model_name, j, row_number() OVER (
                   PARTITION BY c.model_name
                   ORDER BY c.in_flight + j, j, c.last_used, c.available_vram DESC, c.id) AS seq
          FROM cand c JOIN want w ON w.model = c.model_name
         CROSS JOIN LATERAL generate_series(0, w.k - 1) AS j
    ),
    chosen AS (
        SELECT s.id, s.j, i.ord, i.lease_id, i.lease_s
          FROM slot s JOIN item i ON i.model = s.model_name AND i.seq = s.seq
    ),
    picks AS (SELECT id, count(*)::int AS n FROM chosen GROUP BY id),
    up AS (
        UPDATE replicas r SET in_flight = r.in_flight + picks.n, last_used = now()
          FROM picks WHERE r.id = picks.id
        RETURNING r.*, picks.n AS picks
    ),
    leased AS (
        INSERT INTO leases (id, replica_id, node_id, model_name, replica_index, expires_at)
        SELECT chosen.lease_id, up.id, up.node_id, up.model_name, up.replica_index,
               now() + make_interval(secs => chosen.lease_s)
          FROM chosen JOIN up ON up.id = chosen.id
         WHERE chosen.lease_id IS NOT NULL
    )
    SELECT chosen.ord, {UP_REPLICA}, up.picks, chosen.j, chosen.lease_id, {NODE_AS}
      FROM chosen JOIN up ON up.id = chosen.id JOIN nodes n ON n.id = up.node_id
     ORDER BY chosen.ord"""

# $1 model, $2 node_ids, $3/$4 the preferred (node, replica): that exact
# replica if it is a candidate, else the default order; $5/$6 the lease id
# and duration (NULL: no lease).
PICK_PREFERRED = f"""
    WITH pick AS (
        SELECT r.id FROM {CANDIDATES}
         ORDER BY (r.node_id = $3 AND r.replica_index = $4) DESC,
                  r.in_flight, r.last_used, n.available_vram DESC, r.id
         LIMIT 1
           FOR UPDATE OF r
    ),
    up AS (
        UPDATE replicas r SET in_flight = r.in_flight + 1, last_used = now()
          FROM pick WHERE r.id = pick.id
        RETURNING r.*, 1 AS picks
    ),
    leased AS (
        INSERT INTO leases (id, replica_id, node_id, model_name, replica_index, expires_at)
        SELECT $5::text, up.id, up.node_id, up.model_name, up.replica_index,
               now() + make_interval(secs => $6::float8)
          FROM up WHERE $5::text IS NOT NULL
    )
    SELECT {UP_REPLICA}, up.picks, 0 AS j, $5::text AS lease_id, {NODE_AS}
      FROM up JOIN nodes n ON n.id = up.node_id"""


def reply(row: Any) -> dict[str, Any]:
    """{"node", "replica"} from one chosen slot, the replica as that pick left it.

    `replica.lease_id` is there only when the pick took a lease."""
    out = record(row)
    assert out is not None
    node = {k.removeprefix("node__"): out.pop(k) for k in list(out) if k.startswith("node__")}
    out.pop("ord", None)
    picks, j, lease_id = out.pop("picks"), out.pop("j"), out.pop("lease_id")
    out["in_flight"] += j + 1 - picks
    if lease_id is not None:
        out["lease_id"] = lease_id
    return {"node": node, "replica": out}


@dataclass(frozen=True, slots=True)
class Pick:
    """One findlock request in a batch."""

    model: str
    lease_s: float | None


class Batches:
    """The routing operations' batches, one set per daemon."""

    def __init__(self, db: Database) -> None:
        self.picks = Picks(db)
        self.decrements: Coalescer[tuple[str, str, int], None] = Coalescer(
            lambda batch: decrement(db, batch), name="inflight_dec", max_batch=1024
        )


class Picks:
    """findlock's batches: one per node_ids set, picks of any models in each.

    A node set's batcher lives only while it has picks running or waiting: it
    is made by the first pick of a quiet period and dropped as soon as it is
    idle again. Clients choose the sets, so keeping every set ever seen would
    let one that sends new sets grow the daemon without end; this way the map
    holds at most as many sets as requests in flight (REGISTRY_MAX_CONCURRENCY).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._by_nodes: dict[tuple[str, ...], Coalescer[Pick, dict[str, Any] | None]] = {}
        self.stats = BatchStats()  # every node set's, together

    async def pick(
        self, model: str, node_ids: Sequence[str], lease_s: float | None
    ) -> dict[str, Any] | None:
        key = tuple(sorted(set(node_ids)))
        batch = self._by_nodes.get(key)
        if batch is None:
            batch = self._by_nodes[key] = self._batch(key)
        return await batch.submit(Pick(model, lease_s))

    def _batch(self, key: tuple[str, ...]) -> Coalescer[Pick, dict[str, Any] | None]:
        def forget() -> None:
            if self._by_nodes.get(key) is batch:
                del self._by_nodes[key]

        batch: Coalescer[Pick, dict[str, Any] | None] = Coalescer(
            lambda picks: self._place(list(key), picks),
            name="findlock",
            max_batch=MAX_BATCH,
            on_idle=forget,
            stats=self.stats,
        )
        return batch

    def __len__(self) -> int:
        """Node sets with picks in flight."""
        return len(self._by_nodes)

    async def _place(self, node_ids: list[str], picks: list[Pick]) -> list[dict[str, Any] | None]:
        lease_ids = [None if p.lease_s is None else new_lease_id() for p in picks]
        if len(picks) == 1:
            # Alone: the one-pick statement, which PostgreSQL plans in a
            # fraction of the time the batch statement takes.
            row = await self._db.fetchrow(
                PICK_PREFERRED,
                picks[0].model,
                node_ids,
                None,
                None,
                lease_ids[0],
                picks[0].lease_s,
            )
            return [None if row is None else reply(row)]
        rows = await self._db.fetch(
            PICK_BATCH, [p.model for p in picks], node_ids, lease_ids, [p.lease_s for p in picks]
        )
        placed: list[dict[str, Any] | None] = [None] * len(picks)
        for row in rows:
            placed[row["ord"] - 1] = reply(row)
        return placed


@group.op("findlock", FindLockRequest, data=lambda ctx: ctx.batches.picks.stats.as_dict())
async def findlock(ctx: Context, req: FindLockRequest) -> Any:
    """Pick the best loaded replica of a model and count one request in flight on it."""
    if req.prefer is None:
        picks = ctx.batches.picks
        picked = await picks.pick(req.model, req.node_ids, req.lease_s)
    else:
        row = await ctx.db.fetchrow(
            PICK_PREFERRED,
            req.model,
            req.node_ids,
            req.prefer.node_id,
            req.prefer.replica_index,
            None if req.lease_s is None else new_lease_id(),
            req.lease_s,
        )
        picked = None if row is None else reply(row)
    if picked is None:
        raise NotFound(f"no loaded replica of {req.model!r} on a healthy node")
    return picked


INFLIGHT_INC = """
    UPDATE replicas SET in_flight = in_flight + 1, last_used = now()
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3
    RETURNING 1"""

# Guarded by in_flight > 0: a second decrement of the same request cannot
# drive the counter negative (the schema's check would refuse it anyway).
# Decrements that arrive together, as one statement: per replica the count of
# requests that ended, never below zero; rows locked in id order (see PICK_BATCH).
INFLIGHT_DEC = """
    WITH ended AS (
        SELECT node_id, model, idx, count(*)::int AS n
          FROM unnest($1::text[], $2::text[], $3::int[]) AS t(node_id, model, idx)
         GROUP BY node_id, model, idx
    ),
    locked AS (
        SELECT r.id, ended.n FROM replicas r
          JOIN ended ON r.node_id = ended.node_id AND r.model_name = ended.model
                    AND r.replica_index = ended.idx
         WHERE r.in_flight > 0
         ORDER BY r.id
           FOR UPDATE OF r
    )
    UPDATE replicas r SET in_flight = GREATEST(r.in_flight - locked.n, 0)
      FROM locked WHERE r.id = locked.id"""


# One decrement alone (a quiet router): the same guard, without the arrays,
# which PostgreSQL runs in 125 us where the batch statement of one takes 160.
INFLIGHT_DEC_ONE = """
    UPDATE replicas SET in_flight = in_flight - 1
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3 AND in_flight > 0"""


async def decrement(db: Database, ended: list[tuple[str, str, int]]) -> list[None]:
    if len(ended) == 1:
        await db.execute(INFLIGHT_DEC_ONE, *ended[0])
        return [None]
    nodes, models, indexes = (list(column) for column in zip(*ended, strict=True))
    await db.execute(INFLIGHT_DEC, nodes, models, indexes)
    return [None] * len(ended)


@group.op("inflight_inc", ReplicaRef)
async def inflight_inc(ctx: Context, req: ReplicaRef) -> Any:
    """Count one more request in flight on a replica."""
    if await ctx.db.fetchval(INFLIGHT_INC, req.node_id, req.model, req.replica_index) is None:
        raise NotFound(f"replica {req.replica_index} of {req.model!r} on {req.node_id} not found")
    return OK


# Gives a lease's unit back, once: the replica row is locked first (as every
# lease statement does), then the lease row is deleted, and only a deletion
# that happened decrements. A second release finds no row, and a concurrent
# one waits for the replica, then finds the lease gone and does nothing.
RELEASE_LEASE = """
    WITH target AS MATERIALIZED (
        SELECT r.id FROM leases l JOIN replicas r ON r.id = l.replica_id
         WHERE l.id = $1
           FOR NO KEY UPDATE OF r
    ),
    gone AS (
        DELETE FROM leases l USING target
         WHERE l.id = $1 AND l.replica_id = target.id
        RETURNING l.replica_id
    )
    UPDATE replicas r SET in_flight = r.in_flight - 1
      FROM gone WHERE r.id = gone.replica_id AND r.in_flight > 0"""


class InflightDecRequest(Request):
    """Either a replica (node_id, model, replica_index) or a lease (lease_id)."""

    lease_id: LeaseId | None = None
    node_id: NodeId | None = None
    model: ModelName | None = None
    replica_index: ReplicaIndex = 0


@group.op(
    "inflight_dec", InflightDecRequest, data=lambda ctx: ctx.batches.decrements.stats.as_dict()
)
async def inflight_dec(ctx: Context, req: InflightDecRequest) -> Any:
    """A request on a replica finished, by replica or by lease (never below zero)."""
    if req.lease_id is not None:
        await ctx.db.execute(RELEASE_LEASE, req.lease_id)
        return OK
    if req.node_id is None:
        missing = "lease_id" if req.model is None else "node_id"
        raise BadRequest(
            f"missing required field '{missing}': give 'lease_id', "
            "or 'node_id', 'model' and 'replica_index'"
        )
    if req.model is None:
        raise BadRequest("missing required field 'model'")
    await ctx.batches.decrements.submit((req.node_id, req.model, req.replica_index))
    return OK


class LeaseRenewRequest(Request):
    lease_id: LeaseId
    lease_s: LeaseSeconds


# An expired lease cannot be renewed, even before the sweep has released it:
# `expires_at >= now()` here is the exact complement of the sweep's test.
LEASE_RENEW = """
    UPDATE leases SET expires_at = now() + make_interval(secs => $2)
     WHERE id = $1 AND expires_at >= now()
    RETURNING expires_at"""


@group.op("lease_renew", LeaseRenewRequest)
async def lease_renew(ctx: Context, req: LeaseRenewRequest) -> Any:
    """Extend a lease on a unit in flight to `lease_s` seconds from now."""
    expires_at = await ctx.db.fetchval(LEASE_RENEW, req.lease_id, req.lease_s)
    if expires_at is None:
        raise NotFound(f"lease {req.lease_id} not found: released or expired")
    return {"expires_at": expires_at}


# Each expired lease is released once: its replica is locked first (as every
# lease statement does, so this cannot deadlock with a release or a removal;
# replicas locked by someone else wait for the next round), the lease row is
# deleted, and each deleted lease takes one unit off its replica, never below
# zero. A lease renewed meanwhile no longer matches once its row is re-read.
EXPIRE_LEASES = """
    WITH due AS MATERIALIZED (
        SELECT r.id FROM replicas r
         WHERE r.id IN (SELECT replica_id FROM leases WHERE expires_at < now())
         ORDER BY r.id
           FOR NO KEY UPDATE OF r SKIP LOCKED
    ),
    gone AS (
        DELETE FROM leases l USING due
         WHERE l.replica_id = due.id AND l.expires_at < now()
        RETURNING l.replica_id
    ),
    per_replica AS (
        SELECT replica_id, count(*)::int AS n FROM gone GROUP BY replica_id
    ),
    up AS (
        UPDATE replicas r SET in_flight = greatest(r.in_flight - per_replica.n, 0)
          FROM per_replica WHERE r.id = per_replica.replica_id
    )
    SELECT count(*)::int FROM gone"""


async def expire_leases(db: Database) -> int:
    """Release every expired lease once (the sweep calls this each round): how many."""
    released: int = await db.fetchval(EXPIRE_LEASES)
    return released
