"""The node state machine: every change of a node's status, by any path.

Operations (register, approve, offline, unhealthy, healthy, drain, deregister),
the health sweep and intent delivery all change a node's status through this
module and nowhere else: each change is a rule of the table below, and the SQL
that applies it is here. Two rules the database enforces as well, whoever
writes (schema.sql): a node never approved is never `healthy`, and approval,
once granted, lasts until the node is deregistered.

| cause              | from               | to                           | approval       |
|--------------------|--------------------|------------------------------|----------------|
| registered (new)   | -                  | pending                      | by auto-approve |
| registered (again) | any                | healthy if approved, else pending | by auto-approve |
| approved           | pending            | healthy                      | granted        |
| offline            | any                | offline, replicas cleared    |                |
| marked unhealthy   | any                | unhealthy                    |                |
| drain              | any                | draining, replicas cleared   |                |
| marked healthy     | any                | healthy                      | needed (409)   |
| no heartbeat       | healthy            | unhealthy (auto-offline: offline, replicas cleared) | |
| heartbeat resumed  | unhealthy, offline | healthy                      | needed (else left) |
| no worker answered | healthy            | unhealthy                    |                |
| deregistered       | any                | the row is deleted           | ends           |

A change is announced after its transaction commits: one node event when the
status differs from the one before (and for every registration and
deregistration), a `prefixcache.invalidate` per model whose replicas went, and
a node that became healthy has its queued backend intents looked at at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from infra.db import Database
from infra.errors import Conflict, NotFound
from infra.events import Events
from infra.intent_stream import IntentStore

ANY = ("registering", "pending", "healthy", "unhealthy", "draining", "offline")


@dataclass(frozen=True)
class Rule:
    """One row of the table: a cause moves a node from one of `sources` to `target`."""

    reason: str
    sources: tuple[str, ...]
    target: str
    needs_approval: bool = False
    clears_replicas: bool = False


APPROVED = Rule("approved", ("pending",), "healthy")
OFFLINE = Rule("offline", ANY, "offline", clears_replicas=True)
UNHEALTHY = Rule("marked unhealthy", ANY, "unhealthy")
DRAIN = Rule("drain", ANY, "draining", clears_replicas=True)
HEALTHY = Rule("marked healthy", ANY, "healthy", needs_approval=True)
STALE = Rule("no heartbeat", ("healthy",), "unhealthy")
STALE_OFFLINE = Rule("no heartbeat", ("healthy",), "offline", clears_replicas=True)
RESUMED = Rule("heartbeat resumed", ("unhealthy", "offline"), "healthy", needs_approval=True)
NO_WORKER = Rule("no worker answered a backend intent", ("healthy",), "unhealthy")


@dataclass(frozen=True)
class Change:
    """What happened to one node, to be announced once committed."""

    node_id: str
    name: str
    status: str  # "deregistered" when the row went
    previous: str | None  # None for a node registered for the first time
    reason: str
    removed: tuple[str, ...] = ()  # models whose replicas on the node were removed
    auth_refs: dict[str, str] | None = field(default=None, compare=False)

    @property
    def announced(self) -> bool:
        return self.status != self.previous or self.reason in ("registered", "deregistered")


async def announce(events: Events, intents: IntentStore, changes: Iterable[Change]) -> None:
    """Publish what committed changes mean for everyone listening."""
    for change in changes:
        await events.replicas_removed(change.node_id, change.removed)
        if not change.announced:
            continue
        await events.node(
            change.node_id,
            change.name,
            change.status,
            change.previous,
            change.reason,
            auth_refs=change.auth_refs,
        )
        if change.status == "healthy":
            await intents.kick(change.node_id)  # its queued intents go out now


# ---------------------------------------------------------------- replicas

# Replica rows leave with the node's status (offline, drain) or its worker's
# restart (registration). A statement of its own, after the node row is
# locked, so it also sees a replica added while we waited for the lock.
CLEAR_REPLICAS = """
    WITH gone AS (
        DELETE FROM replicas WHERE node_id = ANY($1::text[]) RETURNING node_id, model_name
    )
    SELECT DISTINCT node_id, model_name FROM gone ORDER BY node_id, model_name"""


async def clear_replicas(conn: asyncpg.Connection, node_ids: list[str]) -> dict[str, list[str]]:
    """Remove the replica rows of these (locked) nodes: the models, per node."""
    removed: dict[str, list[str]] = {}
    for node_id, model in await conn.fetch(CLEAR_REPLICAS, node_ids):
        removed.setdefault(node_id, []).append(model)
    return removed


# ---------------------------------------------------------------- registration

# The registration statement (subjects/nodes.py) inserts a new node as
# `registering`, the column's default, and writes no status: this does.
REGISTERED = """
    UPDATE nodes SET status = CASE WHEN approved OR $2 THEN 'healthy' ELSE 'pending' END,
                     approved = approved OR $2, status_since = now()
     WHERE id = $1
    RETURNING name, status"""


async def registered(
    conn: asyncpg.Connection,
    node_id: str,
    previous: str | None,
    *,
    auto_approve: bool,
    removed: Iterable[str] = (),
    auth_refs: dict[str, str] | None = None,
) -> Change:
    """A node (re-)registered in this transaction: healthy if it was ever
    approved (or auto-approve is on), pending otherwise."""
    row = await conn.fetchrow(REGISTERED, node_id, auto_approve)
    assert row is not None, "registered() follows the node's upsert"
    return Change(
        node_id, row["name"], row["status"], previous, "registered", tuple(removed), auth_refs
    )


# ---------------------------------------------------------------- one node, one rule

# $2 the target, $3 the statuses it may come from, $4 whether approval is
# needed. The old row is read under its lock, so the reply can tell "not
# found" from "not allowed", and the change is made only when allowed.
# status_since moves even when the status stays: the sweep revives a node only
# on a heartbeat newer than its last status operation.
APPLY = """
    WITH old AS (SELECT id, name, status, approved FROM nodes WHERE id = $1 FOR UPDATE),
    up AS (
        UPDATE nodes n SET status = $2, status_since = now(), updated_at = now()
          FROM old
         WHERE n.id = old.id AND old.status = ANY($3::text[]) AND (old.approved OR NOT $4)
        RETURNING n.id
    )
    SELECT old.name, old.status, old.approved, EXISTS (SELECT 1 FROM up) AS applied FROM old"""


async def apply(db: Database, node_id: str, rule: Rule) -> Change:
    """Apply `rule` to one node: NotFound, Conflict when it does not allow it."""
    async with db.transaction() as conn:
        old = await conn.fetchrow(
            APPLY, node_id, rule.target, list(rule.sources), rule.needs_approval
        )
        if old is None:
            raise NotFound(f"node {node_id} not found")
        if not old["applied"]:
            if rule.needs_approval and not old["approved"]:
                raise Conflict(f"node {node_id} has never been approved; approve it first")
            raise Conflict(f"node {node_id} is {old['status']}, which cannot become {rule.target}")
        removed = (await clear_replicas(conn, [node_id])) if rule.clears_replicas else {}
    return Change(
        node_id,
        old["name"],
        rule.target,
        old["status"],
        rule.reason,
        tuple(removed.get(node_id, ())),
    )


# Approval, and the node as the reply shows it, in one statement; the columns
# are the caller's (the wire's node).
def approve_statement(columns: str, then: str) -> str:
    return f"""
    WITH old AS (SELECT id, status FROM nodes WHERE id = $1 FOR UPDATE),
    up AS (
        UPDATE nodes n SET status = 'healthy', approved = true, status_since = now(),
                           updated_at = now()
          FROM old WHERE n.id = old.id AND old.status = ANY($2::text[])
        RETURNING n.*
    ),
    {then}
    SELECT old.status AS previous_status, {columns}
      FROM old LEFT JOIN up AS n ON true"""


async def approve(db: Database, statement: str, node_id: str) -> tuple[dict[str, Any], Change]:
    """Approve a pending node; the node's row (the statement's columns) and the change."""
    row = await db.fetchrow(statement, node_id, list(APPROVED.sources))
    if row is None:
        raise NotFound(f"node {node_id} not found")
    if row["id"] is None:
        raise Conflict(f"node {node_id} is {row['previous_status']}, not pending")
    node = dict(row)
    previous = node.pop("previous_status")
    return node, Change(node_id, node["name"], APPROVED.target, previous, APPROVED.reason)


# ---------------------------------------------------------------- deregistration

DELETE_NODE = """
    DELETE FROM nodes WHERE id = $1 RETURNING name, status, auth_user_id, api_key_id"""
LOCK_NODE = "SELECT 1 FROM nodes WHERE id = $1 FOR UPDATE"


async def deregister(db: Database, node_id: str) -> Change:
    """Remove a node with its replicas and labels; the change carries the
    credentials LocalAI provisioned for it, so they can be revoked."""
    async with db.transaction() as conn:
        if await conn.fetchval(LOCK_NODE, node_id) is None:
            raise NotFound(f"node {node_id} not found")
        removed = await clear_replicas(conn, [node_id])
        old = await conn.fetchrow(DELETE_NODE, node_id)
    assert old is not None
    return Change(
        node_id,
        old["name"],
        "deregistered",
        old["status"],
        "deregistered",
        tuple(removed.get(node_id, ())),
        auth_refs_of(old),
    )


def auth_refs_of(row: Any) -> dict[str, str] | None:
    """The provisioned credentials' ids stored for a node, when it has any."""
    refs = {"auth_user_id": row["auth_user_id"], "api_key_id": row["api_key_id"]}
    return refs if any(refs.values()) else None


