"""Backend intents, kept durably in a JetStream stream.

One message per (node, backend, op): its subject is
`<prefix>.intents.<node_id>.<op>.<backend as base64url>`, and the stream keeps
only the newest message of each subject, so the stream *is* the set of intents.
base64url keeps any backend name (dots, spaces, `*`, `>`, non-ASCII) one valid
subject token, and distinct names distinct tokens.

Every change is a publish that names the sequence it replaces
(`Nats-Expected-Last-Subject-Sequence`), so two writers (an admin reissuing, a
daemon recording a failed attempt) never overwrite each other blindly: the
loser reads the newer version and applies its change to that.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, NotFoundError

from infra.config import Settings

log = logging.getLogger("registryd.intents")

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expectation
# The stream settings ensure_stream gives; the server fills in the others.
_MANAGED = (
    "description",
    "subjects",
    "retention",
    "storage",
    "max_msgs_per_subject",
    "discard",
    "num_replicas",
    "allow_direct",
)


def encode_backend(backend: str) -> str:
    return base64.urlsafe_b64encode(backend.encode()).decode("ascii").rstrip("=")


def intent_id(node_id: str, backend: str, op: str) -> int:
    """A stable number for one (node, backend, op), as Go's row id was a number.

    48 bits of a SHA-256: exact in every JSON parser, and no collision in any
    registry of realistic size.
    """
    digest = hashlib.sha256(f"{node_id}\0{op}\0{backend}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


@dataclass(frozen=True)
class Claim:
    """A daemon delivering an intent right now: who (a token) and since when."""

    token: str
    since: datetime


@dataclass(frozen=True)
class Intent:
    """One backend intent, as its message in the stream holds it.

    A change is a new Intent (dataclasses.replace), written as a new version
    of the message. `galleries` is kept for the worker and never sent back
    (Go's json:"-"); `delivering`, `reissued` and `cancelled` are the
    delivery's bookkeeping: a daemon's claim on the attempt in progress, a
    reissue that waits for that attempt to end, and a cancel that does.
    """

    id: int
    node_id: str
    backend: str
    op: str
    created_at: datetime
    next_retry_at: datetime
    galleries: str = ""
    attempts: int = 0
    last_error: str = ""
    dead: bool = False
    delivering: Claim | None = None
    reissued: bool = False
    # Cancelled while being delivered: kept, out of every list, until the
    # attempt ends, so that asking for it again meanwhile waits for that
    # attempt instead of sending the worker a second one beside it.
    cancelled: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(self, option=orjson.OPT_UTC_Z)

    @classmethod
    def decode(cls, data: bytes) -> Intent:
        fields = orjson.loads(data)
        claim = fields.get("delivering")
        fields["delivering"] = (
            Claim(claim["token"], datetime.fromisoformat(claim["since"])) if claim else None
        )
        for key in ("created_at", "next_retry_at"):
            fields[key] = datetime.fromisoformat(fields[key])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    def public(self) -> dict[str, Any]:
        """The wire's intent, as JSON would carry it (times as RFC 3339 text)."""
        wire = orjson.loads(self.encode())
        for key in _INTERNAL:
            wire.pop(key, None)
        return wire

    def claimed_by(self, token: str) -> bool:
        return self.delivering is not None and self.delivering.token == token

    def unclaimed(self) -> Intent:
        """Without its claim, nor the reissue that waited on the claim."""
        return dataclasses.replace(self, delivering=None, reissued=False)

    def describe(self) -> str:
        return f"{self.op} of {self.backend!r} on {self.node_id}"


_INTERNAL = ("galleries", "delivering", "reissued", "cancelled")


@dataclass(frozen=True)
class Stored:
    """An intent as the stream holds it, with the sequence and subject of its message."""

    seq: int
    intent: Intent
    subject: str


class Changed(Exception):
    """The intent changed since it was read."""


class IntentStore:
    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._js: JetStreamContext = nc.jetstream(timeout=settings.db_timeout)
        self.stream = settings.stream
        self.root = f"{settings.subject_prefix}.intents"
        self._replicas = settings.stream_replicas

    def subject(self, node_id: str, op: str, backend: str) -> str:
        return f"{self.root}.{node_id}.{op}.{encode_backend(backend)}"

    # ------------------------------------------------------------ stream

    async def ensure_stream(self) -> None:
        config = StreamConfig(
            name=self.stream,
            description="registryd backend intents: the newest message per (node, backend, op)",
            subjects=[f"{self.root}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
            num_replicas=self._replicas,
            allow_direct=True,
        )
        try:
            info = await self._js.stream_info(self.stream)
        except NotFoundError:
            try:
                await self._js.add_stream(config)
                log.info("created JetStream stream %s", self.stream)
                return
            except BadRequestError:
                pass  # another instance created it first: update it below
        else:
            # Update only what differs. On a JetStream cluster, an update that
            # lands while another daemon's create is still electing the stream's
            # leader leaves both requests unanswered until they time out.
            if all(getattr(info.config, f) == getattr(config, f) for f in _MANAGED):
                return
        await self._js.update_stream(config)

    # ------------------------------------------------------------ reads

    async def get(self, subject: str) -> Stored | None:
        try:
            msg = await self._js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return None
        assert msg.data is not None and msg.seq is not None
        return Stored(msg.seq, Intent.decode(msg.data), subject)

    async def subjects(self, node_id: str | None = None) -> list[str]:
        """The subject of every intent (of one node), in one request."""
        wanted = f"{self.root}.{node_id}.>" if node_id else f"{self.root}.>"
        try:
            info = await self._js.stream_info(self.stream, subjects_filter=wanted)
        except NotFoundError:
            return []
        return list((info.state.subjects or {}).keys())

    async def find(self, wanted: int) -> Stored | None:
        """The intent with this id (not one cancelled). Its subject names its
        node, op and backend, of which the id is a digest: only that one is read."""
        for subject in await self.subjects():
            node_id, op, backend = self._parts(subject)
            if intent_id(node_id, backend, op) == wanted:
                stored = await self.get(subject)
                return stored if stored is not None and not stored.intent.cancelled else None
        return None

    def _parts(self, subject: str) -> tuple[str, str, str]:
        node_id, op, token = subject.removeprefix(self.root + ".").split(".")
        backend = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        return node_id, op, backend

    async def all(self, node_id: str | None = None) -> list[Stored]:
        """Every intent (of one node) but those cancelled, read concurrently,
        one request per intent."""
        subjects = await self.subjects(node_id)
        gate = asyncio.Semaphore(32)

        async def read(subject: str) -> Stored | None:
            async with gate:
                return await self.get(subject)

        found = await asyncio.gather(*(read(s) for s in subjects))
        return [s for s in found if s is not None and not s.intent.cancelled]

    # ------------------------------------------------------------ writes

    async def put(self, subject: str, intent: Intent, expected_seq: int) -> int:
        """Write a new version if the intent is still at `expected_seq` (0: absent)."""
        try:
            ack = await self._js.publish(
                subject,
                intent.encode(),
                stream=self.stream,
                headers={"Nats-Expected-Last-Subject-Sequence": str(expected_seq)},
            )
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Changed(subject) from None
            raise
        return ack.seq

    async def write(
        self, subject: str, change: Callable[[Stored | None], Intent | None]
    ) -> Stored | None:
        """Read, change, write; again while someone else writes in between.

        `change` gets the current version (None: no intent) and returns the new
        intent, or None to leave things as they are. Returns what was written.
        """
        for _ in range(50):
            current = await self.get(subject)
            intent = change(current)
            if intent is None:
                return None
            try:
                seq = await self.put(subject, intent, current.seq if current else 0)
            except Changed:
                continue
            return Stored(seq, intent, subject)
        raise Changed(subject)

    async def delete_version(self, stored: Stored) -> None:
        """Remove exactly this version: a newer one, written meanwhile, stays."""
        try:
            await self._js.delete_msg(self.stream, stored.seq)
        except NotFoundError:
            pass
        except APIError as exc:  # already gone: replaced or cancelled
            log.debug("intent version %d already gone: %s", stored.seq, exc)

    async def remove(self, subject: str) -> None:
        """Drop an intent, whatever version it is at."""
        await self._js.purge_stream(self.stream, subject=subject)

    async def cancel(self, subject: str) -> None:
        """Cancel an intent. One being delivered is kept, marked, until its
        attempt ends (the delivery drops it then); any other is dropped now."""

        def mark(current: Stored | None) -> Intent | None:
            if current is None or current.intent.delivering is None:
                return None
            return dataclasses.replace(current.intent, cancelled=True, reissued=False)

        if await self.write(subject, mark) is None:
            await self.remove(subject)

    async def purge_node(self, node_id: str) -> None:
        """Drop every intent of a node (it was deregistered)."""
        await self._js.purge_stream(self.stream, subject=f"{self.root}.{node_id}.>")

    async def kick(self, node_id: str) -> None:
        """Have a node's queued intents looked at now (it just became healthy).

        Each is written again unchanged: the new message reaches the delivery
        consumer at once, instead of when the wait of the old one runs out.
        Best effort: if this fails they still go out at the next drain interval.
        """
        try:
            for stored in await self.all(node_id):
                if not stored.intent.dead:
                    try:
                        await self.put(stored.subject, stored.intent, stored.seq)
                    except Changed:
                        pass  # changed meanwhile: that version is looked at anyway
        except Exception as exc:
            log.warning("could not wake the intents of node %s: %s", node_id, exc)

    @property
    def js(self) -> JetStreamContext:
        return self._js
