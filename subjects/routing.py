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
Releases (`inflight_dec` by replica) of a model being picked go in that same
statement, counted before the picks: a router's release and its next pick
write the same rows, and apart they would wait on each other's row locks and
each on its own commit. With no pick running or waiting, a release goes
first in that same line, so the next picks wait for it rather than for its
row locks. Only while picks of other models alone are under way does a
release go out at once, in a statement of its own: waiting for picks it
shares no row with would only add their time to its own (with 500 replicas
a model a pick statement takes ~10 ms, and riding with them tripled
inflight_dec's latency in the soak).

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

import time
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
NODE_KEYS = [f"node__{c}" for c in NODE_FIELDS]

# Most picks and releases one statement carries; more waiting go in the next.
MAX_BATCH = 128


class Preference(Request):
    node_id: NodeId
    replica_index: ReplicaIndex = 0


# A lease's duration in seconds: more than nothing, at most a day.
LeaseSeconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
LeaseId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class FindLockRequest(Request):
    model: ModelName
    node_ids: NodeIds = Field(default_factory=list)
    prefer: Preference | None = None
    lease_s: LeaseSeconds | None = None


def new_lease_id() -> str:
    return uuid.uuid4().hex


CANDIDATES = """
    replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
       AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))"""

# Several picks at once, of one model or of many, and the releases (inflight_dec
# by replica) that arrived meanwhile. $1 the model of each pick, $2 node_ids,
# $3/$4 each pick's lease id and duration (NULL: no lease); $5/$6/$7 each
# release's node, model and replica index.
#
# One statement for both halves of a request's life: they write the same rows,
# so apart they would queue on each other's locks, and each would wait for its
# own commit. Releases count first: a replica with requests just ended is as
# loaded as it is after them.
#
# Slot j of a replica is its (j+1)-th pick in this batch, at load in_flight + j;
# taking each model's k lowest slots is what k picks one after the other would
# do (a replica just picked is the most recently used, hence `j` before
# last_used). A model's slots, in that order, are an array its i-th pick
# indexes: joining picks to ranked slots instead cost time in the square of the
# batch (0.8 of 1.6 ms for 32 picks of one model). Only a model's k best
# replicas can receive a pick, so only they and the released ones are locked,
# in id order: two daemons never wait for each other in a circle. They are
# named to the lock as an array of ids, computed before any row is locked: as
# `r.id IN (SELECT ... UNION ALL ...)`, a join PostgreSQL rechecks when a row
# changed under it, the lock dropped replicas `best` had chosen (a pick got
# 404 with its model's replicas loaded and idle) while other statements wrote
# them, on a table whose rows had changed since it was last analysed.
#
# One row per replica picked, with its picks' positions (`ords`: the first took
# slot 0, the next slot 1, and so on). Sixteen picks of a model with four
# replicas send its node and replica columns four times, not sixteen, which
# PostgreSQL, asyncpg and the replies all pay for.
PICK_BATCH = f"""
    WITH item AS (
        SELECT t.ord, t.model, t.lease_id, t.lease_s,
               row_number() OVER (PARTITION BY t.model ORDER BY t.ord) AS seq
          FROM unnest($1::text[], $3::text[], $4::float8[])
               WITH ORDINALITY AS t(model, lease_id, lease_s, ord)
    ),
    want AS (SELECT model, count(*)::int AS k FROM item GROUP BY model),
    ended AS (
        SELECT r.id, count(*)::int AS n
          FROM unnest($5::text[], $6::text[], $7::int[]) AS t(node_id, model, idx)
          JOIN replicas r ON r.node_id = t.node_id AND r.model_name = t.model
                         AND r.replica_index = t.idx
         GROUP BY r.id
    ),
    best AS (
        SELECT b.id FROM want w CROSS JOIN LATERAL (
            SELECT r.id FROM replicas r JOIN nodes n ON n.id = r.node_id
              LEFT JOIN ended e ON e.id = r.id
             WHERE r.model_name = w.model AND r.state = 'loaded' AND n.status = 'healthy'
               AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))
             ORDER BY GREATEST(r.in_flight - coalesce(e.n, 0), 0), r.last_used,
                      n.available_vram DESC, r.id
             LIMIT w.k
        ) AS b
    ),
    locked AS (
        SELECT r.id, r.model_name, r.in_flight, r.last_used, r.state,
               n.status, n.available_vram
          FROM replicas r JOIN nodes n ON n.id = r.node_id
         WHERE r.id = ANY (ARRAY(SELECT id FROM best UNION ALL SELECT id FROM ended))
         ORDER BY r.id
           FOR UPDATE OF r
    ),
    cand AS (
        SELECT l.id, l.model_name, GREATEST(l.in_flight - coalesce(e.n, 0), 0) AS in_flight,
               l.last_used, l.available_vram
          FROM locked l LEFT JOIN ended e ON e.id = l.id
         WHERE l.id IN (SELECT id FROM best) AND l.state = 'loaded' AND l.status = 'healthy'
    ),
    slot AS (
        SELECT c.model_name, array_agg(c.id ORDER BY c.in_flight + j, j, c.last_used,
                                                c.available_vram DESC, c.id) AS ids
          FROM cand c JOIN want w ON w.model = c.model_name
         CROSS JOIN LATERAL generate_series(0, w.k - 1) AS j
         GROUP BY c.model_name
    ),
    chosen AS (
        SELECT s.ids[i.seq::int] AS id, i.ord, i.lease_id, i.lease_s
          FROM item i JOIN slot s ON s.model_name = i.model
    ),
    picks AS (SELECT id, count(*)::int AS n FROM chosen GROUP BY id),
    up AS (
        UPDATE replicas r
           SET in_flight = GREATEST(r.in_flight - coalesce(e.n, 0), 0) + coalesce(p.n, 0),
               last_used = CASE WHEN p.n IS NULL THEN r.last_used ELSE now() END
          FROM locked l LEFT JOIN picks p ON p.id = l.id LEFT JOIN ended e ON e.id = l.id
         WHERE r.id = l.id AND (p.n IS NOT NULL OR (e.n IS NOT NULL AND r.in_flight > 0))
        RETURNING r.*, coalesce(p.n, 0) AS picks
    ),
    leased AS (
        INSERT INTO leases (id, replica_id, node_id, model_name, replica_index, expires_at)
        SELECT chosen.lease_id, up.id, up.node_id, up.model_name, up.replica_index,
               now() + make_interval(secs => chosen.lease_s)
          FROM chosen JOIN up ON up.id = chosen.id
         WHERE chosen.lease_id IS NOT NULL
    )
    SELECT {UP_REPLICA}, up.picks, {NODE_AS}, g.ords
      FROM (SELECT id, array_agg(ord ORDER BY ord) AS ords FROM chosen GROUP BY id) AS g
      JOIN up ON up.id = g.id JOIN nodes n ON n.id = up.node_id"""

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
        RETURNING r.*
    ),
    leased AS (
        INSERT INTO leases (id, replica_id, node_id, model_name, replica_index, expires_at)
        SELECT $5::text, up.id, up.node_id, up.model_name, up.replica_index,
               now() + make_interval(secs => $6::float8)
          FROM up WHERE $5::text IS NOT NULL
    )
    SELECT {UP_REPLICA}, $5::text AS lease_id, {NODE_AS}
      FROM up JOIN nodes n ON n.id = up.node_id"""


def reply(row: Any) -> dict[str, Any]:
    """{"node", "replica"} from the one-pick statement's row.

    `replica.lease_id` is there only when the pick took a lease."""
    out = record(row)
    assert out is not None
    node = {k.removeprefix("node__"): out.pop(k) for k in NODE_KEYS}
    lease_id = out.pop("lease_id")
    if lease_id is not None:
        out["lease_id"] = lease_id
    return {"node": node, "replica": out}


@dataclass(frozen=True, slots=True)
class Pick:
    """One findlock request in a batch."""

    model: str
    lease_s: float | None


@dataclass(frozen=True, slots=True)
class Release:
    """One inflight_dec by replica in a batch."""

    node_id: str
    model: str
    replica_index: int


Placed = dict[str, Any] | None  # a pick's reply; None for a release, or no replica


class Batches:
    """findlock's and inflight_dec's writes, batched: one coalescer per node_ids
    set, picks of any models in each. A release goes to the coalescer of no set
    (the routers' usual findlock), so that a router's release and the next pick
    go out in one statement (PICK_BATCH), unless picks of other models alone
    are running or waiting there: then it has a coalescer of its own.

    A node set's coalescer lives only while it has writes running or waiting:
    it is made by the first of a quiet period and dropped as soon as it is
    idle again. Clients choose the sets, so keeping every set ever seen would
    let one that sends new sets grow the daemon without end; this way the map
    holds at most as many sets as requests in flight (REGISTRY_MAX_CONCURRENCY).
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._by_nodes: dict[tuple[str, ...], Coalescer[Pick | Release, Placed]] = {}
        # Picks of no node set running or waiting, by model: a model is here
        # only while it has some, so at most as many as requests in flight.
        self._picking: dict[str, int] = {}
        self._releases: Coalescer[Pick | Release, Placed] = Coalescer(
            lambda items: self._write([], items), name="inflight_dec", max_batch=MAX_BATCH
        )
        self.pick_stats = BatchStats()  # every node set's, together
        self.release_stats = BatchStats()

    async def pick(self, model: str, node_ids: Sequence[str], lease_s: float | None) -> Placed:
        key = tuple(sorted(set(node_ids)))
        if key:
            return await self._batch(key).submit(Pick(model, lease_s))
        self._picking[model] = self._picking.get(model, 0) + 1
        try:
            return await self._batch(key).submit(Pick(model, lease_s))
        finally:
            left = self._picking[model] - 1
            if left:
                self._picking[model] = left
            else:
                del self._picking[model]

    async def release(self, node_id: str, model: str, replica_index: int) -> None:
        ended = Release(node_id, model, replica_index)
        if self._picking and model not in self._picking:
            await self._releases.submit(ended)  # picks of other models only: not behind them
        else:
            await self._batch(()).submit(ended)  # with the picks of its model, or before any

    def _batch(self, key: tuple[str, ...]) -> Coalescer[Pick | Release, Placed]:
        batch = self._by_nodes.get(key)
        if batch is not None:
            return batch

        def forget() -> None:
            if self._by_nodes.get(key) is batch:
                del self._by_nodes[key]

        batch = self._by_nodes[key] = Coalescer(
            lambda items: self._write(list(key), items),
            name="findlock",
            max_batch=MAX_BATCH,
            on_idle=forget,
        )
        return batch

    def __len__(self) -> int:
        """Node sets with writes in flight."""
        return len(self._by_nodes)

    @property
    def models_picking(self) -> int:
        """Models with picks of no node set running or waiting."""
        return len(self._picking)

    async def _write(self, node_ids: list[str], items: list[Pick | Release]) -> list[Placed]:
        picks = [i for i in items if isinstance(i, Pick)]
        releases = [i for i in items if isinstance(i, Release)]
        started = time.perf_counter_ns()
        try:
            placed = iter(await self._place(node_ids, picks, releases))
        finally:
            took = time.perf_counter_ns() - started
            if picks:
                self.pick_stats.note(len(picks), took)
            if releases:
                self.release_stats.note(len(releases), took)
        return [next(placed) if isinstance(i, Pick) else None for i in items]

    async def _place(
        self, node_ids: list[str], picks: list[Pick], releases: list[Release]
    ) -> list[Placed]:
        if not picks:
            await release(self._db, releases)
            return []
        lease_ids = [None if p.lease_s is None else new_lease_id() for p in picks]
        if len(picks) == 1 and not releases:
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
            PICK_BATCH,
            [p.model for p in picks],
            node_ids,
            lease_ids,
            [p.lease_s for p in picks],
            [r.node_id for r in releases],
            [r.model for r in releases],
            [r.replica_index for r in releases],
        )
        placed: list[Placed] = [None] * len(picks)
        for row in rows:
            out = record(row)
            assert out is not None
            node = {k.removeprefix("node__"): out.pop(k) for k in NODE_KEYS}
            ords, count = out.pop("ords"), out.pop("picks")
            before = out["in_flight"] - count  # after the releases, before these picks
            for j, ord_ in enumerate(ords):
                replica = out | {"in_flight": before + j + 1}  # as its own pick left it
                if lease_ids[ord_ - 1] is not None:
                    replica["lease_id"] = lease_ids[ord_ - 1]
                # The node's dict is shared by the replies of one replica's picks:
                # they are only encoded.
                placed[ord_ - 1] = {"node": node, "replica": replica}
        return placed


