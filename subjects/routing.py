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

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from daemon.db import Database
from daemon.errors import BadRequest, NotFound
from subjects.base import (
    OK,
    Context,
    Group,
    ModelName,
    NodeId,
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
    node_ids: Annotated[list[NodeId], Field(max_length=10_000)] = []
    prefer: Preference | None = None
    lease_s: LeaseSeconds | None = None


def new_lease_id() -> str:
    return uuid.uuid4().hex


CANDIDATES = """
    replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
       AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))"""

# $1 model, $2 node_ids, $3 how many picks (k), $4/$5 per pick its lease id
# and duration (NULL elements, or NULL arrays, for picks without a lease).
# Slot j of a replica is its (j+1)-th pick in this batch, at load in_flight + j;
# taking the k lowest slots is what k picks one after the other would do (a
# replica just picked is the most recently used, hence `j` before last_used).
# Only the k best replicas can receive a pick, so only they are locked.
# The seq-th pick of the batch takes the seq-th lease id.
PICK_MANY = f"""
    WITH best AS (
        SELECT r.id FROM {CANDIDATES}
         ORDER BY r.in_flight, r.last_used, n.available_vram DESC, r.id
         LIMIT $3
    ),
    cand AS (
        -- Locked in id order, so two daemons placing picks of one model never
        -- wait for each other in a circle; rechecked once locked.
        SELECT r.id, r.in_flight, r.last_used, n.available_vram
          FROM {CANDIDATES} AND r.id IN (SELECT id FROM best)
         ORDER BY r.id
           FOR UPDATE OF r
    ),
    slot AS (
        SELECT c.id, j, row_number() OVER (
                   ORDER BY c.in_flight + j, j, c.last_used, c.available_vram DESC, c.id) AS seq
          FROM cand c, generate_series(0, $3 - 1) AS j
    ),
    chosen AS (SELECT id, j, seq FROM slot WHERE seq <= $3),
    picks AS (SELECT id, count(*)::int AS n FROM chosen GROUP BY id),
    up AS (
        UPDATE replicas r SET in_flight = r.in_flight + picks.n, last_used = now()
          FROM picks WHERE r.id = picks.id
        RETURNING r.*, picks.n AS picks
    ),
    leased AS (
        INSERT INTO leases (id, replica_id, node_id, model_name, replica_index, expires_at)
        SELECT ($4::text[])[chosen.seq::int], up.id, up.node_id, up.model_name,
               up.replica_index, now() + make_interval(secs => ($5::float8[])[chosen.seq::int])
          FROM chosen JOIN up ON up.id = chosen.id
         WHERE ($4::text[])[chosen.seq::int] IS NOT NULL
    )
    SELECT {UP_REPLICA}, up.picks, chosen.j, ($4::text[])[chosen.seq::int] AS lease_id, {NODE_AS}
      FROM chosen JOIN up ON up.id = chosen.id JOIN nodes n ON n.id = up.node_id
     ORDER BY chosen.seq"""

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
    picks, j, lease_id = out.pop("picks"), out.pop("j"), out.pop("lease_id")
    out["in_flight"] += j + 1 - picks
    if lease_id is not None:
        out["lease_id"] = lease_id
    return {"node": node, "replica": out}


Key = tuple[str, tuple[str, ...]]


@dataclass(slots=True)
class Waiter:
    """One findlock request in a batch: its future and the lease it wants."""

    future: asyncio.Future[dict[str, Any] | None]
    lease_s: float | None


def lease_arrays(batch: Sequence[Waiter]) -> tuple[list[str | None] | None, list[Any] | None]:
    """PICK_MANY's per-pick lease ids and durations; NULLs when nobody wants one."""
    if all(w.lease_s is None for w in batch):
        return None, None
    ids = [None if w.lease_s is None else new_lease_id() for w in batch]
    return ids, [w.lease_s for w in batch]


class Batches:
    """Per (model, node_ids): requests waiting for the pick under way to finish.

    Picks with and without a lease share a batch: each pick carries its own."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: dict[Key, list[Waiter]] = {}
        self._runners: set[asyncio.Task[None]] = set()

    async def pick(
        self, model: str, node_ids: Sequence[str], lease_s: float | None = None
    ) -> dict[str, Any] | None:
        key = (model, tuple(sorted(set(node_ids))))
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(future, lease_s)
        queue = self._waiting.get(key)
        if queue is not None:
            queue.append(waiter)  # a pick is under way: ours goes in the next batch
            return await future
        # Nothing under way: place ours now, in this task (no hand-over to
        # wait for), and leave whoever arrives meanwhile to a runner.
        self._waiting[key] = [waiter]
        try:
            await self._place(key)
        finally:
            if self._waiting[key]:
                runner = asyncio.create_task(self._run(key), name=f"findlock:{model}")
                self._runners.add(runner)
                runner.add_done_callback(self._runners.discard)
            else:
                del self._waiting[key]
        return await future

    async def _run(self, key: Key) -> None:
        """Place waiting picks, a batch per statement, until nobody waits."""
        queue = self._waiting[key]
        try:
            while queue:
                await self._place(key)
        finally:
            del self._waiting[key]
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.cancel()

    async def _place(self, key: Key) -> None:
        """One statement for the picks waiting on `key` (up to MAX_BATCH)."""
        queue = self._waiting[key]
        batch, queue[:] = queue[:MAX_BATCH], queue[MAX_BATCH:]
        lease_ids, lease_s = lease_arrays(batch)
        try:
            rows = await self._db.fetch(
                PICK_MANY, key[0], list(key[1]), len(batch), lease_ids, lease_s
            )
        except BaseException as exc:
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            if isinstance(exc, Exception):
                return
            raise
        for waiter, row in zip(batch, [*rows, *[None] * len(batch)], strict=False):
            if not waiter.future.done():
                waiter.future.set_result(None if row is None else reply(row))


@group.op("findlock", FindLockRequest)
async def findlock(ctx: Context, req: FindLockRequest) -> Any:
    """Pick the best loaded replica of a model and count one request in flight on it."""
    if req.prefer is None:
        batches = ctx.state.setdefault("findlock", Batches(ctx.db))
        picked = await batches.pick(req.model, req.node_ids, req.lease_s)
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
INFLIGHT_DEC = """
    UPDATE replicas SET in_flight = in_flight - 1
     WHERE node_id = $1 AND model_name = $2 AND replica_index = $3 AND in_flight > 0"""


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


@group.op("inflight_dec", InflightDecRequest)
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
    await ctx.db.execute(INFLIGHT_DEC, req.node_id, req.model, req.replica_index)
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
