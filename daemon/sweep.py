"""Periodic housekeeping: the health sweep and the expiry of leases.

Every REGISTRY_CHECK_INTERVAL seconds each daemon runs one round of both jobs.

The health sweep runs on one instance at a time: a round first tries a
transaction-scoped advisory lock and skips when another instance holds it. In
that one transaction the node state machine (subjects/node_status.py) makes a
healthy node whose last heartbeat is older than REGISTRY_STALE_AFTER unhealthy
(offline, its replica rows removed, with REGISTRY_AUTO_OFFLINE), and an
approved unhealthy or offline node that has heartbeated since its last change,
within REGISTRY_STALE_AFTER, healthy. Draining, pending and registering nodes
are left alone. Times are the database's.

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

from infra.config import Settings
from infra.db import Database
from infra.errors import classify
from infra.events import Events
from infra.intent_stream import IntentStore
from infra.retry import Outage
from subjects import node_status, routing

log = logging.getLogger("registryd.sweep")

# pg_try_advisory_xact_lock key of the health sweep: "regsweep" in ASCII.
SWEEP_LOCK_KEY = int.from_bytes(b"regsweep", "big")

TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1)"


class Sweep:
    """The background task: `run` is spawned by the daemon and never returns."""

    def __init__(
        self, settings: Settings, db: Database, events: Events, intents: IntentStore
    ) -> None:
        self.settings = settings
        self.db = db
        self.events = events
        self.intents = intents
        self._outages: dict[str, Outage] = {}  # per job

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval)
            await self._guarded("health sweep", self.sweep_nodes)
            await self._guarded("lease expiry", self.expire_leases)

    async def _guarded(self, job: str, round_: Callable[[], Awaitable[None]]) -> None:
        """One round of a job; a failure is logged when an outage starts (or
        its cause changes) and when it ends, never on every tick."""
        outage = self._outages.get(job)
        if outage is None:
            every = f"; retrying every {self.settings.check_interval:g}s"
            outage = self._outages[job] = Outage(
                log, job + " failed: {cause}" + every, job + " working again"
            )
        try:
            await round_()
        except Exception as exc:
            outage.failed(exc, traceback=exc if classify(exc) is None else None)
            return
        outage.ended()

    async def sweep_nodes(self) -> None:
        s = self.settings
        async with self.db.transaction() as conn:
            if not await conn.fetchval(TRY_LOCK, SWEEP_LOCK_KEY):
                return  # another instance is sweeping
            changes = await node_status.sweep(conn, s.stale_after, s.auto_offline)
        await node_status.announce(self.events, self.intents, changes)

    async def expire_leases(self) -> None:
        released = await routing.expire_leases(self.db)
        if released:
            log.info("released %d expired lease(s)", released)
