"""Periodic housekeeping: the health sweep and the expiry of leases.

Every REGISTRY_CHECK_INTERVAL seconds each daemon runs one round of both jobs.

The health sweep runs on one instance at a time: a round first tries a
transaction-scoped advisory lock and skips when another instance holds it. In
that one transaction, a healthy node whose last heartbeat is older than
REGISTRY_STALE_AFTER becomes unhealthy (offline, its replica rows removed, with
REGISTRY_AUTO_OFFLINE), and an unhealthy or offline node that has heartbeated
since its last change, within REGISTRY_STALE_AFTER, becomes healthy. Draining,
pending and registering nodes are left alone. Times are the database's.

Lease expiry needs no lock: one statement deletes the expired leases and gives
their units back, so a lease released by one instance is gone for every other
(and for a concurrent `inflight_dec` of it).

Events go out after the commit. A round that fails (the database is away) is
logged once per outage, and the loop carries on: the next round retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from daemon.config import Settings
from daemon.db import Database
from daemon.errors import classify
from daemon.events import Events
from daemon.intents import IntentStore

log = logging.getLogger("registryd.sweep")

# pg_try_advisory_xact_lock key of the health sweep: "regsweep" in ASCII.
SWEEP_LOCK_KEY = int.from_bytes(b"regsweep", "big")

TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1)"

# $1 stale_after (s), $2 the status of a stale node ('unhealthy' or 'offline').
# The nodes are locked first and the condition is checked again on the row as
# it is once locked, so a heartbeat or a status change that commits meanwhile
# wins. "Heartbeated since its last change" is last_heartbeat > updated_at:
# a node just marked offline or unhealthy by hand does not come straight back
# on the heartbeat it sent before; the next one revives it.
SWEEP_NODES = """
    WITH due AS (
        SELECT id, status FROM nodes
         WHERE (status = 'healthy'
                AND last_heartbeat < now() - make_interval(secs => $1))
            OR (status IN ('unhealthy', 'offline')
                AND last_heartbeat > now() - make_interval(secs => $1)
                AND last_heartbeat > updated_at)
         ORDER BY id
           FOR UPDATE
    )
    UPDATE nodes n
       SET status = CASE WHEN due.status = 'healthy' THEN $2 ELSE 'healthy' END,
           updated_at = now()
      FROM due WHERE n.id = due.id
    RETURNING n.id, n.name, n.status, due.status AS previous_status,
              extract(epoch FROM now() - n.last_heartbeat)::float8 AS silent_s"""

# A second statement, so it sees replicas added while it waited for the node
# locks; the nodes are offline now, so no new replica can be picked there.
REMOVE_REPLICAS = """
    WITH gone AS (
        DELETE FROM replicas WHERE node_id = ANY($1::text[]) RETURNING node_id, model_name
    )
    SELECT DISTINCT node_id, model_name FROM gone ORDER BY node_id, model_name"""

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


class Sweep:
    """The background task: `run` is spawned by the daemon and never returns."""

    def __init__(
        self, settings: Settings, db: Database, events: Events, intents: IntentStore
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.intents = intents
        self._failing: dict[str, str] = {}  # job -> the error already logged

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval)
            await self._guarded("health sweep", self.sweep_nodes)
            await self._guarded("lease expiry", self.expire_leases)

    async def _guarded(self, job: str, round_: Callable[[], Awaitable[None]]) -> None:
        """One round of a job; a failure is logged when an outage starts (or
        its cause changes) and when it ends, never on every tick."""
        try:
            await round_()
        except Exception as exc:
            described = describe(exc)
            if self._failing.get(job) != described:
                unexpected = classify(exc) is None
                log.warning(
                    "%s failed: %s; retrying every %gs",
                    job,
                    described,
                    self.settings.check_interval,
                    exc_info=exc if unexpected else None,
                )
                self._failing[job] = described
            return
        if self._failing.pop(job, None) is not None:
            log.info("%s working again", job)

    async def sweep_nodes(self) -> None:
        s = self.settings
        stale_status = "offline" if s.auto_offline else "unhealthy"
        removed: list[tuple[str, str]] = []
        async with self.db.transaction() as conn:
            if not await conn.fetchval(TRY_LOCK, SWEEP_LOCK_KEY):
                return  # another instance is sweeping
            changed = await conn.fetch(SWEEP_NODES, s.stale_after, stale_status)
            gone = [c["id"] for c in changed if c["status"] == "offline"]
            if gone:
                removed = [(r[0], r[1]) for r in await conn.fetch(REMOVE_REPLICAS, gone)]
        for node_id in dict.fromkeys(node_id for node_id, _ in removed):
            await self.events.replicas_removed(
                node_id, [model for owner, model in removed if owner == node_id]
            )
        for c in changed:
            if c["status"] == "healthy":
                reason = "heartbeat resumed"
            else:
                reason = f"no heartbeat for {int(c['silent_s'])}s"
            await self.events.node(c["id"], c["name"], c["status"], c["previous_status"], reason)
            if c["status"] == "healthy":
                await self.intents.kick(c["id"])  # its queued intents go out now

    async def expire_leases(self) -> None:
        released = await self.db.fetchval(EXPIRE_LEASES)
        if released:
            log.info("released %d expired lease(s)", released)


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]
