"""Backend intents: install, upgrade or delete a backend on a node, eventually.

The intent is written to JetStream (infra/intent_stream.py) whatever the node's
state, and daemon/delivery.py delivers it to the worker once the node is
healthy. Reissuing the same (node, backend, op) refreshes the one intent: it
keeps its attempts and last error and becomes due now; if it is being
delivered, it goes out once more when that attempt ends, never alongside it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from infra.db import Database
from infra.errors import BadRequest, NotFound
from infra.intent_stream import Intent, Stored, intent_id
from subjects.base import OK, Context, Group, NodeId, Paged, Request, page

group = Group()

# Timestamps come from the database clock, as everywhere in the registry; the
# node look-up that validates the request reads it in the same round trip.
NODE_AND_NOW = """
    SELECT now() AS now, (SELECT node_type FROM nodes WHERE id = $1) AS node_type"""


# Delivery (daemon/delivery.py) asks, before each attempt, whether the node is
# still there and healthy, and what time it is on the database clock.
STATUS_AND_NOW = """
    SELECT now() AS now, (SELECT status FROM nodes WHERE id = $1) AS status"""
NOW = "SELECT now()"


async def node_status_and_now(db: Database, node_id: str) -> tuple[datetime, str | None]:
    """The database's time, and the node's status (None: it is gone)."""
    row = await db.fetchrow(STATUS_AND_NOW, node_id)
    assert row is not None
    return row["now"], row["status"]


async def database_now(db: Database) -> datetime:
    now: datetime = await db.fetchval(NOW)
    return now


class BackendOpRequest(Request):
    node_id: NodeId
    backend: Annotated[str, StringConstraints(max_length=255)]
    op: Literal["install", "delete", "upgrade"]
    # The gallery list LocalAI sends to the worker, as JSON text; kept, never returned.
    galleries: Annotated[str, StringConstraints(max_length=256 * 1024)] = ""


@group.op("backend_op", BackendOpRequest)
async def backend_op(ctx: Context, req: BackendOpRequest) -> Any:
    """Queue a backend install, upgrade or delete for a node (or refresh the queued one)."""
    if not req.backend.strip():
        raise BadRequest("invalid field 'backend': must not be empty")
    row = await ctx.db.fetchrow(NODE_AND_NOW, req.node_id)
    assert row is not None
    if row["node_type"] is None:
        raise NotFound(f"node {req.node_id} not found")
    if row["node_type"] != "backend":
        raise BadRequest(
            f"invalid field 'node_id': node {req.node_id} is an agent node, which runs no backends"
        )
    now = row["now"]

    def reissue(current: Stored | None) -> Intent:
        if current is None:
            return Intent(
                id=intent_id(req.node_id, req.backend, req.op),
                node_id=req.node_id,
                backend=req.backend,
                op=req.op,
                galleries=req.galleries,
                created_at=now,
                next_retry_at=now,
            )
        if current.intent.cancelled:
            # Cancelled during an attempt that has not ended: a new intent,
            # which waits for that attempt like a reissue does.
            return replace(
                current.intent,
                galleries=req.galleries,
                created_at=now,
                next_retry_at=now,
                attempts=0,
                last_error="",
                dead=False,
                cancelled=False,
                reissued=True,
            )
        intent = replace(current.intent, galleries=req.galleries, next_retry_at=now)
        if intent.delivering is not None:
            # Being delivered: the worker gets one request of an intent at a
            # time. The claim stays, so this version waits for the attempt to
            # end; the mark has the delivery send it once more then.
            intent = replace(intent, reissued=True)
        if intent.dead:
            # Abandoned before: asking again means "try again", from the start.
            intent = replace(intent, dead=False, attempts=0)
        return intent

    stored = await ctx.intents.write(ctx.intents.subject(req.node_id, req.op, req.backend), reissue)
    assert stored is not None
    return stored.intent.public()


class BackendOpsRequest(Paged):
    dead: bool = False


def by_backend_then_age(intent: dict[str, Any]) -> list[Any]:
    return [intent["backend"], intent["created_at"], intent["id"]]


@group.op("backend_ops", BackendOpsRequest)
async def backend_ops(ctx: Context, req: BackendOpsRequest) -> Any:
    """Queued intents by backend, then age; with `dead`, abandoned ones too."""
    after = req.cursor(str, str, int)
    intents = sorted(
        (s.intent.public() for s in await ctx.intents.all() if req.dead or not s.intent.dead),
        key=by_backend_then_age,
    )
    if after[0] is not None:
        intents = [i for i in intents if by_backend_then_age(i) > after]
    if req.limit is not None:
        intents = intents[: req.limit + 1]
    return page(req, intents, by_backend_then_age)


@group.op("backend_ops_count", Request)
async def backend_ops_count(ctx: Context, req: Request) -> Any:
    """How many nodes each backend has a queued intent for."""
    counts: dict[str, int] = {}
    for stored in await ctx.intents.all():
        if not stored.intent.dead:
            backend = stored.intent.backend
            counts[backend] = counts.get(backend, 0) + 1
    return counts


class CancelRequest(Request):
    id: Annotated[int, Field(ge=0, le=2**53)]


@group.op("backend_op_cancel", CancelRequest)
async def backend_op_cancel(ctx: Context, req: CancelRequest) -> Any:
    """Remove a queued or abandoned intent (one being delivered goes when its
    attempt ends; it is out of every list at once)."""
    stored = await ctx.intents.find(req.id)
    if stored is None:
        raise NotFound(f"intent {req.id} not found")
    await ctx.intents.cancel(stored.subject)
    return OK
