"""The NATS edge: the `registry` service of ADR-32, one endpoint per operation.

We speak the ADR-32 service protocol ourselves rather than through nats.micro:
the protocol is three verbs on `$SRV.*`, and owning it lets every reply, the
verbs' own included, go through one check of its reply subject. A reply is
published with the daemon's NATS rights, so a request whose reply subject is
not an inbox (`registry.approve`, `$JS.API.STREAM.DELETE.…`) would make the
daemon act for the requester with rights the requester lacks. Such a request
is not answered at all: it is counted as an error and logged, at most once a
minute (REGISTRY_REPLY_PREFIXES says what an inbox is).

Two more things differ from a plain micro endpoint:

* nats-py delivers a subscription's messages to its callback one at a time, so a
  handler that awaits SQL would serialise every request on that endpoint. Our
  endpoints hand each message to the turns (daemon/turns.py), which start a task
  per request, bounded by REGISTRY_MAX_CONCURRENCY.
* The contract wants a JSON error body beside the ADR-32 error headers, and
  never an internal detail, so the endpoints build every reply themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID
from pydantic import ValidationError

from daemon import __version__
from daemon.nats_reads import unread
from daemon.turns import Turns, Work
from infra import wire
from infra.errors import (
    BadRequest,
    Internal,
    RegistryError,
    TooLarge,
    Unauthorized,
    Unavailable,
    classify,
)
from infra.retry import Outage, Throttle
from subjects import OPERATIONS
from subjects.base import Context, Operation, Reply, Request

log = logging.getLogger("registryd.service")

SERVICE_NAME = "registry"
QUEUE_GROUP = "registry"
PENDING_MSGS = 100_000  # per endpoint, read from NATS and not yet dispatched
# Bytes of requests waiting in one endpoint's queue past which more are
# refused (503) unread: a burst of large bodies is shed, not buffered.
SHED_BYTES = 32 * 1024 * 1024


class Refusals:
    """Logs refused requests (a wrong registration token): who, from where, why.

    A misconfigured worker retries every few seconds forever, so each claimant
    gets one line per `every` seconds, the next one counting those in between.
    Who a request claims to be is the client's choice, so at most `remember`
    claimants are kept: when a new one finds them all taken, the one logged
    longest ago makes room if that was `every` seconds ago or more (its next
    refusal is logged anyway); if not, the new claimant's refusals are counted
    with all the others' beyond the bound, in one line per `every` seconds.
    """

    def __init__(self, every: float = 60.0, remember: int = 1_000) -> None:
        self._every = every
        self._remember = remember
        # who → (last logged, held back), in the order their lines were logged
        self._seen: dict[str, tuple[float, int]] = {}
        self._unnamed = Throttle(every)

    def note(self, op: str, err: Unauthorized, source: str) -> None:
        now = time.monotonic()
        last, held = self._seen.get(err.who, (-self._every, 0))
        if now - last < self._every:
            self._seen[err.who] = (last, held + 1)  # keeps its place in the order
            return
        self._seen.pop(err.who, None)
        if len(self._seen) >= self._remember:
            oldest = next(iter(self._seen))
            if now - self._seen[oldest][0] >= self._every:
                del self._seen[oldest]  # its next refusal is logged anyway
        if len(self._seen) >= self._remember:
            count = self._unnamed.due()
            if count is not None:
                log.warning(
                    "refused %s for %s from %s: %s (%d refused since the last such line "
                    "for claimants beyond the %d logged one by one)",
                    op,
                    err.who,
                    source,
                    err.why,
                    count,
                    self._remember,
                )
            return
        self._seen[err.who] = (now, 0)
        more = f" ({held} more refused since the last line)" if held else ""
        log.warning("refused %s for %s from %s: %s%s", op, err.who, source, err.why, more)


class Misdirected:
    """Logs requests refused for their reply subject: the first at once, then
    at most one line a minute counting those in between."""

    def __init__(self) -> None:
        self._throttle = Throttle(60.0)

    def note(self, where: str, reply: str) -> None:
        count = self._throttle.due()
        if count is None:
            return
        log.warning(
            "refused %d request(s), the last on %s: its reply subject %r is not under "
            "REGISTRY_REPLY_PREFIXES, and the daemon publishes replies nowhere else",
            count,
            where,
            reply,
        )


def source_of(msg: Msg) -> str:
    """Where a request came from, as far as NATS tells: the requester's inbox,
    which nats-server's /connz?subs=1 maps to a connection (user, address)."""
    return f"inbox {msg.reply}" if msg.reply else "a publish without reply subject"