@group.op("findlock", FindLockRequest, data=lambda ctx: ctx.batches.pick_stats.as_dict())
async def findlock(ctx: Context, req: FindLockRequest) -> Any:
    """Pick the best loaded replica of a model and count one request in flight on it."""
    if req.prefer is None:
        picked = await ctx.batches.pick(req.model, req.node_ids, req.lease_s)
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
# Releases that arrive together with no pick to ride with, as one statement:
# per replica the count of requests that ended, never below zero; rows locked
# in id order, picked by an array of ids (see PICK_BATCH's `locked`).
INFLIGHT_DEC = """
    WITH ended AS (
        SELECT r.id, count(*)::int AS n
          FROM unnest($1::text[], $2::text[], $3::int[]) AS t(node_id, model, idx)
          JOIN replicas r ON r.node_id = t.node_id AND r.model_name = t.model
                         AND r.replica_index = t.idx
         GROUP BY r.id
    ),
    locked AS (
        SELECT r.id FROM replicas r
         WHERE r.id = ANY (ARRAY(SELECT id FROM ended)) AND r.in_flight > 0
         ORDER BY r.id
           FOR UPDATE
    )
    UPDATE replicas r SET in_flight = GREATEST(r.in_flight - e.n, 0)
      FROM locked JOIN ended e ON e.id = locked.id
     WHERE r.id = locked.id"""


# One decrement alone (a quiet router): the same guard, without the arrays,
# which PostgreSQL runs in 125 us where the batch statement of one takes 160.
INFLIGHT_DEC_ONE = """
    UPDATE replicas SET in_flight = in_flight - 1
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3 AND in_flight > 0"""


async def release(db: Database, ended: list[Release]) -> None:
    if len(ended) == 1:
        one = ended[0]
        await db.execute(INFLIGHT_DEC_ONE, one.node_id, one.model, one.replica_index)
        return
    await db.execute(
        INFLIGHT_DEC,
        [r.node_id for r in ended],
        [r.model for r in ended],
        [r.replica_index for r in ended],
    )


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


@group.op("inflight_dec", InflightDecRequest, data=lambda ctx: ctx.batches.release_stats.as_dict())
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
    await ctx.batches.release(req.node_id, req.model, req.replica_index)
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
