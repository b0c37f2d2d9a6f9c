"""Delivering backend intents to the workers, as LocalAI's frontend does.

The daemons share one durable JetStream pull consumer on the intent stream, so
each message (one version of one intent) is with one daemon at a time. Waiting
is a `nak(delay=…)`: for the retry time, or for the node to be healthy again,
never longer than REGISTRY_DRAIN_INTERVAL.

Before it asks the worker, a daemon *claims* the intent: it writes a version
carrying a claim token, conditional on the version it was handed being still
the newest. So of two versions in flight at once (the daemon's own copy made
when a node turns healthy, say) only one is delivered, and a version that shows
a live claim is put back until the claim ends. The outcome is recorded against
the claim: success removes the intent, failure schedules the next attempt. An
admin's reissue while the claim is live keeps the claim, so the worker never
has two requests of one intent at once, and marks the intent `reissued`: when
the outcome is recorded, the claim and the mark go and the intent is due again
(at once, or after the install timeout if the worker is taken to be still
installing), to be delivered once more. A daemon killed mid-request leaves its
claim to expire after the request's timeout; then another daemon delivers the
intent again.

Worker subjects and payloads are LocalAI's (reference/subjects.go):
nodes.<id>.backend.install {backend, backend_galleries[, force]},
nodes.<id>.backend.upgrade {backend, backend_galleries},
nodes.<id>.backend.delete {backend}; the reply is {success, error}.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as RequestTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from infra import tasks
from infra.config import Settings
from infra.db import Database
from infra.events import Events
from infra.intent_stream import Changed, Claim, Intent, IntentStore, Stored
from infra.retry import Backoff, Outage
from subjects import intents, node_status

log = logging.getLogger("registryd.delivery")

CONSUMER = "registryd-delivery"
ACK_WAIT = 30.0
# How long past its request's timeout a claim stays good (at most this long,
# and never longer than the timeout itself): a daemon that neither finished nor
# handed the intent back by then is taken to be dead.
CLAIM_GRACE = 30.0
DELETE_TIMEOUT = 60.0
CONCURRENCY = 32


def sanitize(token: str) -> str:
    """A node id as one subject token, as LocalAI's sanitizeSubjectToken does."""
    for char in ".*> \t\n":
        token = token.replace(char, "-")
    return token


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", "failed", "in_flight" (timed out, still working), "no_responders"
    error: str = ""