# ---------------------------------------------------------------- the sweep

# $1 stale_after (s), $2 the status of a stale node ('unhealthy' or 'offline'),
# $3 the statuses "heartbeat resumed" revives. The nodes are locked first and
# the condition is checked again on the row as it is once locked, so a
# heartbeat or a status change that commits meanwhile wins. "Heartbeated since
# its last change" is last_heartbeat > status_since: a node just marked offline
# or unhealthy by hand does not come straight back on the heartbeat it sent
# before; the next one revives it. A node never approved is never revived.
SWEEP = """
    WITH due AS (
        SELECT id, status FROM nodes
         WHERE (status = 'healthy'
                AND last_heartbeat < now() - make_interval(secs => $1))
            OR (status = ANY($3::text[]) AND approved
                AND last_heartbeat > now() - make_interval(secs => $1)
                AND last_heartbeat > status_since)
         ORDER BY id
           FOR UPDATE
    )
    UPDATE nodes n
       SET status = CASE WHEN due.status = 'healthy' THEN $2 ELSE 'healthy' END,
           status_since = now(), updated_at = now()
      FROM due WHERE n.id = due.id
    RETURNING n.id, n.name, n.status, due.status AS previous_status,
              extract(epoch FROM now() - n.last_heartbeat)::float8 AS silent_s"""


