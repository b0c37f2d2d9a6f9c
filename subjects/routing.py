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
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field

from daemon.db import Database
from daemon.errors import NotFound
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


class FindLockRequest(Request):
    model: ModelName
    node_ids: Annotated[list[NodeId], Field(max_length=10_000)] = []
    prefer: Preference | None = None


CANDIDATES = """
    replicas r JOIN nodes n ON n.id = r.node_id
     WHERE r.model_name = $1 AND r.state = 'loaded' AND n.status = 'healthy'
       AND (cardinality($2::text[]) = 0 OR r.node_id = ANY($2::text[]))"""

# $1 model, $2 node_ids, $3 how many picks (k).
# Slot j of a replica is its (j+1)-th pick in this batch, at load in_flight + j;
# taking the k lowest slots is what k picks one after the other would do (a
# replica just picked is the most recently used, hence `j` before last_used).
# Only the k best replicas can receive a pick, so only they are locked.
PICK_MANY = f"""
    WITH cand AS (
        SELECT r.id, r.in_flight, r.last_used, n.available_vram
          FROM {CANDIDATES}
         ORDER BY r.in_flight, r.last_used, n.available_vram DESC, r.id
         LIMIT $3
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
    )
    SELECT {UP_REPLICA}, up.picks, chosen.j, {NODE_AS}
      FROM chosen JOIN up ON up.id = chosen.id JOIN nodes n ON n.id = up.node_id
     ORDER BY chosen.seq"""

# $1 model, $2 node_ids, $3/$4 the preferred (node, replica): that exact
# replica if it is a candidate, else the default order.
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
    )
    SELECT {UP_REPLICA}, up.picks, 0 AS j, {NODE_AS} FROM up JOIN nodes n ON n.id = up.node_id"""


def reply(row: Any) -> dict[str, Any]:
    """{"node", "replica"} from one chosen slot, the replica as that pick left it."""
    out = record(row)
    assert out is not None
    node = {k.removeprefix("node__"): out.pop(k) for k in list(out) if k.startswith("node__")}
    picks, j = out.pop("picks"), out.pop("j")
    out["in_flight"] += j + 1 - picks
    return {"node": node, "replica": out}


Key = tuple[str, tuple[str, ...]]


class Batches:
    """Per (model, node_ids): requests waiting for the pick under way to finish."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._waiting: dict[Key, list[asyncio.Future[dict[str, Any] | None]]] = {}
        self._runners: set[asyncio.Task[None]] = set()

    async def pick(self, model: str, node_ids: Sequence[str]) -> dict[str, Any] | None:
        key = (model, tuple(sorted(set(node_ids))))
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.get(key)
        if queue is None:
            self._waiting[key] = [future]
            runner = asyncio.create_task(self._run(key), name=f"findlock:{model}")
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        else:
            queue.append(future)
        return await future

    async def _run(self, key: Key) -> None:
        """Place waiting picks, a batch per statement, until nobody waits."""
        queue = self._waiting[key]
        try:
            while queue:
                batch, queue[:] = queue[:MAX_BATCH], queue[MAX_BATCH:]
                try:
                    rows = await self._db.fetch(PICK_MANY, key[0], list(key[1]), len(batch))
                except BaseException as exc:
                    for future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for future, row in zip(batch, [*rows, *[None] * len(batch)], strict=False):
                    if not future.done():
                        future.set_result(None if row is None else reply(row))
        finally:
            del self._waiting[key]
            for future in queue:
                if not future.done():
                    future.cancel()


@group.op("findlock", FindLockRequest)
async def findlock(ctx: Context, req: FindLockRequest) -> Any:
    """Pick the best loaded replica of a model and count one request in flight on it."""
    if req.prefer is None:
        batches = ctx.state.setdefault("findlock", Batches(ctx.db))
        picked = await batches.pick(req.model, req.node_ids)
    else:
        row = await ctx.db.fetchrow(
            PICK_PREFERRED, req.model, req.node_ids, req.prefer.node_id, req.prefer.replica_index
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


@group.op("inflight_dec", ReplicaRef)
async def inflight_dec(ctx: Context, req: ReplicaRef) -> Any:
    """A request on a replica finished (never below zero)."""
    await ctx.db.execute(INFLIGHT_DEC, req.node_id, req.model, req.replica_index)
    return OK