class Delivery:
    def __init__(
        self, nc: NATS, settings: Settings, db: Database, store: IntentStore, events: Events
    ) -> None:
        self._nc = nc
        self._s = settings
        self._db = db
        self._store = store
        self._events = events
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Any = None

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Fetch and handle due intents until cancelled; outages are waited out."""
        outage = Outage(log, "intent delivery paused: {cause}", "intent delivery resumed")
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                if self._subscription is None:
                    self._subscription = await self._subscribe()
                await self._slots.acquire()
                self._slots.release()
                msgs = await self._subscription.fetch(
                    batch=CONCURRENCY, timeout=min(self._s.drain_interval, 5.0)
                )
            except TimeoutError:
                # Nothing due. nats-py raises its own TimeoutError or, for a
                # batch whose deadline passes inside the fetch, the built-in
                # one (which its own subclasses): both mean the same.
                msgs = []
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outage.failed(exc)
                await self._drop_subscription()
                await backoff.wait()
                continue
            outage.ended()
            backoff.reset()
            for msg in msgs:
                await self._slots.acquire()
                task = asyncio.create_task(self._handle_safely(msg), name="deliver-intent")
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _subscribe(self) -> Any:
        return await self._store.js.pull_subscribe(
            f"{self._store.root}.>",
            durable=CONSUMER,
            stream=self._store.stream,
            config=ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=100_000,
            ),
        )

    async def _drop_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed", exc_info=True)

    async def stop(self) -> None:
        # Messages fetched but not handled go back to the consumer (unacked),
        # and an unsubscribed fetch leaves nothing for a NATS drain to wait on.
        await tasks.cancel(list(self._tasks))
        await self._drop_subscription()

    async def _handle_safely(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Left unacked, the message comes back after the ack wait.
            log.warning("could not handle intent %s: %s", msg.subject, exc or type(exc).__name__)

    # ------------------------------------------------------------ one message

    def _timeout(self, op: str) -> float:
        if op == "delete":
            return min(DELETE_TIMEOUT, self._s.install_timeout)
        return self._s.install_timeout

    async def _handle(self, msg: Msg) -> None:
        stored = Stored(msg.metadata.sequence.stream, Intent.decode(msg.data), msg.subject)
        intent = stored.intent
        if intent.dead:
            await msg.ack()
            return
        latest = await self._store.get(msg.subject)
        if latest is None or latest.seq != stored.seq:
            await msg.ack()  # cancelled, or replaced by a version of its own
            return
        now, status = await intents.node_status_and_now(self._db, intent.node_id)
        if status is None:
            log.info("dropping %s: the node is gone", intent.describe())
            await self._store.delete_version(stored)
            await msg.ack()
            return
        claim = intent.delivering
        if claim is not None:
            timeout = self._timeout(intent.op)
            ends = claim.since + timedelta(seconds=timeout + min(CLAIM_GRACE, timeout))
            if ends > now:  # being delivered right now, by us or by another daemon
                await msg.nak(delay=min((ends - now).total_seconds(), self._s.drain_interval))
                return
            if intent.cancelled:  # its attempt is over, whoever made it
                await self._store.delete_version(stored)
                await msg.ack()
                return
            log.warning("a delivery of %s was never finished; delivering again", intent.describe())
        if status != "healthy":
            await msg.nak(delay=self._s.drain_interval)
            return
        wait = (intent.next_retry_at - now).total_seconds()
        if wait > 0:
            await msg.nak(delay=min(wait, self._s.drain_interval))
            return
        token = uuid.uuid4().hex
        # This delivery carries the newest version, so a reissue that waited
        # on an expired claim is answered by it: the mark goes.
        claimed = replace(intent, delivering=Claim(token, now), reissued=False)
        try:
            await self._store.put(msg.subject, claimed, stored.seq)
        except Changed:
            await msg.ack()  # changed meanwhile: the newer version is handled instead
            return
        await msg.ack()
        try:
            outcome = await self._send(intent)
        except asyncio.CancelledError:
            # Stopping: hand the intent back at once rather than when the claim ends.
            await asyncio.shield(self._release(msg.subject, token))
            raise
        await self._record(msg.subject, token, intent, outcome)

    async def _release(self, subject: str, token: str) -> None:
        def unclaim(current: Stored | None) -> Intent | None:
            if current is None or not current.intent.claimed_by(token):
                return None
            # Due as it stands: a reissue meanwhile is answered by the next delivery.
            return current.intent.unclaimed()

        try:
            if await self._drop_cancelled(subject, token):
                return
            await self._store.write(subject, unclaim)
        except Exception as exc:
            log.warning("could not hand back %s: %s", subject, exc)

    # ------------------------------------------------------------ the worker

    async def _send(self, intent: Intent) -> Outcome:
        node, op, backend = sanitize(intent.node_id), intent.op, intent.backend
        galleries = intent.galleries
        base = f"nodes.{node}.backend"
        if op == "delete":
            return await self._request(f"{base}.delete", {"backend": backend}, self._timeout(op))
        payload = {"backend": backend} | ({"backend_galleries": galleries} if galleries else {})
        if op == "upgrade":
            outcome = await self._request(f"{base}.upgrade", payload, self._s.install_timeout)
            if outcome.kind != "no_responders":
                return outcome
            # A worker from before backend.upgrade: install with force is its upgrade.
            payload = payload | {"force": True}
        return await self._request(f"{base}.install", payload, self._s.install_timeout)

    async def _request(self, subject: str, payload: dict[str, Any], wait: float) -> Outcome:
        try:
            reply = await self._nc.request(subject, orjson.dumps(payload), timeout=wait)
        except NoRespondersError:
            return Outcome("no_responders", f"no worker answers on {subject}")
        except RequestTimeout:
            kind = "failed" if subject.endswith(".delete") else "in_flight"
            return Outcome(kind, f"no reply on {subject} within {wait:g}s")
        try:
            answer = orjson.loads(reply.data)
        except orjson.JSONDecodeError:
            return Outcome("failed", f"worker replied with something that is not JSON on {subject}")
        if isinstance(answer, dict) and answer.get("success") is True:
            return Outcome("ok")
        error = answer.get("error") if isinstance(answer, dict) else None
        return Outcome("failed", str(error or "worker reported failure"))

    # ------------------------------------------------------------ the outcome

    def backoff(self, attempts: int) -> float:
        return min(self._s.backoff_base * 2 ** max(attempts - 1, 0), self._s.backoff_cap)

    async def _drop_cancelled(self, subject: str, token: str) -> bool:
        """Drop the intent if it was cancelled during our attempt, now over."""
        current = await self._store.get(subject)
        if current is None or not current.intent.cancelled:
            return False
        if current.intent.claimed_by(token):
            # This version only: asked for again meanwhile, the newer one stays.
            await self._store.delete_version(current)
        return True

    async def _record(self, subject: str, token: str, intent: Intent, outcome: Outcome) -> None:
        what = intent.describe()
        if outcome.kind == "ok":
            await self._done_with(subject, token)
            log.info("%s done", what)
            return
        if outcome.kind == "no_responders":
            # A node nobody answers for is not healthy, whatever its last
            # heartbeat said.
            change = await node_status.no_worker(self._db, intent.node_id)
            if change is not None:
                await node_status.announce(self._events, self._store, [change])
        if await self._drop_cancelled(subject, token):
            log.info("%s, cancelled during the attempt: %s", what, outcome.error)
            return
        now = await intents.database_now(self._db)
        abandoned = False

        def apply(current: Stored | None) -> Intent | None:
            nonlocal abandoned
            if current is None:
                return None  # cancelled while we were delivering it
            ours = current.intent.claimed_by(token)
            reissued = ours and current.intent.reissued
            base = current.intent.unclaimed() if ours else current.intent
            base = replace(base, last_error=outcome.error)
            if outcome.kind == "in_flight":
                # Still installing, most likely: look again after the install
                # timeout, and do not count it as a failed attempt. A reissue
                # meanwhile waits as long: asking now would give the worker a
                # second install of this intent while it runs the first.
                if not ours:
                    return base
                later = now + timedelta(seconds=self._s.install_timeout)
                return replace(base, next_retry_at=later)
            base = replace(base, attempts=base.attempts + 1)
            if not ours:
                # Our claim expired and another daemon took the intent over:
                # its own outcome decides what comes next.
                return base
            if reissued:
                # Asked for again while this attempt ran: it goes out once
                # more now, whatever the count (as a reissue with no delivery
                # going on would).
                return replace(base, next_retry_at=now)
            abandoned = base.attempts >= self._s.max_attempts
            later = now + timedelta(seconds=self.backoff(base.attempts))
            return replace(base, dead=abandoned, next_retry_at=later)

        written = await self._store.write(subject, apply)
        if abandoned and written is not None:
            log.warning(
                "abandoned %s after %d attempts: %s",
                what,
                written.intent.attempts,
                outcome.error,
                extra={
                    "intent_id": intent.id,
                    "node_id": intent.node_id,
                    "backend": intent.backend,
                    "op": intent.op,
                },
            )
        else:
            log.info("%s: %s", what, outcome.error)

    async def _done_with(self, subject: str, token: str) -> None:
        """Remove an intent delivered with success, unless it was reissued meanwhile."""
        for _ in range(50):
            current = await self._store.get(subject)
            if current is None or not current.intent.claimed_by(token):
                return  # cancelled meanwhile, or taken over once our claim expired
            if current.intent.reissued:
                # Asked for again while we delivered it: not done, due now.
                now = await intents.database_now(self._db)
                again = replace(current.intent.unclaimed(), next_retry_at=now)
                try:
                    await self._store.put(subject, again, current.seq)
                except Changed:
                    continue
                return
            # Only this version: a copy or a reissue written meanwhile is seen
            # on the next turn.
            await self._store.delete_version(current)