async def sweep(conn: asyncpg.Connection, stale_after: float, auto_offline: bool) -> list[Change]:
    """One round of the health sweep, in the caller's transaction."""
    stale = STALE_OFFLINE if auto_offline else STALE
    rows = await conn.fetch(SWEEP, stale_after, stale.target, list(RESUMED.sources))
    gone = [r["id"] for r in rows if r["status"] == "offline"]
    removed = await clear_replicas(conn, gone) if gone else {}
    changes = []
    for r in rows:
        if r["status"] == "healthy":
            reason = RESUMED.reason
        else:
            reason = f"{stale.reason} for {int(r['silent_s'])}s"
        changes.append(
            Change(
                r["id"],
                r["name"],
                r["status"],
                r["previous_status"],
                reason,
                tuple(removed.get(r["id"], ())),
            )
        )
    return changes


# ---------------------------------------------------------------- delivery

MARK_NO_WORKER = """
    UPDATE nodes SET status = $2, status_since = now(), updated_at = now()
     WHERE id = $1 AND status = ANY($3::text[])
    RETURNING name"""


async def no_worker(db: Database, node_id: str) -> Change | None:
    """Nobody answers for a healthy node's backend requests: it is not healthy."""
    name = await db.fetchval(MARK_NO_WORKER, node_id, NO_WORKER.target, list(NO_WORKER.sources))
    if name is None:
        return None
    return Change(node_id, name, NO_WORKER.target, "healthy", NO_WORKER.reason)