@dataclass
class Stats:
    """An endpoint's figures for `$SRV.STATS`, as ADR-32 names them."""

    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, all requests together

    def error(self, err: RegistryError) -> None:
        self.num_errors += 1
        self.last_error = f"{err.code}:{err.message}"

    def as_dict(self) -> dict[str, Any]:
        average = self.processing_time // self.num_requests if self.num_requests else 0
        return {
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "last_error": self.last_error,
            "processing_time": self.processing_time,
            "average_processing_time": average,
        }


class Replies:
    """Where the daemon may publish a reply: subjects under the configured
    prefixes (inboxes), and nowhere else."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._prefixes = prefixes
        self.misdirected = Misdirected()

    def allowed(self, reply: str) -> bool:
        return reply.startswith(self._prefixes)


class RegistryEndpoint:
    """One operation on its subject: checks, turns, handler, reply, statistics."""

    def __init__(
        self,
        client: NATS,
        op: Operation[Any],
        subject: str,
        ctx: Context,
        turns: Turns,
        replies: Replies,
        health: Outage,
        refusals: Refusals,
    ) -> None:
        self.name = op.name
        self.subject = subject
        self.stats = Stats()
        self._client = client  # the service's connection, or the heartbeats'
        self._op = op
        self._ctx = ctx
        self._turns = turns
        self._replies = replies
        self._health = health
        self._refusals = refusals
        self._subscription: Subscription | None = None

    def info(self) -> dict[str, Any]:
        metadata = {"description": self._op.description} if self._op.description else None
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": QUEUE_GROUP,
            "metadata": metadata,
        }

    def data(self) -> dict[str, Any] | None:
        return None if self._op.data is None else self._op.data(self._ctx)

    async def start(self) -> None:
        self._subscription = await self._client.subscribe(
            self.subject,
            queue=QUEUE_GROUP,
            cb=self._dispatch,
            # Messages read but not yet handed to the turns (or, for published
            # heartbeats, not yet queued for writing). Past this, nats-py drops
            # them and the connection's error callback (daemon/app.py) answers
            # the requests among them 503.
            pending_msgs_limit=PENDING_MSGS,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def drain(self) -> None:
        """Stop taking requests; those already delivered to us are still served."""
        if self._subscription is not None:
            await self._subscription.drain()

    async def _dispatch(self, msg: Msg) -> None:
        sub = self._subscription
        if msg.reply and sub is not None and sub.pending_bytes > SHED_BYTES:
            # Bodies read faster than we check them are piling up: answer
            # 503 without reading them, so that nats-py keeps reading the
            # socket and nats-server never cuts this connection off.
            if self._replies.allowed(msg.reply):
                await self.overloaded(msg)
            return
        if msg.reply and not self._replies.allowed(msg.reply):
            # Not an inbox: answering would publish there with our rights.
            self.stats.num_requests += 1
            self.stats.error(BadRequest("reply subject is not an inbox"))
            self._replies.misdirected.note(msg.subject, msg.reply)
            return
        if self._op.inline and not msg.reply:
            # Published and quick (a heartbeat is queued, not written, here): a
            # turn and a task each would cost more than the work, at thousands
            # a second.
            work = await self.begin(msg)
            if work is not None:
                await work()
            return
        await self._turns.submit(self, msg, alone=sub is not None and not sub.pending_msgs)

    async def begin(self, msg: Msg) -> Work | None:
        """Check the request; answer a bad one now, else return its handling."""
        started = time.perf_counter_ns()
        self.stats.num_requests += 1
        try:
            request = self._check(msg)
        except Exception as exc:
            await self._finish(msg, started, *self._failed(self._internal(exc)))
            return None
        return lambda: self._handle(msg, request, started)

    async def overloaded(self, msg: Msg) -> None:
        self.stats.num_requests += 1
        err = Unavailable("too many requests waiting; retry later")
        await self._finish(msg, time.perf_counter_ns(), *self._failed(err))

    async def _handle(self, msg: Msg, request: Request, started: int) -> None:
        try:
            body, headers = await self._answer(request)
            self._health.ended()
        except Exception as exc:
            err = self._internal(exc)
            # What the handlers meet (the database away, a wrong token) is
            # worth an operator's attention; a bad or shed request is not.
            if isinstance(err, Unavailable):
                self._health.failed(err.message)
            elif isinstance(err, Unauthorized):
                self._refusals.note(self._op.name, err, source_of(msg))
            body, headers = self._failed(err)
        await self._finish(msg, started, body, headers)

    def _internal(self, exc: Exception) -> RegistryError:
        """The contract's error for `exc`: itself, a driver failure mapped, or a
        500 whose request id leads to the traceback in the log."""
        mapped = classify(exc)
        if mapped is not None:
            return mapped
        request_id = uuid.uuid4().hex[:12]
        log.error(
            "internal error in %s (request id %s)",
            self._op.name,
            request_id,
            exc_info=exc,
            extra={"request_id": request_id, "operation": self._op.name},
        )
        return Internal(f"internal error (request id {request_id})")

    def _failed(self, err: RegistryError) -> tuple[bytes, dict[str, str]]:
        self.stats.error(err)
        return wire.error_reply(err)

    async def _finish(
        self, msg: Msg, started: int, body: bytes, headers: dict[str, str] | None
    ) -> None:
        if msg.reply:
            try:
                await self._client.publish(msg.reply, body, headers=headers)
            except Exception:
                log.warning("could not send reply for %s", self._op.name, exc_info=True)
        self.stats.processing_time += time.perf_counter_ns() - started

    def _check(self, msg: Msg) -> Request:
        op, settings = self._op, self._ctx.settings
        if len(msg.data) > settings.max_payload:
            raise TooLarge(
                f"request body is {len(msg.data)} bytes; the limit is {settings.max_payload}"
            )
        fields = wire.parse_body(msg.data)
        if op.subject_field:
            fields[op.subject_field] = msg.subject.rsplit(".", 1)[-1]
        if op.reply_field:
            fields[op.reply_field] = bool(msg.reply)
        try:
            return op.model.model_validate(fields)
        except ValidationError as exc:
            raise BadRequest(wire.describe_validation(exc)) from None

    async def _answer(self, request: Request) -> tuple[bytes, dict[str, str] | None]:
        result = await self._op.handler(self._ctx, request)
        headers = None
        if isinstance(result, Reply):
            headers = dict(result.headers) or None
            result = result.body
        body = wire.encode(result)
        limit = self._client.max_payload
        if limit and len(body) > limit:
            raise TooLarge(
                f"the reply would be {len(body)} bytes, more than NATS allows ({limit}); "
                "ask for pages with 'limit' and 'after'"
            )
        return body, headers


class RegistryService:
    """The `registry` service: every operation of the contract, and ADR-32's
    PING, INFO and STATS about them."""

    def __init__(self, nc: NATS, ctx: Context, heartbeat_nc: NATS | None = None) -> None:
        self._nc = nc
        # Operations published at high rates (heartbeats) may have their own.
        self._inline_nc = heartbeat_nc or nc
        self._ctx = ctx
        limit = ctx.settings.max_concurrency
        # One requester may hold a quarter of the slots: a router process with
        # hundreds of requests in flight, while others still get theirs.
        self._turns = Turns(limit, per_requester=max(1, limit // 4), unread=lambda: unread(nc))
        self.replies = Replies(ctx.settings.reply_prefix_list)
        self._health = Outage(
            log,
            "requests get 503 until it returns: {cause}",
            "requests served again after: {cause}",
            per_cause=False,
        )
        self._refusals = Refusals()
        self.id = NUID().next().decode()
        self._started = datetime.now(UTC)
        self._metadata = {"subject_prefix": ctx.settings.subject_prefix}
        self.endpoints: list[RegistryEndpoint] = []
        self._control: list[Subscription] = []

    def subject(self, op: Operation[Any]) -> str:
        base = f"{self._ctx.settings.subject_prefix}.{op.verb}"
        return base + ".*" if op.subject_field else base

    async def start(self) -> None:
        self._turns.start()
        for op in OPERATIONS:
            endpoint = RegistryEndpoint(
                self._inline_nc if op.inline else self._nc,
                op,
                self.subject(op),
                self._ctx,
                self._turns,
                self.replies,
                self._health,
                self._refusals,
            )
            await endpoint.start()
            self.endpoints.append(endpoint)
        verbs: dict[str, Callable[[], dict[str, Any]]] = {
            "PING": self._ping,
            "INFO": self._info,
            "STATS": self._stats,
        }
        for verb, answer in verbs.items():
            # Every instance answers the verbs (no queue group): `nats micro
            # ls` lists each, and `…STATS.registry.<id>` asks one of them.
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{SERVICE_NAME}",
                f"$SRV.{verb}.{SERVICE_NAME}.{self.id}",
            ):
                self._control.append(
                    await self._nc.subscribe(subject, cb=self._control_handler(answer))
                )
        await self._nc.flush()
        await self._inline_nc.flush()

    def _control_handler(self, answer: Callable[[], dict[str, Any]]) -> Callable[[Msg], Any]:
        async def respond(msg: Msg) -> None:
            if not msg.reply:
                return
            if not self.replies.allowed(msg.reply):
                self.replies.misdirected.note(msg.subject, msg.reply)
                return
            await self._nc.publish(msg.reply, orjson.dumps(answer()))

        return respond

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": f"io.nats.micro.v1.{kind}_response",
            "name": SERVICE_NAME,
            "id": self.id,
            "version": __version__,
            "metadata": self._metadata,
        }

    def _ping(self) -> dict[str, Any]:
        return self._identity("ping")

    def _info(self) -> dict[str, Any]:
        return self._identity("info") | {
            "description": "registryd: node and replica registry for distributed inference",
            "endpoints": [e.info() for e in self.endpoints],
        }

    def _stats(self) -> dict[str, Any]:
        started = self._started.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
        return self._identity("stats") | {
            "started": started,
            "endpoints": [
                {
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": QUEUE_GROUP,
                    **e.stats.as_dict(),
                    "data": e.data(),
                }
                for e in self.endpoints
            ],
        }

    async def stop(self, grace: float) -> None:
        """Take no new requests, let those in progress finish (up to `grace` s)."""
        # All at once: each drain waits for a round trip to nats-server, and
        # one after another that was 17 ms for the 70 subscriptions.
        outcomes = await asyncio.gather(
            *(sub.unsubscribe() for sub in self._control),
            *(endpoint.drain() for endpoint in self.endpoints),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.debug("unsubscribe or drain failed", exc_info=outcome)
        try:
            await asyncio.wait_for(self._turns.wait_idle(), timeout=grace)
        except TimeoutError:
            log.warning(
                "%d requests still running after %.0fs; stopping anyway",
                self._turns.in_flight,
                grace,
            )
        await self._turns.stop()
